"""Discrete bottlenecks behind one interface: categorical codebooks (Gumbel-softmax, ReinMax, plain softmax),
vector quantization with EMA updates, and finite scalar quantization.

A model calls `codebook(h, temperature, hardness)` on (B, N, dim) slot vectors and reads `out.z` (B, N, dim);
the task's losses read `out.logits` (categorical kinds), `out.loss` (VQ commitment) and `out.codes`.
Everything that decides a code runs in float32 with autocast off: bf16 logits or distances flip close calls
and make the chosen codes depend on the precision.
"""

from __future__ import annotations

import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize
from vector_quantize_pytorch.vector_quantize_pytorch import all_gather_sizes, all_gather_variably_sized


@dataclass
class CodebookOutput:
    z: torch.Tensor  # (B, N, D) what the decoder reads
    codes: torch.Tensor  # (B, N) int64: the chosen code of each slot (argmax / nearest)
    logits: torch.Tensor | None  # (B, N, K) raw logits (before the temperature) of categorical kinds, else None
    loss: torch.Tensor  # the codebook's own auxiliary loss (VQ commitment), scalar; 0 otherwise


def _float32(h: torch.Tensor) -> AbstractContextManager:
    """Autocast off on h's device, so the code choice is computed in float32 whatever the training precision."""
    return torch.autocast(device_type=h.device.type, enabled=False)


class Codebook(nn.Module, ABC):
    """(B, N, dim) -> CodebookOutput. `size` is the number of codes K."""

    size: int

    @abstractmethod
    def forward(self, h: torch.Tensor, temperature: float = 1.0, hardness: float = 1.0) -> CodebookOutput:
        """Slot vectors -> their codes and what the decoder reads."""

    @abstractmethod
    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) codes -> (B, N, dim) z as at evaluation: what a `decode` command feeds the decoder."""


# ----------------------------------------------------------------------------- categorical


def reinmax(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ReinMax (Liu et al. 2023, Algorithm 2): a one-hot sample of softmax(logits) whose gradient is a
    second-order (Heun) estimate instead of straight-through's first-order one. Returns (y, index): y equals
    the one-hot sample in the forward pass. The sample is drawn like the authors' package draws it
    (torch.multinomial over the flattened rows), so both give the same sample from the same random state."""
    pi0 = logits.softmax(dim=-1)
    index = torch.multinomial(pi0.reshape(-1, pi0.shape[-1]), 1, replacement=True).view(pi0.shape[:-1])
    sample = F.one_hot(index, pi0.shape[-1]).to(pi0.dtype)
    pi1 = (sample + (logits / temperature).softmax(dim=-1)) / 2
    pi1 = ((pi1.log() - logits).detach() + logits).softmax(dim=-1)
    pi2 = 2 * pi1 - pi0 / 2
    return pi2 - pi2.detach() + sample, index


class CategoricalCodebook(Codebook):
    """Logits over K codes from a linear layer; z = y @ E for a learned (K, dim) embedding E, where y is a
    relaxed one-hot in training (how it is relaxed is the subclass's `relax`) and the argmax one-hot at
    evaluation."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.size = size
        self.to_logits = nn.Linear(dim, size)
        self.embedding = nn.Embedding(size, dim)

    @abstractmethod
    def relax(self, logits: torch.Tensor, temperature: float, hardness: float) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 logits (B, N, K) -> (y (B, N, K) that carries the gradient, codes (B, N))."""

    def forward(self, h: torch.Tensor, temperature: float = 1.0, hardness: float = 1.0) -> CodebookOutput:
        with _float32(h):
            logits = F.linear(h.float(), self.to_logits.weight.float(), self.to_logits.bias.float())
            if not self.training:
                codes = logits.argmax(dim=-1)
                z = self.embed(codes)
            else:
                y, codes = self.relax(logits, temperature, hardness)
                z = y @ self.embedding.weight.float()
        return CodebookOutput(z=z, codes=codes, logits=logits, loss=logits.new_zeros(()))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embedding.weight.float())


