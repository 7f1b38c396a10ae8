"""Data parallelism with real torchrun processes on the CPU (gloo): N ranks train on disjoint slices
of the same global batches as one process, so their losses agree, and checkpoints move between
world sizes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, latentforge_process, losses

# Constant LR: a resumed run may extend train.steps without changing the schedule.
BASE = ["multiply/tiny", "train.steps=8", "train.log_every=1", "train.eval_every=4", "checkpoint.every=4",
        "data.test_size=50", "data.train_eval_size=50", "train.batch_size=16", "optim.schedule=constant",
        "optim.name=adamw", "optim.warmup=0", "train.device=cpu"]


def assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    """Per-step losses of two runs, to the rounding of two AdamW kernels: one CPU process clips inside fused
    AdamW (a division), several take foreach AdamW after clip_grad_norm_ (a multiplication), which drift
    apart by ~1e-5 over 40 steps. A rank that trained on the wrong rows or averaged wrongly is off by far more."""
    assert a.keys() == b.keys() and a
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=5e-5, abs=1e-6), step


# The one-process reference runs long enough that an interrupted run on a slow machine still stops inside it.
SINGLE_STEPS = 40


def until(step_losses: dict[int, float], last: int) -> dict[int, float]:
    return {s: v for s, v in step_losses.items() if s <= last}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, SINGLE_STEPS steps: what every distributed run below must reproduce."""
    runs = tmp_path_factory.mktemp("single")
    result = latentforge_process(runs, "train", *BASE, f"train.steps={SINGLE_STEPS}", "--name", "one")
    assert result.returncode == 0, result.stderr
    return runs / "one"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_resume_on_one(single, tmp_path, strategy):
    # dist.nproc=2 makes `latentforge train` start torchrun itself.
    result = latentforge_process(tmp_path, "train", *BASE, f"dist.strategy={strategy}", "dist.nproc=2", "--name", "two")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "two"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["world_size"] == 2
    assert (run / "checkpoints" / "step_00000008" / "dcp" / ".metadata").is_file()
    reference = until(losses(single), 12)
    assert_close(losses(run), until(reference, 8))

    # The sharded checkpoint serves one-process commands, and the whole run can go on in one process.
    result = latentforge_process(tmp_path, "eval", "two", "--checkpoint", "8", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["test/exact_match"] == info["last_eval"]["test/exact_match"]

    # Saved by 2 ranks, resumed by 1: the remaining steps are the single run's.
    result = latentforge_process(tmp_path, "resume", "two", "train.steps=12", "dist.nproc=1")
    assert result.returncode == 0, result.stderr
    assert_close(losses(run), reference)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_ranks(single, tmp_path):
    result = latentforge_process(tmp_path, "train", *BASE, "--name", "grow")
    assert result.returncode == 0, result.stderr
    result = latentforge_process(tmp_path, "resume", "grow", "train.steps=12", "dist.strategy=fsdp", nproc=2)
    assert result.returncode == 0, result.stderr
    assert_close(losses(tmp_path / "grow"), until(losses(single), 12))
    assert json.loads((tmp_path / "grow" / "run.json").read_text())["world_size"] == 2


def test_global_batch_must_divide_over_the_ranks(tmp_path):
    result = latentforge_process(tmp_path, "train", *BASE, "train.batch_size=15", "dist.nproc=2", "--name", "odd")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.batch_size=15 (the global batch) must divide evenly over 2 processes"]
    assert not (tmp_path / "odd").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_every_rank_and_the_run_goes_on(single, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "latentforge", "train", *BASE, "train.steps=100000", "dist.nproc=2",
           "--name", "sig", "--runs-dir", str(tmp_path), "-q"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    info = json.loads((tmp_path / "sig" / "run.json").read_text())
    assert info["status"] == "interrupted"
    step = info["step"]
    assert (tmp_path / "sig" / "checkpoints" / f"step_{step:08d}" / "dcp").is_dir()
    assert step < SINGLE_STEPS, f"SIGTERM took {step} steps to land"
    result = latentforge_process(tmp_path, "resume", "sig", f"train.steps={SINGLE_STEPS}")
    assert result.returncode == 0, result.stderr
    assert_close(losses(tmp_path / "sig"), losses(single))


@pytest.mark.slow
def test_vq_distance_reset_trains_on_two_ranks(tmp_path):
    """The distance reset of dead codes under DDP: a huge threshold resets every code each step, through the draw
    over both processes' vectors (the collectives match up: nothing hangs or refuses)."""
    result = latentforge_process(tmp_path, "train", "dvae/tiny", "model.codebook=vq", "task.weights.usage.start=0",
                                 "task.weights.usage.end=0", "model.codebook_options.dead_code_reset=distance",
                                 "model.codebook_options.threshold_ema_dead_code=1e9", "train.steps=4",
                                 "train.eval_every=4", "checkpoint.every=4", "train.device=cpu", "dist.nproc=2",
                                 "--name", "vq")
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "vq" / "run.json").read_text())
    assert info["status"] == "finished" and info["world_size"] == 2 and info["step"] == 4
