"""An exponential moving average of the weights (train.ema_decay), kept beside the raw weights.

torch.optim.swa_utils does the averaging; buffers are averaged too (use_buffers=True) so state
such as norm statistics follows the averaged weights. Integer buffers (index maps, counters) are
copied instead: an average of integers, cast back to an integer, would drift by truncation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from latentforge.errors import CheckpointError

# Metrics of the averaged weights: `ema_test/exact_match` beside `test/exact_match`.
PREFIX = "ema_"


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of `model` whose first update copies the weights and each later one moves it a
    (1 - decay) step towards them: ema = decay * ema + (1 - decay) * weights."""
    average_floats = get_ema_multi_avg_fn(decay)

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        # AveragedModel groups tensors by dtype, so each call holds one dtype.
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            average_floats(averaged, current, n_averaged)
        else:
            torch._foreach_copy_(averaged, current)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def ema_weights(state: dict[str, Any], source: Path) -> dict[str, torch.Tensor]:
    """The averaged model's weights from a checkpoint, named as the raw model's are."""
    ema = state.get("ema")
    if ema is None:
        raise CheckpointError(f"checkpoint {source} has no EMA weights (train with train.ema_decay > 0 to keep them)")
    return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}

