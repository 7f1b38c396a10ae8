"""⊥Grad (Prieto et al. 2025, "Grokking at the edge of numerical stability"): before the inner
optimizer steps, each weight tensor's gradient loses its component parallel to the weights and is
rescaled to its original norm.

Once a model fits its training set, the cheapest way down the loss is to scale the weights up along
their own direction ("naive loss minimisation"): the logits grow, the loss of every example rounds
to zero and learning stops before the model generalises. The parallel component of the gradient is
exactly that direction; without it the model groks without weight decay (`optim.orthograd=true`).

The wrapper holds no state of its own: its state_dict is the inner optimizer's, so checkpoints with
and without it load into each other and resume stays exact.
"""

from __future__ import annotations

from typing import Any

import torch

EPS = 1e-30


@torch.no_grad()
def orthogonalize_(params: list[torch.Tensor]) -> None:
    """g <- (g - (w.g / w.w) w) * |g| / |g_perp|, per tensor, in place (as the paper's reference code)."""
    for p in params:
        if p.grad is None:
            continue
        w, g = p.detach().float(), p.grad.float()
        perp = g - (w * g).sum() / ((w * w).sum() + EPS) * w
        p.grad.copy_(perp * (g.norm() / (perp.norm() + EPS)))


class OrthoGrad:
    """Wraps an optimizer (AdamW, or the Muon + AdamW group) with the parts of the Optimizer
    interface that the loop, the grad scaler and the checkpoints use."""

    def __init__(self, inner: Any):
        self.inner = inner

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers inside (distributed checkpoints and optimizer resets reach them)."""
        return list(getattr(self.inner, "optimizers", [self.inner]))

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return self.inner.state

    def step(self, closure: None = None) -> None:
        orthogonalize_([p for group in self.param_groups for p in group["params"]])
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
