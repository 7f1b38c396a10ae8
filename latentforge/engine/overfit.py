"""`train.overfit_batches=N`: train on the first N training batches over and over, and evaluate on
those same batches, to prove that a model and its loss can learn before a real run is spent on them.

The batches are taken from the task's own stream when the trainer is built (from scratch and on
resume alike), so the stream's whole state is the position in the cycle: resume stays exact."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from latentforge.engine.task import BatchStream, Task
from latentforge.errors import ConfigError

PREFIX = "overfit/"


class OverfitStream:
    """The first `n` batches of `stream`, cycled."""

    def __init__(self, stream: BatchStream, n: int):
        self.batches = [stream.next_batch() for _ in range(n)]
        self.index = 0

    def next_batch(self) -> Any:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"overfit_index": self.index, "overfit_batches": len(self.batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("overfit_batches") != len(self.batches):
            raise ConfigError(f"train.overfit_batches={len(self.batches)} differs from the checkpoint's "
                              f"({state.get('overfit_batches', 0)}); keep it as the run was started")
        self.index = int(state["overfit_index"])

    def evaluate(self, task: Task, model: nn.Module, amp: contextlib.AbstractContextManager) -> dict[str, float]:
        """The task's loss and metrics on the cycled batches, in eval mode (dropout off), as overfit/<name>."""
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        weights = [task.loss_weight(b) for b in self.batches]
        total = sum(weights)
        try:
            with torch.no_grad(), amp:
                for batch, weight in zip(self.batches, weights):
                    loss, metrics = task.loss(model, batch)
                    for name, value in {"loss": loss, **metrics}.items():
                        sums[name] = sums.get(name, 0) + value.detach().float() * (weight / total)
        finally:
            model.train(was_training)
        return {PREFIX + name: float(value) for name, value in sums.items()}


def check_resume(overfit_batches: int, data_state: dict[str, Any]) -> None:
    """A run that trained on cycled batches resumes on them (OverfitStream refuses the reverse)."""
    if not overfit_batches and "overfit_index" in data_state:
        raise ConfigError(f"this run trained with train.overfit_batches={data_state['overfit_batches']}; "
                          f"keep it as the run was started")
