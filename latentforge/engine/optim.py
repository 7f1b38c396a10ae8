"""AdamW with decay on weight matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from latentforge.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on >= 2-D weights; never on biases or norm gains; on embeddings if asked."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_params
        (decay if p.dim() >= 2 and (cfg.decay_embeddings or not is_embedding) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        fused=device.type == "cuda",
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for the update that takes the model from `step` to `step + 1`."""
    warmup = cfg.warmup_steps(total_steps)
    if cfg.schedule == "noam":
        # Linear warmup, then inverse square root decay from the peak; min_lr is a floor.
        w = max(warmup, 1)
        s = step + 1
        return max(cfg.lr * min(s / w, math.sqrt(w / s)), cfg.min_lr)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = total_steps - max(1, round(cfg.decay_frac * total_steps))
        if step < max(decay_start, warmup):
            return cfg.lr
        progress = (step - max(decay_start, warmup) + 1) / max(1, total_steps - max(decay_start, warmup))
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(progress, 1.0)
    progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    # cosine
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
