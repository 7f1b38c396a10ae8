"""Metric sinks: metrics.jsonl is the source of truth; TensorBoard receives the same records."""

from __future__ import annotations

import time
from typing import Any

from latentforge.track.rundir import RunDir


class MetricsLogger:
    def __init__(self, run: RunDir, tensorboard: bool, resume_step: int | None = None):
        self.run = run
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run wrote after the checkpoint we resume from.
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(run.tb), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.run.append_metrics(record)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        return record

    def add_figure(self, tag: str, figure: Any, step: int) -> None:
        """The figure as a TensorBoard image (the figure stays open for the caller to save)."""
        if self.writer is not None:
            self.writer.add_figure(tag, figure, step, close=False)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
