"""Running a sweep on this machine: each point is a real `latentforge train` (or `resume`) process,
one after another or N at a time, its output in <sweep>/logs/<run_id>.log.

A sweep directory belongs to one grid (points.json); running the same file again continues it:
finished runs are skipped, runs with a checkpoint are resumed, runs without one are trained again.
Ctrl-C or SIGTERM is forwarded to the children as SIGTERM, so each one checkpoints before the
sweep exits; a second Ctrl-C is forwarded as SIGINT, which makes them abort at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from latentforge.api import Run
from latentforge.config import load_config
from latentforge.engine.checkpoint import list_checkpoints
from latentforge.engine.loop import resolve_device
from latentforge.engine.signals import CatchSignals
from latentforge.errors import ConfigError, LatentforgeError, RunError
from latentforge.launch.report import best_value
from latentforge.launch.sweep import Point, Sweep
from latentforge.track.files import write_atomic, write_json
from latentforge.track.listing import effective_status
from latentforge.track.rundir import RunDir

POLL_SECONDS = 0.2
# What to do with a point, given what its run directory holds.
TRAIN, RETRAIN, RESUME, SKIP, BUSY = "train", "retrain", "resume", "skip", "busy"


@dataclass
class Job:
    point: Point
    action: str  # train, retrain, resume, skip or busy
    on_cpu: bool = False


@dataclass
class Outcome:
    point: Point
    action: str
    status: str  # the run's status afterwards (finished, failed, interrupted, ...) or "not started"
    returncode: int | None = None
    seconds: float = 0.0


@dataclass
class SweepResult:
    sweep_dir: Path
    outcomes: list[Outcome]
    interrupted: bool  # by Ctrl-C or SIGTERM, forwarded to the children


def sweep_dir_of(sweep: Sweep, runs_dir: Path) -> Path:
    return Path(runs_dir) / sweep.name


def log_path(sweep_dir: Path, point: Point) -> Path:
    return sweep_dir / "logs" / f"{point.run_id}.log"


def _points_record(sweep: Sweep) -> dict[str, Any]:
    # Through JSON, so that it compares equal to what json.loads gives back from points.json.
    return json.loads(json.dumps({"name": sweep.name, "points": [dataclasses.asdict(p) for p in sweep.points]}))


def check_sweep_dir(sweep: Sweep, sweep_dir: Path) -> None:
    """Refuse a directory that holds another grid (or anything but a sweep): two grids are never mixed."""
    points_path = sweep_dir / "points.json"
    if points_path.is_file():
        try:
            stored = json.loads(points_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise RunError(f"{points_path} is damaged; cannot tell which sweep {sweep_dir} holds") from None
        if stored.get("points") != _points_record(sweep)["points"]:
            raise ConfigError(f"{sweep_dir} holds another sweep whose points differ from {sweep.file}'s; "
                              f"give this one a new name: in {sweep.file}")
    elif sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise ConfigError(f"{sweep_dir} exists and is not a sweep directory (no points.json); "
                          f"give this sweep another name: in {sweep.file}")


def plan(point: Point, sweep_dir: Path) -> str:
    """train, retrain (--overwrite: no checkpoint to continue), resume, skip (finished) or busy
    (another live process is training it, or it waits in a Slurm queue)."""
    run = RunDir(sweep_dir / point.run_id)
    if not run.info_path.is_file():
        return RETRAIN if run.path.exists() else TRAIN
    status = effective_status(run.info())
    if status == "finished":
        return SKIP
    if status in ("running", "queued"):
        return BUSY
    return RESUME if list_checkpoints(run.checkpoints) else RETRAIN


def command(point: Point, action: str, sweep_dir: Path) -> list[str]:
    """The child's command line: exactly what a user would type."""
    cli = [sys.executable, "-m", "latentforge"]
    if action == RESUME:
        return [*cli, "resume", str(sweep_dir / point.run_id), "--quiet"]
    return [*cli, "train", point.config, *point.overrides, "--name", point.run_id, "--runs-dir", str(sweep_dir),
            "--quiet", *(["--overwrite"] if action == RETRAIN else [])]


