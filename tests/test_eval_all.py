"""`latentforge eval RUN --all-checkpoints`, and the rule that pruning never removes a checkpoint
queued for evaluation."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY, snapshot

import latentforge
import latentforge.engine.eval_all as eval_all
from latentforge.engine.checkpoint import list_checkpoints, prune_checkpoints, save_checkpoint
from latentforge.engine.eval_queue import PREFIX, STALE_SECONDS, EvalQueue, queued, queued_steps


def make_checkpoints(ckpt_dir, steps):
    for step in steps:
        save_checkpoint(ckpt_dir, step, {"step": step}, "periodic")


def test_prune_skips_queued_checkpoints_until_they_are_evaluated(tmp_path):
    ckpt = tmp_path / "checkpoints"
    make_checkpoints(ckpt, [2, 4, 6, 8])
    queue = EvalQueue(ckpt, [2, 4])
    prune_checkpoints(ckpt, keep=1, protected=set())
    assert list_checkpoints(ckpt) == [2, 4, 8]
    queue.done(2)
    prune_checkpoints(ckpt, keep=1, protected=set())
    assert list_checkpoints(ckpt) == [4, 8]
    queue.close()
    prune_checkpoints(ckpt, keep=1, protected=set())
    assert list_checkpoints(ckpt) == [8]


def test_a_dead_evaluations_mark_does_not_pin_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    make_checkpoints(ckpt, [2, 4, 6])
    # A real process that has exited: its pid is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mark = ckpt / f"{PREFIX}{socket.gethostname()}-{dead.stdout.strip()}.json"
    mark.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "steps": [2, 4]}))
    # A mark from another host counts until it is STALE_SECONDS old.
    other = ckpt / f"{PREFIX}elsewhere-1.json"
    other.write_text(json.dumps({"host": "elsewhere", "pid": 1, "steps": [4]}))
    assert queued_steps(ckpt) == {4} and not mark.exists()
    prune_checkpoints(ckpt, keep=1, protected=set())
    assert list_checkpoints(ckpt) == [4, 6]
    old = time.time() - STALE_SECONDS - 60
    os.utime(other, (old, old))
    prune_checkpoints(ckpt, keep=1, protected=set())
    assert list_checkpoints(ckpt) == [6] and not other.exists()


def test_a_live_evaluation_in_another_process_holds_its_marks(tmp_path):
    ckpt = tmp_path / "checkpoints"
    make_checkpoints(ckpt, [2, 4, 6])
    code = ("import sys, time; from pathlib import Path; from latentforge.engine.eval_queue import EvalQueue; "
            "q = EvalQueue(Path(sys.argv[1]), [2]); print('marked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(ckpt)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == "marked"
        prune_checkpoints(ckpt, keep=1, protected=set())
        assert list_checkpoints(ckpt) == [2, 6]
    finally:
        child.kill()
        child.wait()
    prune_checkpoints(ckpt, keep=1, protected=set())  # its process is gone: the mark is stale
    assert list_checkpoints(ckpt) == [6]


def test_the_mark_is_removed_even_when_evaluation_fails(tmp_path):
    ckpt = tmp_path / "checkpoints"
    make_checkpoints(ckpt, [2])
    with pytest.raises(RuntimeError), queued(ckpt, lambda: list_checkpoints(ckpt)) as queue:
        assert queue.steps == [2] and queued_steps(ckpt) == {2}
        raise RuntimeError("evaluation failed")
    assert queued_steps(ckpt) == set() and not list(ckpt.glob(f"{PREFIX}*"))


def test_eval_all_checkpoints_writes_each_checkpoints_metrics_at_its_step(cli, runs_dir, monkeypatch):
    # Checkpoints at 4, 8 and 12 (the end); training evaluated at 6 and 12 only.
    run = latentforge.train("multiply/tiny", *TINY, "checkpoint.keep=5", 'checkpoint.metric=""', name="e",
                            runs_dir=runs_dir)
    assert run.checkpoints() == [4, 8, 12]
    before = {r["step"]: r for r in run.metrics if "test/exact_match" in r}
    assert sorted(before) == [6, 12]
    seen = []  # the checkpoints marked when each one is evaluated
    original = eval_all._evaluate_one

    def spy(run_dir, step, *args):
        seen.append((step, queued_steps(run_dir.checkpoints)))
        return original(run_dir, step, *args)

    monkeypatch.setattr(eval_all, "_evaluate_one", spy)
    result = cli("eval", "e", "--all-checkpoints", "--runs-dir", runs_dir, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[0]["new"] == rows[1]["new"] > 0 and rows[2]["new"] == 0 and rows[2]["note"] == "already evaluated"
    # In step order, each still marked when read; no mark is left behind.
    assert seen == [(4, {4, 8, 12}), (8, {8, 12})]
    assert not list(run.dir.checkpoints.glob(f"{PREFIX}*"))
    after = [r for r in run.metrics if "test/exact_match" in r]
    assert [r["step"] for r in after] == [4, 6, 8, 12]  # read back in step order, 12 not duplicated
    assert after[-1] == before[12]
    assert rows[0]["test/exact_match"] == after[0]["test/exact_match"]
    # Once more: nothing new is written.
    lines = run.dir.metrics_path.read_text()
    result = cli("eval", "e", "--all-checkpoints", "--runs-dir", runs_dir)
    assert result.exit_code == 0 and "wrote the metrics of 0 of 3 checkpoints" in result.output
    assert run.dir.metrics_path.read_text() == lines
    # And TensorBoard has them at their steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in run.dir.tb.glob("events.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "test/exact_match" in acc.Tags()["scalars"]:
            scalars.update({e.step: e.value for e in acc.Scalars("test/exact_match")})
    assert sorted(scalars) == [4, 6, 8, 12]


def test_eval_all_checkpoints_bad_input_is_one_line(cli, runs_dir):
    latentforge.train("multiply/tiny", *TINY, "train.steps=4", name="b", runs_dir=runs_dir)
    before = snapshot(runs_dir)
    result = cli("eval", "b", "--all-checkpoints", "--checkpoint", "4", "--runs-dir", runs_dir)
    assert result.exit_code == 2
    assert result.output.strip() == "error: --all-checkpoints evaluates every kept checkpoint: leave out --checkpoint"
    result = cli("eval", "b", "--all-checkpoints", "--split", "nope", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and result.output.startswith("error: unknown split 'nope'")
    assert snapshot(runs_dir) == before
