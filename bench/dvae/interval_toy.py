"""Can a dVAE learn codes whose meaning follows the context's confidence? A toy with known answers, for a CPU.

    python -m bench.dvae.interval_toy [--layout interval|bounded|tunstall] [--codebook-size 64] [--contents 64]
        [--steps 2000]

Cells carry a rank (0: the context's guess, 1: its second choice, ...) and a confidence class the decoder knows,
as the adaptive context's cells do (docs/results/dvae.md, "Codes whose content depends on the context's
confidence"); each rank is drawn from its class's frequencies (CLASS_RANKS: sure cells are almost always rank 0,
torn ones often rank 1). A stream of cells is cut into codes, each with at most K contents for what the decoder
knows (--contents; the codebook may be larger, to leave VQ slack), in one of three ways:
- tunstall: a Tunstall dictionary of rank sequences fitted to the ranks' overall frequencies. A code means the
  same ranks wherever it stands, as the trained miss and pair codes do;
- interval: bench.dvae.entropy.interval_codes, each cell splitting what is left of the code's K values by its
  class's frequencies. Codes hold more cells, and a code's ranks depend on the classes it is read with;
- bounded: bench.dvae.entropy.bounded_interval_codes, model.miss_interval's layout: the same without the escape
  value (every rank keeps a value, a code ends where fewer than the ranks are left).
Each code's run of cells is one example of a small dVAE: a GRU encoder reads the run's (rank, class) cells, VQ
(as dvae/arc-vq sets it) picks one of K codes, and a GRU decoder reads the code with each cell's class and the
rank before it and predicts the rank. Reported on 4,096 fresh runs, decoded greedily (each cell reads the rank
the decoder gave the one before): runs exact, cells right, codes used; and how many cells a code holds.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.dvae.entropy import (
    bounded_interval_codes,
    interval_codes,
    tunstall_codes,
    tunstall_dictionary,
    tunstall_leaves,
)
from latentforge.nn.codebooks import build_codebook

# Each confidence class's rank frequencies, and how often the class occurs.
CLASS_RANKS = np.array([[0.97, 0.02, 0.007, 0.003],
                        [0.85, 0.10, 0.03, 0.02],
                        [0.55, 0.35, 0.07, 0.03],
                        [0.30, 0.30, 0.20, 0.20]])
CLASS_SHARE = np.array([0.5, 0.25, 0.15, 0.10])
RANKS, CLASSES = CLASS_RANKS.shape[1], CLASS_RANKS.shape[0]


def stream(cells: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`cells` cells in a row: their classes and their ranks."""
    classes = rng.choice(CLASSES, size=cells, p=CLASS_SHARE)
    ranks = (rng.random(cells)[:, None] > CLASS_RANKS[classes].cumsum(1)).sum(1).clip(max=RANKS - 1)
    return classes, ranks


