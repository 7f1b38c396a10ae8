"""`model.activation_checkpointing=true`: every block (each module of an nn.ModuleList, the blocks
FSDP shards) keeps only its inputs in the forward pass and recomputes its activations in the
backward pass: memory for time, for any task. Non-reentrant checkpointing, with the RNG state
restored for the recomputation, so dropout masks and the losses are unchanged."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentforge.engine.distributed import blocks
from latentforge.errors import ConfigError


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation: nothing is kept for a backward pass anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap the forward of every outermost block of `model` (a block inside another block is
    recomputed with it); returns how many were wrapped. The modules themselves stay in place, so
    state-dict keys, FSDP and task code that calls the blocks are unaffected."""
    inside: set[int] = set()
    count = 0
    for block in blocks(model):
        if id(block) in inside:
            continue
        inside.update(id(m) for m in block.modules())
        block.forward = functools.partial(_checkpointed, block.forward)
        count += 1
    if not count:
        raise ConfigError("model.activation_checkpointing=true, but this model has no blocks (modules held in "
                          "an nn.ModuleList) to checkpoint")
    return count
