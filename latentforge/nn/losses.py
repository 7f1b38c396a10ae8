"""Classification losses shared by tasks, computed in float32 or wider whatever the autocast precision.

Under bf16 autocast the logits arrive in bf16 (8 bits of mantissa): a log-softmax there rounds the
probabilities of confident predictions to exactly 1, their gradients to 0, and the loss stalls (the
PIPS notes' "use 32-bit float CE loss"). Both losses here upcast the logits and leave autocast first.

StableMax (Prieto et al. 2025, "Grokking at the edge of numerical stability") replaces exp in the
softmax by s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0, which grows linearly instead of
exponentially: the logits cannot run away to make the loss of every training example round to zero
(their "Softmax Collapse"), and models grok without weight decay. As in the paper, its log-probs are
computed in float64 (float32 where the device has no float64, i.e. MPS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy in float32: logits (..., C) against class ids (...)."""
    with _no_autocast(logits.device):
        loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                               reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def stablemax(x: torch.Tensor) -> torch.Tensor:
    """s(x): x + 1 for x >= 0, 1 / (1 - x) for x < 0 (positive, increasing, linear growth)."""
    return torch.where(x >= 0, x + 1, 1 / (1 - torch.clamp(x, max=0)))


def log_stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(s(x_i) / sum_j s(x_j)) in float64 (float32 on MPS, which has no float64)."""
    wide = torch.float32 if logits.device.type == "mps" else torch.float64
    with _no_autocast(logits.device):
        s = stablemax(logits.to(wide))
        return s.log() - s.sum(dim, keepdim=True).log()


def stablemax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                            reduction: str = "mean") -> torch.Tensor:
    """StableMax cross-entropy: logits (..., C) against class ids (...); returned in float32."""
    log_p = log_stablemax(logits)
    keep = targets != ignore_index
    nll = -log_p.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1) * keep
    if reduction == "none":
        return nll.float()
    if reduction == "sum":
        return nll.sum().float()
    return (nll.sum() / keep.sum().clamp(min=1)).float()


LOSSES = {"softmax": cross_entropy, "stablemax": stablemax_cross_entropy}
