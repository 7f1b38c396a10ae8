"""Muon whose Newton-Schulz iterations run on all matrices of one shape at once.

torch.optim.Muon orthogonalises one matrix at a time: ~18 small kernels per matrix per step, which
for a small model costs more than its forward and backward (a 4-layer model on an H100: 65 steps/s
against 209 with fused AdamW). Stacking the matrices of one shape (transposed so rows <= columns)
turns that into ~18 batched kernels per shape. The update is torch's: same momentum, Nesterov,
coefficients, decoupled weight decay and LR adjustment, and the same state (`momentum_buffer`),
so checkpoints move between the two.

Two things torch's Muon does not do, so that a step needs nothing from the host:
- `found_inf` (a 0-d device tensor, 1 = skip; the device guard sets it as it does for fused AdamW)
  leaves the parameters and momentum untouched on the device. The step is computed on copies, and
  kept only where found_inf is 0: an update that is kept is exactly the unguarded one.
- A group's `lr` may be a 0-d device tensor (train.cuda_graph fills one per step and replays the
  recorded step with it).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim._muon import _adjust_lr


def orthogonalize(updates: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """Quintic Newton-Schulz of a stack of matrices (N, rows, cols), rows <= cols, in bf16."""
    a, b, c = coefficients
    x = updates.bfloat16()
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class BatchedMuon(torch.optim.Muon):
    found_inf: Tensor | None = None

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        skip = self.found_inf
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            # Under a skip flag the step writes into copies, kept below only where the flag is 0.
            new_params = params if skip is None else [p.clone() for p in params]
            new_buffers = buffers if skip is None else [b.clone() for b in buffers]
            self._update(group, new_params, grads, new_buffers)
            if skip is not None:
                keep_old = skip.bool()
                for old, new in zip(params + buffers, new_params + new_buffers):
                    old.copy_(torch.where(keep_old, old, new))

    @staticmethod
    def _update(group: dict, params: list[Tensor], grads: list[Tensor], buffers: list[Tensor]) -> None:
        """torch's Muon update of one group, in place on `params` and `buffers`, Newton-Schulz batched."""
        momentum, lr = group["momentum"], group["lr"]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_shape[tuple(sorted(p.shape))].append(i)
        # Parameters grouped by their LR adjustment (it depends on the orientation for "original").
        steps: dict[float, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        for indices in by_shape.values():
            # Wide orientation for every matrix of the stack: the Gram matrix is the small one.
            tall = [params[i].shape[0] > params[i].shape[1] for i in indices]
            stack = torch.stack([updates[i].T if t else updates[i] for i, t in zip(indices, tall)])
            ortho = orthogonalize(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
            ortho = ortho.to(params[indices[0]].dtype)
            for j, (i, t) in enumerate(zip(indices, tall)):
                ratio = _adjust_lr(1.0, group["adjust_lr_fn"], params[i].shape)
                steps[ratio][0].append(params[i])
                steps[ratio][1].append(ortho[j].T if t else ortho[j])
        for ratio, (ps, os) in steps.items():
            if isinstance(lr, Tensor):
                torch._foreach_sub_(ps, torch._foreach_mul(os, lr * ratio))
            else:
                torch._foreach_add_(ps, os, alpha=-lr * ratio)