class GumbelCodebook(CategoricalCodebook):
    """Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017). `hardness` blends the forward value from the
    soft sample (0) to its one-hot argmax (1, straight-through); the gradient is always the soft sample's."""

    def relax(self, logits: torch.Tensor, temperature: float, hardness: float) -> tuple[torch.Tensor, torch.Tensor]:
        gumbels = -torch.empty_like(logits).exponential_().log()
        y_soft = ((logits + gumbels) / temperature).softmax(dim=-1)
        codes = y_soft.argmax(dim=-1)
        y_hard = F.one_hot(codes, self.size).to(y_soft.dtype)
        return y_soft + hardness * (y_hard - y_soft).detach(), codes


class ReinMaxCodebook(CategoricalCodebook):
    """ReinMax: one-hot samples in the forward pass, so `hardness` does not apply."""

    def relax(self, logits: torch.Tensor, temperature: float, hardness: float) -> tuple[torch.Tensor, torch.Tensor]:
        return reinmax(logits, temperature)


class SoftmaxCodebook(CategoricalCodebook):
    """softmax(logits / temperature) with no sampling: the deterministic ablation of the categorical kinds."""

    def relax(self, logits: torch.Tensor, temperature: float, hardness: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = (logits / temperature).softmax(dim=-1)
        return y, y.argmax(dim=-1)


# ----------------------------------------------------------------------------- VQ and FSQ


class VQCodebook(Codebook):
    """Nearest-neighbour vector quantization (van den Oord et al. 2017) by vector-quantize-pytorch: codes move
    by EMA of the vectors assigned to them (no gradient), start from k-means on the first batch, and a code whose
    EMA usage falls below `threshold_ema_dead_code` is replaced by a vector of the current batch. `loss` is the
    commitment loss times `commitment_weight`. `rotation_trick` (the package's default) carries the gradient
    to h by the rotation trick (Fifty et al. 2024) instead of straight-through; the forward value is the same.
    `codebook_dim` < dim looks codes up in a projected space (the package's in/out projections), and
    `cosine` by cosine similarity on the unit sphere (ViT-VQGAN's low-dimensional, l2-normalised codes).
    `dead_code_reset`: uniform (the package's) restarts a dead code on any vector of the batch; distance draws
    it in proportion to the vector's squared distance to its nearest code (k-means++'s seeding rule).
    `split_crowded` > 0 (with the distance reset): every training step also restarts that many live codes that
    have a twin (restart_codes): where one pattern holds two codes, one of them moves to where two patterns share
    one."""

    def __init__(self, dim: int, size: int, decay: float = 0.99, commitment_weight: float = 0.25,
                 threshold_ema_dead_code: float = 2.0, kmeans_iters: int = 10, codebook_dim: int | None = None,
                 rotation_trick: bool = True, cosine: bool = False, dead_code_reset: str = "uniform",
                 split_crowded: int = 0):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"vq decay must be in (0, 1) (got {decay})")
        if dead_code_reset not in ("uniform", "distance"):
            raise ValueError(f"vq dead_code_reset must be uniform or distance (got {dead_code_reset!r})")
        if not 0 <= split_crowded < size:
            raise ValueError(f"vq split_crowded must be in [0, {size}) (got {split_crowded})")
        if split_crowded and (dead_code_reset != "distance" or threshold_ema_dead_code <= 0):
            raise ValueError("vq split_crowded moves codes by the distance draw of the dead-code reset: set "
                             "dead_code_reset=distance and threshold_ema_dead_code > 0")
        self.size = size
        self.vq = VectorQuantize(dim=dim, codebook_size=size, codebook_dim=codebook_dim, decay=decay,
                                 commitment_weight=commitment_weight, kmeans_init=True, kmeans_iters=kmeans_iters,
                                 threshold_ema_dead_code=threshold_ema_dead_code, rotation_trick=rotation_trick,
                                 use_cosine_sim=cosine)
        if dead_code_reset == "distance":
            # The package draws a dead code's new vector with this function (its replace_sample_fn).
            self.vq._codebook.replace_sample_fn = functools.partial(far_from_codes, self.vq._codebook)
        if split_crowded:
            # The package restarts codes in this method of its codebook; ours adds the crowded ones.
            self.vq._codebook.expire_codes_ = functools.partial(restart_codes, self.vq._codebook, split_crowded)

    # The package's k-means start and dead-code resets are data-dependent in-place updates that inductor fails
    # to partition, so under train.compile the lookup runs eagerly between the compiled encoder and decoder.
    @torch.compiler.disable
    def forward(self, h: torch.Tensor, temperature: float = 1.0, hardness: float = 1.0) -> CodebookOutput:
        with _float32(h):
            z, codes, loss = self.vq(h.float())
        return CodebookOutput(z=z, codes=codes.long(), logits=None, loss=loss)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.get_output_from_indices(codes)


