"""Next-token cross-entropy with an optional z-loss, in float32 whatever the logits' dtype.

The z-loss (PaLM, Chowdhery et al. 2022) adds weight * mean(logsumexp(logits)^2): it keeps the softmax
normaliser near 1, so the logits cannot drift to magnitudes where bf16 loses precision.
"""

from __future__ import annotations

import torch

IGNORE = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor,
                                                                                       dict[str, torch.Tensor]]:
    """logits (B, T, V), labels (B, T) with IGNORE for tokens not scored -> (mean loss over the scored tokens,
    metrics). The metrics are device tensors: ce_loss, z_loss (unweighted) and tokens (scored). They are not
    called `loss`, the name the engine gives the total."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    scored = labels != IGNORE
    tokens = scored.sum()
    # One logsumexp serves both terms; an ignored label reads logit 0, then is masked out.
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, torch.where(scored, labels, 0)[:, None]).squeeze(1)
    denominator = tokens.clamp(min=1).float()
    ce = ((lse - target) * scored).sum() / denominator
    z = (lse.square() * scored).sum() / denominator
    loss = ce + z_loss * z if z_loss else ce
    return loss, {"ce_loss": ce.detach(), "z_loss": z.detach(), "tokens": tokens.detach().float()}