def runs(layout: str, cells: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stream cut into the codes of `layout`: (runs, longest) ranks and classes, and each run's length."""
    classes, ranks = stream(cells, np.random.default_rng(seed))
    if layout == "interval":
        code, _ = interval_codes(ranks, CLASS_RANKS[classes], size)
    elif layout == "bounded":
        code = bounded_interval_codes(ranks, CLASS_RANKS[classes], size)[0]
    else:
        overall = CLASS_SHARE @ CLASS_RANKS
        code = tunstall_codes(ranks, tunstall_dictionary(overall, tunstall_leaves(size, RANKS)))
    ends = np.flatnonzero(np.diff(code)) + 1
    parts = list(zip(np.split(ranks, ends), np.split(classes, ends)))[:-1]  # the last run may be cut short
    longest = max(len(r) for r, _ in parts)
    out_ranks = torch.full((len(parts), longest), -1, dtype=torch.long)
    out_classes = torch.zeros((len(parts), longest), dtype=torch.long)
    for i, (r, c) in enumerate(parts):
        out_ranks[i, :len(r)], out_classes[i, :len(c)] = torch.from_numpy(r), torch.from_numpy(c)
    return out_ranks, out_classes, torch.tensor([len(r) for r, _ in parts])


class RunDVAE(nn.Module):
    """A run of (rank, class) cells -> one code of `size` -> its ranks, given the classes."""

    def __init__(self, size: int, dim: int = 64, split_crowded: int = 0):
        super().__init__()
        self.rank = nn.Embedding(RANKS + 1, dim)  # RANKS: before the first cell
        self.cls = nn.Embedding(CLASSES, dim)
        self.encoder = nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.to_code = nn.Linear(2 * dim, dim)
        self.codebook = build_codebook("vq", dim, size, threshold_ema_dead_code=0.2, dead_code_reset="distance",
                                       split_crowded=split_crowded)
        self.decoder = nn.GRU(3 * dim, dim, batch_first=True)
        self.head = nn.Linear(dim, RANKS)

    def encode(self, ranks: torch.Tensor, classes: torch.Tensor, lengths: torch.Tensor):
        x = self.rank(ranks.clamp(min=0)) + self.cls(classes)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.encoder(packed)
        return self.codebook(self.to_code(torch.cat([h[0], h[1]], -1)).unsqueeze(1))

    def step_logits(self, z: torch.Tensor, classes: torch.Tensor, before: torch.Tensor, state=None):
        x = torch.cat([z.expand(-1, classes.shape[1], -1), self.cls(classes), self.rank(before)], -1)
        out, state = self.decoder(x, state)
        return self.head(out), state

    def forward(self, ranks, classes, lengths):
        out = self.encode(ranks, classes, lengths)
        before = F.pad(ranks.clamp(min=0)[:, :-1], (1, 0), value=RANKS)
        logits, _ = self.step_logits(out.z, classes, before)
        return logits, out

    @torch.no_grad()
    def decode(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Greedy: each cell reads the rank given to the one before."""
        before = torch.full((len(z), 1), RANKS, dtype=torch.long)
        state, out = None, []
        for t in range(classes.shape[1]):
            logits, state = self.step_logits(z, classes[:, t:t + 1], before, state)
            before = logits.argmax(-1)
            out.append(before)
        return torch.cat(out, 1)


def train(layout: str, size: int, contents: int, steps: int, batch: int = 256, lr: float = 2e-3, split_crowded: int = 0,
          seed: int = 0) -> list[dict]:
    """Train the toy on `layout`'s runs of at most `contents` contents with a codebook of `size` (VQ restarting
    `split_crowded` live codes with a twin every step); the evaluation rows every steps // 4 steps, then the runs'
    cells per code."""
    torch.manual_seed(seed)
    ranks, classes, lengths = runs(layout, 400_000, contents, seed)
    test = tuple(t[:4096] for t in runs(layout, 60_000, contents, seed + 1))
    model = RunDVAE(size, split_crowded=split_crowded)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = []
    for step in range(1, steps + 1):
        pick = torch.randint(len(ranks), (batch,))
        longest = int(lengths[pick].max())
        r, c, n = ranks[pick, :longest], classes[pick, :longest], lengths[pick]
        logits, out = model(r, c, n)
        loss = F.cross_entropy(logits.flatten(0, 1), r.flatten(), ignore_index=-1) + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(steps // 4, 1) == 0 or step == steps:
            rows.append({"step": step, **evaluate(model, *test)})
    rows.append({"cells_per_code": float(lengths.float().mean()), "longest": int(lengths.max())})
    return rows


@torch.no_grad()
def evaluate(model: RunDVAE, ranks: torch.Tensor, classes: torch.Tensor, lengths: torch.Tensor) -> dict:
    model.eval()
    out = model.encode(ranks, classes, lengths)
    decoded = model.decode(out.z, classes)
    model.train()
    inside = ranks >= 0
    right = (decoded == ranks) & inside
    return {"runs": float((right | ~inside).all(1).float().mean()), "cells": float(right.sum() / inside.sum()),
            "codes": int(out.codes.unique().numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", default="interval", choices=["interval", "bounded", "tunstall"])
    parser.add_argument("--codebook-size", type=int, default=64)
    parser.add_argument("--contents", type=int, default=0, help="a code's contents at most (default: the codebook)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-crowded", type=int, default=0,
                        help="VQ restarts this many live codes with a twin every step (dvae/arc-vq-miss: 1)")
    args = parser.parse_args()
    contents = args.contents or args.codebook_size
    if not 2 * RANKS <= contents <= args.codebook_size or args.steps < 1:
        raise SystemExit(f"error: need {2 * RANKS} <= --contents <= --codebook-size and --steps >= 1")
    rows = train(args.layout, args.codebook_size, contents, args.steps, seed=args.seed,
                 split_crowded=args.split_crowded)
    held = rows.pop()
    print(f"{args.layout} codes of at most {contents} contents, a codebook of {args.codebook_size}: "
          f"{held['cells_per_code']:.2f} cells per code (the longest {held['longest']})")
    print("| step | runs exact | cells right | codes used |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['runs']:.3f} | {row['cells']:.4f} | {row['codes']} |", flush=True)


if __name__ == "__main__":
    main()
