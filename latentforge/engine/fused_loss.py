"""`task.fused_loss`: what a task that offers nn.fused_ce checks, and where it finds the head.

The fused loss applies the head itself, so the task's loss reads the head's weight outside the model's
forward: FSDP, which shards that weight outside the forward, is refused, and so is fp16, whose loss scale
arrives after the fused loss has made its gradients. Both are config errors, found before any work.
"""

from __future__ import annotations

import torch
from torch import nn

from latentforge.config import Config
from latentforge.errors import ConfigError
from latentforge.nn.fused_ce import fused_available


def check_fused_config(cfg: Config) -> None:
    """For a task's validate_config."""
    if not cfg.task.fused_loss:
        return
    if cfg.train.precision == "fp16":
        raise ConfigError("task.fused_loss makes its gradients in the forward, before fp16's loss scale could "
                          "keep them from underflowing; use train.precision=bf16 or fp32")
    if cfg.dist.strategy == "fsdp":
        raise ConfigError("task.fused_loss reads the head's weight outside the model's forward, which FSDP "
                          "shards; use dist.strategy=ddp or task.fused_loss=false")


def check_fused_device(cfg: Config, device: torch.device) -> None:
    """For a task's __init__, which knows the device."""
    if cfg.task.fused_loss and not fused_available(device):
        raise ConfigError(f"task.fused_loss needs Triton and a CUDA device (this run trains on {device.type})")


def unwrapped(model: nn.Module) -> nn.Module:
    """The module itself, where the task's loss is handed the compiled model (DDP compiles the model alone)."""
    return getattr(model, "_orig_mod", model)
