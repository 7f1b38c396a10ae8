"""Issue 7: checkpoints written in the background, and the stability guard judged on the device."""

import hashlib
import json
import math
import os
import threading

import pytest
import torch
from conftest import TINY, interrupt_at, losses

import latentforge
from latentforge.config import GuardConfig
from latentforge.engine.async_checkpoint import CheckpointWriter, snapshot
from latentforge.engine.checkpoint import load_checkpoint
from latentforge.engine.clipping import AdaptiveClip
from latentforge.engine.device_guard import DeviceGuard
from latentforge.engine.guard import StabilityGuard
from latentforge.engine.loop import Trainer
from latentforge.tasks.multiply.task import Multiply


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


def test_snapshot_copies_a_module_state_dict_tensor_by_tensor():
    """A module's state_dict is an OrderedDict with `_metadata`: its tensors go through the same copy as
    the rest (on a GPU, into the pinned buffers) and the mapping keeps its type and metadata."""
    model = torch.nn.Linear(3, 3)
    state = {"model": model.state_dict(), "optimizer": {"state": {0: {"exp_avg": model.weight}}}}
    copy = snapshot(state)
    assert type(copy["model"]) is type(state["model"]) and copy["model"]._metadata == state["model"]._metadata
    assert copy["model"]["weight"] is copy["optimizer"]["state"][0]["exp_avg"]  # one copy of a shared tensor
    assert copy["model"]["weight"].data_ptr() != model.weight.data_ptr()


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


# ----------------------------------------------------------------------------- the guard on the device
def feed(guards, values, start=1):
    """The same (loss, norm) steps to a host StabilityGuard and a DeviceGuard; their verdicts per step."""
    host, device = guards
    verdicts = []
    for step, (loss, norm) in enumerate(values, start=start):
        reason = host.judge(loss, norm)
        if host.record(loss, reason):
            reason = f"{reason}; {host.cfg.max_bad_steps} spikes in a row: taken as the new loss level"
        device.judge(torch.tensor(loss), torch.tensor(norm), step)
        verdicts.append(reason)
    read = {bad.step: bad for bad in device.read()}
    assert [read[s].reason if s in read else None for s in range(start, start + len(values))] == verdicts
    return read


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_device_guard_judges_as_the_host_guard(compile):
    cfg = GuardConfig(window=20, min_history=10, spike_sigmas=4, spike_ratio=2, max_bad_steps=3, cooldown=4)
    guards = StabilityGuard(cfg), DeviceGuard(cfg, torch.device("cpu"), log_every=100, compile=compile)
    calm = [(1.0 + 0.01 * (i % 3), 1.0) for i in range(25)]  # fills and wraps the window
    read = feed(guards, calm + [(5.0, 1.0), (1.02, 1.0), (math.nan, 1.0), (1.0, math.inf), (1.01, 1.0),
                                (1.0, 1.0)])
    assert [bad.streak for bad in read.values()] == [1, 1, 2]
    host, device = guards
    assert device.bad_total == host.bad_total == 3 and device.cooldown_left == host.cooldown_left == 2
    assert device.state_dict()["history"] == pytest.approx(host.state_dict()["history"])
    # A spike that lasts max_bad_steps is a new loss level; then non-finite steps stop training.
    read = feed(guards, [(6.0, 1.0)] * 3 + [(6.1, 1.0)] + [(math.inf, 1.0)] * 3, start=32)
    assert "taken as the new loss level" in read[34].reason and read[34].streak == 0
    assert read[38].streak == 3 and host.must_stop
    restored = DeviceGuard(cfg, torch.device("cpu"), log_every=100)
    restored.load_state_dict(device.state_dict())
    assert restored.state_dict()["history"] == device.state_dict()["history"]
    # A host guard's checkpoint resumes on the device path, and the other way round.
    restored.load_state_dict(host.state_dict())
    assert restored.state_dict()["history"] == pytest.approx(host.state_dict()["history"])
    StabilityGuard(cfg).load_state_dict(device.state_dict())


def test_adaptive_clip_forgets_a_skipped_step():
    clip = AdaptiveClip(2.0, 0.9, 1, 1.0, torch.device("cpu"))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    clip.clip_([p])
    before = clip.state_dict()
    p.grad = torch.full((3,), 100.0)
    clip.clip_([p])
    clip.revert(torch.tensor(True))
    assert clip.state_dict()["average"] == before["average"] and clip.state_dict()["weight"] == before["weight"]


def nan_at(monkeypatch, call: int) -> None:
    original = Multiply.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        value, metrics = original(self, model, batch)
        return (value * math.nan if calls["n"] == call else value), metrics

    monkeypatch.setattr(Multiply, "loss", loss)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_between_a_skipped_step_and_its_read_is_exact(runs_dir, monkeypatch, optimizer):
    """Fused AdamW (or BatchedMuon with AdamW) skips the NaN step 5 on the device; the host reads it at step 8
    (log_every=4). A run interrupted at step 6 carries the unread verdict in its checkpoint and resumes to the
    same losses, events, cool-down and weights as the run that went straight through."""
    common = [*TINY, f"optim.name={optimizer}", "train.log_every=4", "optim.schedule=constant",
              "train.guard.cooldown=8", "train.guard.lr_factor=0.5", "checkpoint.keep=10"]
    nan_at(monkeypatch, 5)
    straight = latentforge.train("multiply/tiny", *common, name="straight", runs_dir=runs_dir)
    monkeypatch.undo()
    nan_at(monkeypatch, 5)
    interrupt_at(monkeypatch, 6)
    part = latentforge.train("multiply/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted" and "guard_events" not in part.info  # not read yet
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert [e["step"] for e in straight.info["guard_events"]] == [5]
    assert resumed.info["guard_events"] == straight.info["guard_events"]
    assert losses(resumed.path) == losses(straight.path) and all(map(math.isfinite, losses(straight.path).values()))
    assert isinstance(Trainer(straight.config, quiet=True).guard, DeviceGuard)

    def story(run):  # every record but the timings
        return [{k: v for k, v in r.items() if k.startswith(("step", "train/loss", "train/grad_norm", "train/answer",
                                                             "train/lr", "train/bad_steps", "guard/"))}
                for r in run.metrics]

    assert story(resumed) == story(straight)
    # The cool-down (8 steps) began at the read, step 8, less the 3 steps since the bad one.
    lrs = {r["step"]: r["train/lr"] for r in straight.metrics if "train/lr" in r}
    assert lrs[8] == pytest.approx(1.5e-2) and lrs[12] == pytest.approx(1.5e-2 * 0.5)
    a, b = load_checkpoint(straight.checkpoint_path("latest")), load_checkpoint(resumed.checkpoint_path("latest"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # The skipped step advanced neither the weights' moments nor AdamW's step count.
    adamw = a["optimizer"] if optimizer == "adamw" else a["optimizer"]["optimizers"][1]
    assert {float(s["step"]) for s in adamw["state"].values()} == {11.0}
