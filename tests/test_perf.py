"""Issue 7: checkpoints written in the background, and the stability guard judged on the device."""

import hashlib
import json
import os
import threading

import pytest
import torch
from conftest import TINY

import latentforge
from latentforge.engine.async_checkpoint import CheckpointWriter, snapshot
from latentforge.engine.checkpoint import load_checkpoint
from latentforge.engine.loop import Trainer


# ----------------------------------------------------------------------------- asynchronous save
def test_snapshot_is_a_frozen_copy_that_keeps_tied_tensors_tied():
    weight = torch.randn(4, 3)
    state = {"model": {"emb": weight, "head": weight.detach(), "bias": torch.zeros(3)},
             "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
             "rng": (1, [2, 3]), "data": {"epoch": 1}}
    before = weight.clone()
    copy = snapshot(state)
    weight.add_(1.0)
    state["optimizer"]["state"][0]["step"] += 1
    state["optimizer"]["param_groups"][0]["lr"] = 0.5
    state["data"]["epoch"] = 2
    assert torch.equal(copy["model"]["emb"], before)
    assert copy["model"]["emb"] is copy["model"]["head"]  # one tensor in the file, as torch.save keeps it
    assert copy["optimizer"]["state"][0]["step"].item() == 2.0
    assert copy["optimizer"]["param_groups"][0]["lr"] == 0.1 and copy["data"]["epoch"] == 1
    assert copy["rng"] == (1, [2, 3]) and type(copy["rng"]) is tuple


def test_writer_returns_while_the_write_runs_and_hands_its_error_to_the_caller():
    writer = CheckpointWriter(torch.device("cpu"))
    release, written = threading.Event(), []

    def write(state):
        release.wait(timeout=30)
        written.append(state["x"].item())

    writer.save({"x": torch.tensor(1.0)}, write)
    assert written == []  # save returned with the write still blocked on its thread
    with pytest.raises(RuntimeError, match="still in flight"):
        writer.save({"x": torch.tensor(2.0)}, write)
    release.set()
    assert writer.wait() is not None and written == [1.0]
    assert writer.wait() is None

    def fail(state):
        raise latentforge.errors.CheckpointError("disk on fire")

    writer.save({}, fail)
    with pytest.raises(latentforge.errors.CheckpointError, match="disk on fire"):
        writer.wait()
    assert writer.wait() is None  # reported once


def test_async_and_sync_saves_write_the_same_checkpoints(runs_dir):
    runs = {mode: latentforge.train("multiply/tiny", *TINY, "optim.name=adamw", f"checkpoint.async_save={mode}",
                                    "checkpoint.keep=2", name=f"save-{mode}", runs_dir=runs_dir)
            for mode in ("true", "false")}
    a, b = runs["true"], runs["false"]
    assert a.checkpoints() == b.checkpoints() and 12 in a.checkpoints()
    for step in a.checkpoints():
        sa, sb = load_checkpoint(a.path / "checkpoints" / f"step_{step:08d}"), \
            load_checkpoint(b.path / "checkpoints" / f"step_{step:08d}")
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
        assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
        for i, s in sa["optimizer"]["state"].items():
            assert all(torch.equal(s[k], sb["optimizer"]["state"][i][k]) for k in s)
        assert sa["step"] == step and sa["best"] == sb["best"] and sa["data"] == sb["data"]
        path = a.path / "checkpoints" / f"step_{step:08d}"
        meta = json.loads((path / "meta.json").read_text())
        assert meta["sha256"] == hashlib.sha256((path / "state.pt").read_bytes()).hexdigest()
    for run in runs.values():
        blocked = {r["step"]: r["checkpoint/blocked_s"] for r in run.metrics if "checkpoint/blocked_s" in r}
        assert {4, 8} <= blocked.keys() and 12 not in blocked  # the final save ends training: not "blocked"
        log = (run.path / "logs" / "rank0.log").read_text()
        assert "checkpoint of step 12 (final): training blocked" in log
    assert "written in the background" in (a.path / "logs" / "rank0.log").read_text()
    assert "written in the background" not in (b.path / "logs" / "rank0.log").read_text()


@pytest.mark.parametrize("async_save", ["true", "false"])
def test_a_failed_write_is_one_error_line_and_keeps_the_earlier_checkpoints(cli, runs_dir, monkeypatch, async_save):
    """A file where the step-8 save puts its temporary directory: the write fails with an OSError, on
    the writer thread or the training thread; either way it is the same one-line CheckpointError."""
    original = Trainer.train_step

    def train_step(self):
        reason = original(self)
        if self.step == 6:
            (self.run.checkpoints / f".tmp-step_{8:08d}-{os.getpid()}").write_text("in the way")
        return reason

    monkeypatch.setattr(Trainer, "train_step", train_step)
    result = cli("train", "multiply/tiny", *TINY, f"checkpoint.async_save={async_save}", "--name", "full",
                 "--runs-dir", runs_dir, "-q")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot write the checkpoint of step 8: File exists" in lines[0], result.output
    assert "Traceback" not in result.output
    run = latentforge.load_run("full", runs_dir=runs_dir)
    assert run.status == "failed" and "step 8" in run.info["error"]
    assert 4 in run.checkpoints() and 8 not in run.checkpoints()
    load_checkpoint(run.checkpoint_path(4))
