"""The dVAE's loss terms: reconstruction, KL to a uniform prior, the beta-TCVAE decomposition for
categorical codes, and code-usage / entropy penalties.

The beta-TCVAE terms use the minibatch-weighted-sampling estimator (Chen et al. 2018) over the
batch: for a code c_j sampled for grid j, log q(c_j) is estimated from every grid i of the batch as
logsumexp_i log q(c_j | x_i) - log(B * M), and each slot's marginal likewise. Because the joint is
estimated jointly (not as a product of per-slot marginals), the total correlation is not
identically zero, and MI + TC + DWKL equals the sampled KL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reconstruction(logits: torch.Tensor, targets: torch.Tensor, pad_id: int | None, pad_weight: float,
                   focal_gamma: float = 0.0) -> torch.Tensor:
    """Cell-weighted cross-entropy (B, cells, V) vs (B, cells): padding cells weigh `pad_weight`
    (weights are normalized, so the weight changes the balance, not the scale); with
    focal_gamma > 0, each cell is scaled by (1 - p_true)^gamma (focal loss)."""
    log_p = F.log_softmax(logits.float(), -1)
    nll = -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if focal_gamma > 0:
        nll = nll * (1 - (-nll).exp()).pow(focal_gamma)
    weight = torch.ones_like(nll)
    if pad_id is not None:
        weight = torch.where(targets == pad_id, pad_weight, 1.0)
    return (nll * weight).sum() / weight.sum().clamp(min=1e-12)


def kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q(c | x) || uniform) per latent slot, averaged over slots and batch (B, N, K) -> scalar."""
    log_q = F.log_softmax(logits.float(), -1)
    return (log_q.exp() * (log_q + math.log(logits.shape[-1]))).sum(-1).mean()


def tc_decomposition(logits: torch.Tensor, codes: torch.Tensor, dataset_size: int) -> dict[str, torch.Tensor]:
    """Mutual information, total correlation and dimension-wise KL (each per latent slot, so they
    sum to the sampled KL per slot) for categorical codes: logits (B, N, K), sampled codes (B, N)."""
    B, N, K = logits.shape
    log_q = F.log_softmax(logits.float(), -1)                      # (B_i, N, K): log q(c^n = k | x_i)
    # log q(c_j^n | x_i) for every pair (i, j): (B_i, B_j, N)
    log_q_pairs = log_q.gather(-1, codes.T.unsqueeze(0).expand(B, N, B)).permute(0, 2, 1)
    norm = math.log(B * dataset_size)
    log_q_joint = torch.logsumexp(log_q_pairs.sum(-1), 0) - norm   # (B_j,) log q(c_j)
    log_q_slots = torch.logsumexp(log_q_pairs, 0) - norm            # (B_j, N) log q(c_j^n)
    log_q_given_x = log_q_pairs.diagonal(dim1=0, dim2=1).T.sum(-1)  # (B_j,) log q(c_j | x_j)
    log_prior = -N * math.log(K)
    return {
        "mi": (log_q_given_x - log_q_joint).mean() / N,
        "tc": (log_q_joint - log_q_slots.sum(-1)).mean() / N,
        "dwkl": (log_q_slots.sum(-1) - log_prior).mean() / N,
    }


def usage_penalty(logits: torch.Tensor) -> torch.Tensor:
    """log K - entropy of the batch's average code distribution (per slot, averaged): 0 when the
    codes are used uniformly; penalizing it fights codebook collapse."""
    mean_q = F.softmax(logits.float(), -1).mean(0)                  # (N, K)
    entropy = -(mean_q * mean_q.clamp(min=1e-12).log()).sum(-1)
    return (math.log(logits.shape[-1]) - entropy).mean()


def posterior_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of q(c | x) per slot: penalizing it makes each grid's codes confident."""
    log_q = F.log_softmax(logits.float(), -1)
    return -(log_q.exp() * log_q).sum(-1).mean()
