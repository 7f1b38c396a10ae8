import hashlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY, interrupt_at, losses, sampling_evaluation

import latentforge
from latentforge.api import evaluate_all_checkpoints
from latentforge.config import GuardConfig
from latentforge.engine.checkpoint import list_checkpoints, load_checkpoint
from latentforge.engine.guard import StabilityGuard
from latentforge.engine.loop import Trainer
from latentforge.errors import TrainingStopped
from latentforge.tasks.multiply.task import Multiply


@pytest.mark.parametrize("async_save", ["true", "false"])
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_interrupted_and_resumed_run_matches_the_straight_run(runs_dir, monkeypatch, optimizer, async_save):
    """2N steps straight == N steps, SIGTERM, resume, N steps: identical per-step losses.
    With gradient accumulation, dropout (RNG state), a cosine schedule over 2N steps, a resume
    that falls mid-epoch and mid log-window, and evaluation/checkpoints in between; checkpoints
    written in the background or synchronously."""
    common = [*TINY, "train.steps=16", "train.grad_accum=2", "model.dropout=0.1", "train.log_every=3",
              "checkpoint.every=5", "data.test_size=2000", "train.batch_size=24", f"optim.name={optimizer}",
              f"checkpoint.async_save={async_save}"]
    straight = latentforge.train("multiply/tiny", *common, name="straight", runs_dir=runs_dir)
    # 8000 training pairs / (24 x 2) per step: the resume at step 7 is mid-epoch.
    interrupt_at(monkeypatch, 7)
    part = latentforge.train("multiply/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted" and 7 in part.checkpoints()
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert resumed.status == "finished"
    a, b = straight.metrics, resumed.metrics
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no duplicated or missing records
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith(("train/loss", "train/grad_norm", "train/answer", "test/exact", "test/token")):
                assert ra[key] == rb[key], (ra["step"], key)
    sa = load_checkpoint(straight.checkpoint_path("latest"))["model"]
    sb = load_checkpoint(resumed.checkpoint_path("latest"))["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("stop_at", [6, 12], ids=["mid-run", "final"])
def test_a_stop_during_an_evaluation_abandons_it_and_the_resumed_run_evaluates_first(runs_dir, monkeypatch, stop_at):
    """SIGTERM during an evaluation (which can outlast a scheduler's grace period) ends the run at once with a
    checkpoint of that step and nothing of the evaluation logged; the resumed run evaluates that step first and
    then matches the straight run: evaluating, abandoned or not, leaves the random generators as they were."""
    common = [*TINY, "model.dropout=0.1"]
    sampling_evaluation(monkeypatch)
    straight = latentforge.train("multiply/tiny", *common, name="straight", runs_dir=runs_dir)
    sampling_evaluation(monkeypatch, stop_at)
    part = latentforge.train("multiply/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted" and part.info["step"] == stop_at and stop_at in part.checkpoints()
    assert not [r for r in part.metrics if r["step"] == stop_at and any(k.startswith("test/") for k in r)]
    sampling_evaluation(monkeypatch)
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert resumed.status == "finished" and resumed.info["step"] == 12
    a, b = straight.metrics, resumed.metrics
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith(("train/loss", "train/grad_norm", "test/", "train_eval/")):
                assert ra[key] == rb[key], (ra["step"], key)
    sa = load_checkpoint(straight.checkpoint_path("latest"))["model"]
    sb = load_checkpoint(resumed.checkpoint_path("latest"))["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_pending_evaluation_is_recorded_by_the_resume_not_by_eval_all_checkpoints(runs_dir, monkeypatch):
    sampling_evaluation(monkeypatch, 6)
    part = latentforge.train("multiply/tiny", *TINY, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted" and part.info["step"] == 6
    monkeypatch.undo()
    rows = {row["step"]: row for row in evaluate_all_checkpoints("part", runs_dir=runs_dir)}
    assert rows[6]["new"] == 0 and "test/exact_match" in rows[6] and rows[4]["new"] > 0
    assert not [r for r in latentforge.Run("part", runs_dir).metrics if r["step"] == 6 and "test/exact_match" in r]
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert resumed.status == "finished"
    assert len([r for r in resumed.metrics if r["step"] == 6 and "test/exact_match" in r]) == 1
    assert len([r for r in resumed.metrics if r["step"] == 6 and "train/loss" in r]) == 1


def test_a_stop_while_an_evaluation_is_recorded_stops_the_run_at_that_step(runs_dir, monkeypatch):
    """SIGTERM after the evaluation's metrics are in (its figures, its best checkpoint) is not abandoning it, and
    the run stops at that step rather than training one more."""
    record = Trainer._record_evaluation

    def record_then_stop(self, *args, **kwargs):
        saved = record(self, *args, **kwargs)
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    monkeypatch.setattr(Trainer, "_record_evaluation", record_then_stop)
    run = latentforge.train("multiply/tiny", *TINY, name="r", runs_dir=runs_dir)
    assert run.status == "interrupted" and run.info["step"] == 6 and max(run.checkpoints()) == 6
    assert [r for r in run.metrics if r["step"] == 6 and "test/exact_match" in r]


def test_how_often_a_run_evaluates_does_not_change_its_training(runs_dir, monkeypatch):
    """An evaluation that draws random numbers hands the generators back as it found them: dropout's masks, and
    so the losses, are the same whether the run evaluates every 3 steps or every 6."""
    sampling_evaluation(monkeypatch)
    common = [*TINY, "model.dropout=0.1"]
    often = latentforge.train("multiply/tiny", *common, "train.eval_every=3", name="often", runs_dir=runs_dir)
    seldom = latentforge.train("multiply/tiny", *common, name="seldom", runs_dir=runs_dir)
    assert losses(often.path) == losses(seldom.path)


def test_extend_a_finished_run(runs_dir):
    first = latentforge.train("multiply/tiny", *TINY, "optim.schedule=constant", "optim.warmup=3",
                              name="ext", runs_dir=runs_dir)
    assert first.status == "finished" and first.info["step"] == 12
    extended = latentforge.resume("ext", "train.steps=20", runs_dir=runs_dir)
    assert extended.info["step"] == 20 and extended.info["total_steps"] == 20
    assert extended.config.train.steps == 20
    assert sorted(losses(extended.path)) == list(range(1, 21))
    # N + resume + N equals 2N straight when the schedule does not depend on the total.
    straight = latentforge.train("multiply/tiny", *TINY, "optim.schedule=constant", "optim.warmup=3",
                                 "train.steps=20", name="straight20", runs_dir=runs_dir)
    assert losses(straight.path) == losses(extended.path)


def test_gradient_accumulation_equals_the_larger_batch(runs_dir):
    # AdamW: Muon's Newton-Schulz iteration would amplify float rounding between the two sums.
    common = [*TINY, "optim.name=adamw"]
    big = latentforge.train("multiply/tiny", *common, "train.batch_size=32", name="big", runs_dir=runs_dir)
    acc = latentforge.train("multiply/tiny", *common, "train.batch_size=8", "train.grad_accum=4",
                            name="acc", runs_dir=runs_dir)
    lb, la = losses(big.path), losses(acc.path)
    assert lb.keys() == la.keys()
    for step in lb:
        assert la[step] == pytest.approx(lb[step], rel=1e-5, abs=1e-6)
    mb, ma = big.model(), acc.model()
    for pb, pa in zip(mb.parameters(), ma.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_checkpoints_keep_last_k_plus_best(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, "train.steps=30", "checkpoint.every=2", "checkpoint.keep=2",
                            "train.eval_every=3", name="keep", runs_dir=runs_dir)
    steps = run.checkpoints()
    best = run.info["best"]
    assert best["metric"] == "test/exact_match" and best["step"] in steps
    assert [s for s in steps if s != best["step"]] == [s for s in (28, 30) if s != best["step"]]
    assert len(steps) == (2 if best["step"] in (28, 30) else 3)
    meta = json.loads((run.path / "checkpoints" / f"step_{30:08d}" / "meta.json").read_text())
    assert meta["kind"] == "final" and len(meta["sha256"]) == 64


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])  # judged on the host; on the device (fused AdamW)
def test_guard_skips_a_nan_step_and_cools_the_lr(runs_dir, monkeypatch, optimizer):
    original = Multiply.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        value, metrics = original(self, model, batch)
        return (value * math.nan if calls["n"] == 5 else value), metrics

    monkeypatch.setattr(Multiply, "loss", loss)
    run = latentforge.train("multiply/tiny", *TINY, "optim.schedule=constant", "optim.lr=3e-3",
                            "train.guard.cooldown=3", "train.guard.lr_factor=0.25", "checkpoint.keep=10",
                            f"optim.name={optimizer}", name="nan", runs_dir=runs_dir)
    assert run.status == "finished"
    events = run.info["guard_events"]
    assert [e["step"] for e in events] == [5] and "non-finite loss" in events[0]["reason"]
    lrs = {r["step"]: r["train/lr"] for r in run.metrics if "train/lr" in r}
    assert lrs[5] == pytest.approx(1e-3 * 3) and lrs[7] == pytest.approx(3e-3 * 0.25)
    assert lrs[10] == pytest.approx(3e-3)
    assert all(math.isfinite(v) for v in losses(run.path).values())
    assert 5 not in losses(run.path)  # the skipped step's loss is an event, not a data point
    meta = json.loads((run.path / "checkpoints" / f"step_{5:08d}" / "meta.json").read_text())
    assert meta["kind"] == "emergency"
    assert any(r.get("guard/bad_step") == 1.0 and r["step"] == 5 for r in run.metrics)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_guard_stops_after_consecutive_bad_steps(runs_dir, monkeypatch, optimizer):
    original = Multiply.loss

    def loss(self, model, batch):
        value, metrics = original(self, model, batch)
        return value * math.inf, metrics

    monkeypatch.setattr(Multiply, "loss", loss)
    with pytest.raises(TrainingStopped, match="3 bad steps in a row"):
        latentforge.train("multiply/tiny", *TINY, "train.guard.max_bad_steps=3", f"optim.name={optimizer}", name="inf",
                          runs_dir=runs_dir)
    run = latentforge.load_run("inf", runs_dir=runs_dir)
    assert run.status == "failed" and "3 bad steps in a row" in run.info["error"]
    assert 1 in run.checkpoints()  # the emergency checkpoint of the first bad step


def test_guard_spike_detection():
    guard = StabilityGuard(GuardConfig(window=20, min_history=10, spike_sigmas=4, spike_ratio=2))
    for i in range(20):
        assert guard.judge(1.0 + 0.01 * (i % 3), 1.0) is None
        guard.record(1.0 + 0.01 * (i % 3), None)
    assert guard.judge(1.05, 1.0) is None
    assert "loss spike" in guard.judge(5.0, 1.0)
    # Near zero, a tenfold jump is noise, not a spike: the floor keeps converged runs training.
    quiet = StabilityGuard(GuardConfig(window=20, min_history=10))
    for i in range(20):
        quiet.record(0.001 * (1 + i % 2), None)
    assert quiet.judge(0.05, 1.0) is None and "loss spike" in quiet.judge(0.5, 1.0)
    assert "non-finite gradient norm" in guard.judge(1.0, math.inf)
    guard.record(5.0, guard.judge(5.0, 1.0))
    assert guard.lr_scale == 0.5 and guard.bad_streak == 1
    # A spike that lasts max_bad_steps is a new loss level: the guard starts afresh.
    for _ in range(guard.cfg.max_bad_steps - 2):
        assert guard.record(5.0, guard.judge(5.0, 1.0)) is False
    assert guard.record(5.0, guard.judge(5.0, 1.0)) is True
    assert not guard.must_stop and len(guard.history) == 0 and guard.judge(5.0, 1.0) is None
    # Non-finite steps never become a level: they stop training.
    for _ in range(guard.cfg.max_bad_steps):
        guard.record(math.nan, guard.judge(math.nan, 1.0))
    assert guard.must_stop
    restored = StabilityGuard(guard.cfg)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(runs_dir, precision):
    run = latentforge.train("multiply/tiny", *TINY, f"train.precision={precision}", name=precision,
                            runs_dir=runs_dir)
    values = list(losses(run.path).values())
    assert run.status == "finished" and all(math.isfinite(v) for v in values)
    state = load_checkpoint(run.checkpoint_path("latest"))
    assert (state["scaler"] is not None) == (precision == "fp16")


def test_the_default_preset_learns(runs_dir):
    """A short run of the real preset: loss falls well below its start and test accuracy rises."""
    run = latentforge.train("multiply", "train.steps=300", "train.eval_every=300", "train.log_every=25",
                            name="learn", runs_dir=runs_dir)
    values = losses(run.path)
    assert values[300] < 0.6 * values[25]
    assert run.info["last_eval"]["test/token_acc"] > 0.4


def test_checkpoint_checksum_is_the_files_hashed_while_writing(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, name="sum", runs_dir=runs_dir)
    path = run.checkpoint_path("latest")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256((path / "state.pt").read_bytes()).hexdigest()


def test_corrupt_checkpoint_is_refused_and_left_alone(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, name="corrupt", runs_dir=runs_dir)
    state = run.checkpoint_path("latest") / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    before = state.read_bytes()
    with pytest.raises(latentforge.errors.CheckpointError, match="truncated or corrupt"):
        latentforge.resume("corrupt", "train.steps=20", runs_dir=runs_dir)
    assert state.read_bytes() == before


def test_half_written_checkpoint_is_never_picked(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, name="half", runs_dir=runs_dir)
    (run.path / "checkpoints" / ".tmp-step_00000099-1234").mkdir()
    (run.path / "checkpoints" / "step_00000098").mkdir()  # no meta.json: incomplete
    assert list_checkpoints(run.path / "checkpoints")[-1] == 12


@pytest.mark.slow
def test_compile_matches_eager(runs_dir):
    eager = latentforge.train("multiply/tiny", *TINY, "train.steps=4", name="eager", runs_dir=runs_dir)
    compiled = latentforge.train("multiply/tiny", *TINY, "train.steps=4", "train.compile=true",
                                 name="compiled", runs_dir=runs_dir)
    # train.compile_options go to torch.compile in place of the mode (a kernel search: a GPU one, none here).
    tuned = latentforge.train("multiply/tiny", *TINY, "train.steps=4", "train.compile=true",
                              "train.compile_options={coordinate_descent_tuning: true}", name="tuned",
                              runs_dir=runs_dir)
    le, lc, lt = losses(eager.path), losses(compiled.path), losses(tuned.path)
    for step in le:
        assert lc[step] == pytest.approx(le[step], rel=1e-4)
        assert lt[step] == pytest.approx(le[step], rel=1e-4)


def test_load_run_gives_config_metrics_and_model(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, train__seed=3, name="api", runs_dir=runs_dir)
    loaded = latentforge.load_run(Path(runs_dir) / "api")
    assert loaded.config.train.seed == 3 and loaded.config.train.steps == 12
    assert any("test/exact_match" in r for r in loaded.metrics)
    model = loaded.model("best")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert run.info["params"] == sum(p.numel() for p in model.parameters())


def test_time_limit_ends_the_run_as_its_last_step_and_resume_goes_on(runs_dir, monkeypatch, cli):
    """train.time_limit: the step that reaches it is evaluated and checkpointed as the last one, the run is
    finished (stopped_by time_limit); resuming needs a higher limit, and then the losses are the straight run's."""

    straight = latentforge.train("multiply/tiny", *TINY, name="straight", runs_dir=runs_dir)
    # A clock of one second per step, so the limit falls on a known step.
    monkeypatch.setattr(Trainer, "_train_seconds", lambda self: float(self.step))
    limited = latentforge.train("multiply/tiny", *TINY, "train.time_limit=5", name="limited", runs_dir=runs_dir)
    assert limited.status == "finished" and limited.info["stopped_by"] == "time_limit"
    assert limited.info["step"] == 5 and limited.info["last_eval"]["step"] == 5
    assert 5 in limited.checkpoints() and sorted(losses(limited.path)) == list(range(1, 6))
    monkeypatch.setenv("COLUMNS", "200")
    listing = cli("runs", "--runs-dir", runs_dir)
    assert "finished (time limit)" in listing.output and "5/12" in listing.output
    result = cli("resume", "limited", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "train.time_limit=5" in result.output and "Traceback" not in result.output
    monkeypatch.undo()
    resumed = latentforge.resume("limited", "train.time_limit=0", runs_dir=runs_dir)
    assert resumed.status == "finished" and resumed.info["stopped_by"] is None and resumed.info["step"] == 12
    assert losses(resumed.path) == losses(straight.path)