def restart_codes(codebook: nn.Module, crowded: int, batch_samples: torch.Tensor,
                  seq_mask: torch.Tensor | None = None) -> None:
    """The package's dead-code reset (its codebook's expire_codes_), plus `crowded` live codes that each have a twin.
    EMA codes settle where the batch's vectors are dense: a frequent pattern keeps several codes alive, close
    together, while rare patterns that lie near one another share one code, which no decoder can then tell apart
    (bench/dvae/misses.py: ARC's rarest runs, the same length in different colours). A dead-code reset never moves
    a live twin. So every step the closest pair of live codes gives up its less used code (then the next closest
    pair without it, and so on), which the distance draw (far_from_codes) moves to where the batch lies farthest
    from its codes; its old vectors go to the twin left behind. The choice depends on the codebook alone, so
    processes kept in sync choose alike."""
    if not codebook.training:
        return
    expired = codebook.cluster_size < codebook.threshold_ema_dead_code
    for head, embed in enumerate(codebook.embed):
        # Exact distances: near twins are what is ranked, and cdist's matmul path rounds them away.
        gaps = torch.cdist(embed.float(), embed.float(), compute_mode="donot_use_mm_for_euclid_dist")
        gaps.fill_diagonal_(torch.inf)
        gaps[expired[head]] = torch.inf  # a dead code restarts anyway and is nobody's twin
        gaps[:, expired[head]] = torch.inf
        for _ in range(crowded):
            pair = divmod(int(gaps.argmin()), gaps.shape[1])
            if gaps[pair].isinf():
                break
            moved = min(pair, key=lambda code: float(codebook.cluster_size[head, code]))
            expired[head, moved] = True
            gaps[moved] = gaps[:, moved] = torch.inf
    codebook.replace(batch_samples.flatten(1, -2), batch_mask=expired, seq_mask=seq_mask)


def far_from_codes(codebook: nn.Module, samples: torch.Tensor, count: int) -> torch.Tensor:
    """(1, n, d) batch vectors -> (1, count, d) of them by k-means++'s seeding: each draw in proportion to the
    vector's squared distance to the nearest of `codebook.embed`'s codes and of the vectors drawn before it.
    A vector that shares a code with other patterns lies far from it; one that has its own code lies on it.
    So a dead code restarts where the codebook serves the batch worst, instead of (drawn uniformly, as the
    batch's frequent patterns mostly are) beside a code that is already in use, where the two split one
    pattern and one of them dies again (bench.dvae.dictionary: every run of its 200-pattern toy back,
    against 99.6% drawn uniformly). Once every vector is drawn (count > n), the rest repeat them uniformly.
    Where the package keeps one codebook in sync across several processes (it does when the model is built
    after torch.distributed starts, as the engine builds it), every process resets the same codes at once:
    the draw is then over all their vectors, made by the first process and the same everywhere."""
    synced = codebook.all_reduce_fn is torch.distributed.all_reduce  # the package's flag: several processes
    vectors = samples[0].contiguous()
    if synced:
        vectors = torch.cat(all_gather_variably_sized(vectors, all_gather_sizes(vectors, dim=0).tolist()))
    picks = torch.zeros(count, dtype=torch.long, device=vectors.device)
    if not synced or torch.distributed.get_rank() == 0:
        points = vectors.float()
        nearest = torch.cdist(points, codebook.embed[0].float()).min(-1).values.square()
        for i in range(count):
            picks[i:i + 1] = torch.multinomial(nearest + 1e-12, 1)
            nearest = torch.minimum(nearest, (points - points[picks[i:i + 1]]).square().sum(-1))
    if synced:
        torch.distributed.broadcast(picks, src=0)
    return vectors[picks].unsqueeze(0)


