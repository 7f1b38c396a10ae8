"""Evaluate every kept checkpoint of a run and write the results into its metrics.jsonl (and
TensorBoard) at their steps, so the run's curves show them.

The checkpoints are marked as queued (engine/eval_queue.py) before the first is read, so a training
run still writing into the same directory cannot prune one before it is evaluated; each is unmarked
once done. A metric already recorded at a checkpoint's step (e.g. by training's own evaluation) is
not written again, and a step that already holds every metric the evaluation produces is skipped. A
checkpoint whose evaluation a stop abandoned is evaluated but not recorded: its resumed run records it.
Records are appended (never rewritten), so a training run appending at the same time loses nothing;
readers order records by step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from latentforge.config import Config
from latentforge.engine.checkpoint import list_checkpoints, load_checkpoint, step_dir_name
from latentforge.engine.ema import PREFIX as EMA_PREFIX
from latentforge.engine.ema import ema_weights
from latentforge.engine.eval_queue import queued
from latentforge.engine.loop import build_task_and_model, evaluate, load_model_state, load_weights, resolve_device
from latentforge.errors import CheckpointError, ConfigError
from latentforge.track.progress import TrainProgress
from latentforge.track.rundir import RunDir


def recorded_keys(run: RunDir) -> dict[int, set[str]]:
    """Step -> the metric names metrics.jsonl holds at that step."""
    keys: dict[int, set[str]] = {}
    for record in run.read_metrics():
        keys.setdefault(record["step"], set()).update(k for k in record if k not in ("step", "time"))
    return keys


def evaluate_all(run: RunDir, cfg: Config, splits: list[str] | None, device: str, ema: bool,
                 quiet: bool) -> list[dict[str, Any]]:
    """One row per kept checkpoint, in step order: its step, its metrics and how many were new."""
    dev = resolve_device(device)
    steps = list_checkpoints(run.checkpoints)
    if not steps:
        raise CheckpointError(f"no checkpoint in {run.checkpoints}")
    task, model = build_task_and_model(cfg, dev, run.checkpoints / step_dir_name(steps[0]))
    available = task.eval_splits()
    splits = splits or task.training_eval_splits()
    for split in splits:
        if split not in available:
            raise ConfigError(f"unknown split {split!r} (splits of this run: {', '.join(available)})")
    precision = cfg.train.precision if dev.type == "cuda" else "fp32"
    # The metric prefixes training evaluates (and a resume records): its splits, and their EMA twins.
    trained = task.training_eval_splits()
    resumed_splits = {*trained, *(EMA_PREFIX + split for split in trained if cfg.train.ema_decay > 0)}
    writer = None
    if cfg.track.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run.tb))
    rows: list[dict[str, Any]] = []
    produced: set[str] | None = None  # the metric names an evaluation gives, learnt from the first one
    with queued(run.checkpoints, lambda: list_checkpoints(run.checkpoints)) as queue:
        progress = TrainProgress(len(queue.steps), 0, enabled=not quiet, description="eval")
        try:
            for i, step in enumerate(list(queue.steps)):
                have = recorded_keys(run).get(step, set())
                if produced is not None and produced <= have:
                    rows.append({"step": step, "new": 0, "note": "already evaluated"})
                else:
                    rows.append(_evaluate_one(run, step, task, model, splits, dev, precision, ema, have, writer,
                                              progress, resumed_splits))
                    produced = produced or {k for k in rows[-1] if "/" in k}
                queue.done(step)
                progress.update(i + 1)
        finally:
            progress.close()
            if writer is not None:
                writer.close()
    return rows


def _evaluate_one(run: RunDir, step: int, task: Any, model: Any, splits: list[str], dev: Any, precision: str,
                  ema: bool, have: set[str], writer: Any, progress: TrainProgress,
                  resumed_splits: set[str]) -> dict[str, Any]:
    path: Path = run.checkpoints / step_dir_name(step)
    state = load_checkpoint(path)
    if ema:
        load_model_state(model, ema_weights(state, path), path)
    else:
        load_weights(model, path, state)
    metrics = evaluate(task, model, splits, dev, precision, progress)
    if ema:
        metrics = {EMA_PREFIX + k: v for k, v in metrics.items()}
    held: set[str] = set()
    if state.get("eval_pending") and run.info().get("step") == step:
        # A stop abandoned this step's evaluation in training and the run has not gone on: its resume records what
        # training evaluates there, once.
        held = {k for k in metrics if k.split("/", 1)[0] in resumed_splits}
    new = {k: v for k, v in metrics.items() if k not in have and k not in held}
    if new:
        run.append_metrics({"step": step, "time": round(time.time(), 3), **new})
        if writer is not None:
            for key, value in new.items():
                writer.add_scalar(key, value, step)
    note = {"note": "left to `latentforge resume`, which evaluates this step"} if held else {}
    return {"step": step, **metrics, "new": len(new), **note}
