import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from latentforge.cli import app
from latentforge.engine.loop import Trainer
from latentforge.tasks.multiply.task import Multiply

REPO = Path(__file__).resolve().parents[1]

# The W&B tests need the test extra's wandb. Where it is missing (a bare GPU image running `pytest -m gpu`),
# they are left out, instead of their import error stopping the collection of every other test.
collect_ignore = [] if importlib.util.find_spec("wandb") else ["test_wandb.py", "test_sync.py"]
ICOT = REPO / "latentforge" / "tasks" / "multiply" / "icot"

# Small and fast: what most engine and CLI tests train.
TINY = ["train.steps=12", "train.log_every=1", "train.eval_every=6", "checkpoint.every=4",
        "data.test_size=100", "data.train_eval_size=100", "train.batch_size=16"]


def bench_module(name: str):
    """A module of the repository's bench/ (not an installed package), e.g. "dvae.entropy"."""
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(str(REPO))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def cli(runs_dir: Path):
    """Run the CLI in-process; returns click's Result (exit_code, output, stderr)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def ok(result):
    """A CLI result that succeeded (its output shown when it did not)."""
    assert result.exit_code == 0, result.output
    return result


def losses(run_path: Path) -> dict[int, float]:
    """Per-step training loss from a run's metrics.jsonl."""
    out = {}
    for line in (run_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out[record["step"]] = record["train/loss"]
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes: to prove bad input changed nothing on disk."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def train_refused(cli, runs_dir: Path, preset: str, overrides: list[str], message: str) -> None:
    """`latentforge train PRESET OVERRIDES` exits 2 with `message` as its one line and changes nothing on disk."""
    before = snapshot(runs_dir)
    result = cli("train", preset, *overrides, "--runs-dir", runs_dir, "--name", "bad")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [message]
    assert snapshot(runs_dir) == before


def interrupt_at(monkeypatch, step: int) -> None:
    """Send this process a real SIGTERM right after `step` finishes."""
    original = Trainer.train_step

    def train_step(self):
        reason = original(self)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return reason

    monkeypatch.setattr(Trainer, "train_step", train_step)


def sampling_evaluation(monkeypatch, stop_at: int | None = None, device: str = "cpu") -> None:
    """multiply's evaluation, made to draw from torch's generator on `device` as a sampling evaluation does; with
    `stop_at`, this process gets a real SIGTERM as the evaluation of that step begins. Replaces the patches made
    before."""
    monkeypatch.undo()
    reached = {"step": 0}
    train_step, evaluate = Trainer.train_step, Multiply.evaluate

    def counting_step(self):
        reason = train_step(self)
        reached["step"] = self.step
        return reason

    def sampling(self, model, split):
        torch.rand((), device=device)
        if reached["step"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, model, split)

    monkeypatch.setattr(Trainer, "train_step", counting_step)
    monkeypatch.setattr(Multiply, "evaluate", sampling)


def latentforge_process(runs_dir: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """`latentforge ARGS` in a fresh process (under torchrun with nproc > 1), as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*prefix, "-m", "latentforge", *args, "--runs-dir", str(runs_dir), "-q"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