# Levels of FSQ are chosen near the paper's (5 to 8 per dimension): a level's cost is its distance from that
# band in octaves; a level of 2 needs the package's symmetric variant and larger ones waste dimensions.
_FSQ_BAND = (5, 8)
_FSQ_LEVEL_RANGE = range(3, 17)


def default_fsq_levels(size: int) -> list[int]:
    """Levels whose product is `size`, each in 3..16 and as close to 5..8 as possible (fewest levels on ties)."""

    def factorizations(rest: int, largest: int) -> Iterator[list[int]]:
        if rest == 1:
            yield []
        for level in range(min(largest, rest), _FSQ_LEVEL_RANGE.start - 1, -1):
            if rest % level == 0:
                yield from ([level] + tail for tail in factorizations(rest // level, level))

    def cost(levels: list[int]) -> tuple[float, int]:
        low, high = _FSQ_BAND
        return sum(max(0.0, math.log2(low / level), math.log2(level / high)) for level in levels), len(levels)

    options = list(factorizations(size, _FSQ_LEVEL_RANGE.stop - 1))
    if not options:
        raise ValueError(f"fsq cannot factor a codebook of {size} codes into levels of "
                         f"{_FSQ_LEVEL_RANGE.start}..{_FSQ_LEVEL_RANGE.stop - 1}: give levels explicitly")
    return min(options, key=cost)


class FSQCodebook(Codebook):
    """Finite scalar quantization (Mentzer et al. 2023) by vector-quantize-pytorch: project dim -> len(levels),
    bound and round each coordinate to its level, project back (the package's own projections). The codes are
    the package's indices, K = prod(levels); no codebook to collapse and no auxiliary loss."""

    def __init__(self, dim: int, size: int, levels: list[int] | None = None):
        super().__init__()
        levels = list(levels) if levels is not None else default_fsq_levels(size)
        if any(level < 3 for level in levels):
            raise ValueError(f"fsq levels must each be >= 3 (got {levels})")
        if math.prod(levels) != size:
            raise ValueError(f"fsq levels {levels} give {math.prod(levels)} codes, not the {size} asked for")
        self.size = size
        self.levels = levels
        self.fsq = FSQ(levels=levels, dim=dim)

    def forward(self, h: torch.Tensor, temperature: float = 1.0, hardness: float = 1.0) -> CodebookOutput:
        with _float32(h):
            z, codes = self.fsq(h.float())
        return CodebookOutput(z=z, codes=codes.long(), logits=None, loss=z.new_zeros(()))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        with _float32(codes):
            return self.fsq.indices_to_codes(codes)


CODEBOOKS: dict[str, type[Codebook]] = {
    "gumbel": GumbelCodebook,
    "reinmax": ReinMaxCodebook,
    "softmax": SoftmaxCodebook,
    "vq": VQCodebook,
    "fsq": FSQCodebook,
}


def build_codebook(kind: str, dim: int, size: int, **options) -> Codebook:
    """The codebook `kind` for (B, N, dim) inputs with `size` codes; `options` are the kind's own keywords."""
    if kind not in CODEBOOKS:
        raise ValueError(f"unknown codebook kind {kind!r} (kinds: {', '.join(CODEBOOKS)})")
    if dim < 1 or size < 2:
        raise ValueError(f"a codebook needs dim >= 1 and size >= 2 (got dim={dim}, size={size})")
    cls = CODEBOOKS[kind]
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "dim", "size")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for codebook {kind!r} "
                         f"(its options: {', '.join(accepted) or 'none'})")
    return cls(dim, size, **options)
