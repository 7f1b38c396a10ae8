"""Metric sinks: metrics.jsonl is the source of truth; TensorBoard and W&B receive the same records."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from latentforge.config import Config
from latentforge.track.rundir import RunDir


class MetricsLogger:
    def __init__(self, run: RunDir, cfg: Config, resume_step: int | None = None, writes: bool = True):
        """`writes=False` (ranks other than 0): no TensorBoard or W&B (run files are rank 0's)."""
        self.run = run
        self.writer = None
        self.wandb = None
        if cfg.track.tensorboard and writes:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run wrote after the checkpoint we resume from.
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(run.tb), purge_step=purge)
        if cfg.track.wandb and writes:
            from latentforge.track.wandb_sink import WandbSink

            self.wandb = WandbSink(run, cfg, resume_step)
        self.wandb_checkpoints = cfg.track.wandb_checkpoints

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.run.append_metrics(record)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, metrics)
        return record

    def add_figure(self, tag: str, figure: Any, step: int) -> None:
        """The figure as a TensorBoard and W&B image (the figure stays open for the caller to save)."""
        if self.writer is not None:
            self.writer.add_figure(tag, figure, step, close=False)
        if self.wandb is not None:
            self.wandb.add_figure(tag, figure, step)

    def log_checkpoint(self, path: Path, step: int, best: bool) -> None:
        """A saved checkpoint, uploaded as a W&B model artifact when track.wandb_checkpoints is on."""
        if self.wandb is not None and self.wandb_checkpoints:
            self.wandb.log_checkpoint(path, step, best)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close(exit_code=1 if failed else 0)