def child_env(parallel: int, on_cpu: bool, environ: dict[str, str] | None = None) -> dict[str, str]:
    """N CPU trainings side by side share the cores instead of each spawning a thread per core;
    the user's own OMP_NUM_THREADS wins."""
    env = dict(os.environ if environ is None else environ)
    env["PYTHONUNBUFFERED"] = "1"  # the log shows the run as it happens
    if parallel > 1 and on_cpu and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def _on_cpu(sweep: Sweep, point: Point) -> bool:
    """Whether the point trains on the CPU here; a device this machine lacks is refused before anything starts
    (expansion leaves devices alone: a Slurm launcher expands on a login node without GPUs)."""
    try:
        return resolve_device(load_config(point.config, point.overrides).train.device).type == "cpu"
    except LatentforgeError as e:
        raise ConfigError(f"sweep {sweep.file}, point {point.run_id}: {e}") from None


class _Signals(CatchSignals):
    """Counts Ctrl-C / SIGTERM instead of dying, so the loop can forward them to the children."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def handle(self, signum: int, frame: Any) -> None:
        self.count += 1


def plan_sweep(sweep: Sweep, runs_dir: Path, check_devices: bool = True) -> tuple[Path, list[Job]]:
    """What running the sweep would do, read only: a directory of another grid, or a device this machine
    lacks, is refused here (unless the runs go elsewhere: a Slurm job's node has the GPUs, not this one)."""
    sweep_dir = sweep_dir_of(sweep, runs_dir)
    check_sweep_dir(sweep, sweep_dir)
    jobs = [Job(point, plan(point, sweep_dir)) for point in sweep.points]
    for job in jobs:
        if check_devices and job.action not in (SKIP, BUSY):
            job.on_cpu = _on_cpu(sweep, job.point)
    return sweep_dir, jobs


def prepare(sweep: Sweep, runs_dir: Path, check_devices: bool = True) -> tuple[Path, list[Job]]:
    """Check everything, then create the sweep directory: nothing is written if any point cannot run."""
    sweep_dir, jobs = plan_sweep(sweep, runs_dir, check_devices)
    try:
        (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
        write_json(sweep_dir / "points.json", _points_record(sweep))
        write_atomic(sweep_dir / "sweep.yaml", sweep.file.read_text())
    except OSError as e:
        raise RunError(f"cannot write the sweep directory {sweep_dir}: {e.strerror or e}") from None
    return sweep_dir, jobs


def _run_status(sweep_dir: Path, point: Point) -> str:
    path = sweep_dir / point.run_id / "run.json"
    if not path.is_file():
        return "failed"  # the child died before its run existed; its log says why
    try:
        return effective_status(RunDir(path.parent).info())
    except LatentforgeError:
        return "failed"


def run_sweep(sweep: Sweep, runs_dir: Path, parallel: int = 1, console: Console | None = None) -> SweepResult:
    """Run every point that is not finished, `parallel` at a time; returns each point's outcome."""
    sweep_dir, jobs = prepare(sweep, runs_dir)
    already = {SKIP: "finished", BUSY: "running"}
    outcomes = {job.point.run_id: Outcome(job.point, job.action, "not started" if job.action not in already
                                          else _run_status(sweep_dir, job.point)) for job in jobs}
    pending = deque(job for job in jobs if job.action not in already)
    total, done = len(pending), 0
    say = console.print if console is not None else (lambda *a, **k: None)
    if total < len(jobs):
        say(f"{len(jobs) - total} of {len(jobs)} runs need no work (finished, running elsewhere or queued in Slurm)")
    running: dict[subprocess.Popen, tuple[Point, float]] = {}
    forwarded = 0
    with _Signals() as signals:
        try:
            while pending or running:
                if signals.count and forwarded < signals.count:
                    # First signal: SIGTERM, the children checkpoint and stop; any later one: SIGINT, they abort.
                    sig = signal.SIGTERM if forwarded == 0 else signal.SIGINT
                    for proc in running:
                        proc.send_signal(sig)
                    if forwarded == 0:
                        say(f"stopping: {len(running)} running runs write a checkpoint and exit "
                            "(interrupt again to abort them at once)", highlight=False)
                    forwarded = signals.count
                    pending.clear()
                while pending and len(running) < parallel:
                    job = pending.popleft()
                    running[_launch(job, sweep_dir, parallel)] = (job.point, time.time())
                    say(f"start {job.point.run_id} ({job.action})", highlight=False)
                for proc in [p for p in running if p.poll() is not None]:
                    point, started = running.pop(proc)
                    outcome = outcomes[point.run_id]
                    outcome.returncode, outcome.seconds = proc.returncode, time.time() - started
                    outcome.status = _run_status(sweep_dir, point)
                    done += 1
                    say(f"[{done}/{total}] {point.run_id}: {outcome.status} in {outcome.seconds:.0f}s", highlight=False)
                time.sleep(POLL_SECONDS)
        finally:
            # Only reached with children alive if this loop itself failed: never leave them orphaned.
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            for proc in running:
                proc.wait()
    return SweepResult(sweep_dir, list(outcomes.values()), forwarded > 0)


def _launch(job: Job, sweep_dir: Path, parallel: int) -> subprocess.Popen:
    cmd = command(job.point, job.action, sweep_dir)
    with open(log_path(sweep_dir, job.point), "a") as log:
        # Appended, never truncated: a continued run's log keeps its history.
        log.write(f"=== {datetime.now().isoformat(timespec='seconds')} {' '.join(cmd)}\n")
        log.flush()
        # A session of its own: the terminal's Ctrl-C reaches only the sweep, which forwards it as SIGTERM.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(parallel, job.on_cpu), start_new_session=True)


def summary_rows(sweep: Sweep, result: SweepResult) -> tuple[list[dict[str, Any]], str]:
    """One row per point (run, status, grid values, best metric and its step) and the metric's column name:
    the sweep's report metric, else each run's checkpoint.metric."""
    rows, metrics = [], set()
    for outcome in result.outcomes:
        row: dict[str, Any] = {"run": outcome.point.run_id, "status": outcome.status, **outcome.point.values,
                               "best": None, "best_step": None}
        path = result.sweep_dir / outcome.point.run_id
        if (path / "run.json").is_file():
            try:
                run = Run(path)
                checkpoint = run.config.checkpoint
                metric = sweep.report.metric or checkpoint.metric
                best = best_value(run.metrics, metric, sweep.report.mode or checkpoint.mode) if metric else None
            except LatentforgeError:
                best, metric = None, None  # a damaged run keeps its status in the table; its log says more
            metrics.add(metric)
            if best is not None:
                row["best"], row["best_step"] = best
        rows.append(row)
    metrics.discard(None)
    return rows, f"best {metrics.pop()}" if len(metrics) == 1 else "best"


def failure_lines(result: SweepResult) -> list[str]:
    """For each run that did not finish (a Ctrl-C of the sweep aside): its status, exit code, the last line
    of its log (a failed run's error) and the log's path."""
    expected = {"finished", "not started"} | ({"interrupted"} if result.interrupted else set())
    lines = []
    for outcome in result.outcomes:
        if outcome.status in expected:
            continue
        log = log_path(result.sweep_dir, outcome.point)
        last = ""
        if log.is_file():
            tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
            last = f": {tail[-1]}" if tail else ""
        code = f" (exit {outcome.returncode})" if outcome.returncode is not None else ""
        lines.append(f"{outcome.point.run_id}: {outcome.status}{code}{last}\n  log: {log}")
    return lines
