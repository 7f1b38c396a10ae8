"""Adaptive gradient clipping (`train.clip_adaptive=K`): clip at K times the running average of the
gradient norm, so the threshold follows the norm as it drifts over training while a sudden spike is
still cut. The first `warmup` steps are clipped at the fixed `train.clip_grad` while the average
settles. Everything stays on the device: no host sync per step.

The average is an exponential moving average (decay `beta`) of the clipped norms (a spike does not
raise its own threshold), bias-corrected by the sum of its weights; non-finite norms are left out."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

# Logged per window: the threshold used and the fraction of steps clipped (global, not per rank).
METRICS = ("train/clip_threshold", "train/clipped")


class AdaptiveClip:
    def __init__(self, k: float, beta: float, warmup: int, fixed: float, device: torch.device):
        self.k, self.beta, self.warmup = k, beta, warmup
        self.fixed = torch.tensor(fixed, device=device)
        self.average = torch.zeros((), device=device)
        self.weight = torch.zeros((), device=device)
        self.steps = 0

    def clip_(self, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clip the gradients of `params` in place; returns their norm before clipping, and the metrics."""
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        warming = self.steps < self.warmup
        threshold = self.fixed if warming else self.k * self.average / self.weight
        coef = (threshold / (norm + 1e-6)).clamp(max=1.0)
        # A DTensor's local shard is its storage: scaling it scales the sharded gradient.
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
        self.before = (self.average, self.weight)
        seen = norm if warming else torch.minimum(norm, threshold)
        finite = torch.isfinite(norm)
        self.average = torch.where(finite, self.beta * self.average + (1 - self.beta) * seen, self.average)
        self.weight = torch.where(finite, self.beta * self.weight + (1 - self.beta), self.weight)
        self.steps += 1
        return norm, {METRICS[0]: threshold, METRICS[1]: (norm > threshold).float()}

    def revert(self, skipped: torch.Tensor | bool) -> None:
        """Forget the last clip_'s norm when the stability guard skipped that step (a device flag or a bool)."""
        skipped = torch.as_tensor(skipped, device=self.average.device)
        self.average = torch.where(skipped, self.before[0], self.average)
        self.weight = torch.where(skipped, self.before[1], self.weight)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.cpu(), "weight": self.weight.cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = state["average"].to(self.average.device)
        self.weight = state["weight"].to(self.weight.device)
        self.steps = int(state["steps"])
