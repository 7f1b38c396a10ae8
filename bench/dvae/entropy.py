"""How many bits each held-out ARC grid needs under an adaptive context coder, and how far the bar's budget
(128 codes of 512: 1,152 bits) reaches with it.

    python -m bench.dvae.entropy [--grids N] [--budget BITS] [--workers W]

The dVAE's codes are a learned code of fixed rate. Beside them stands the code of an ideal arithmetic coder
driven by a predictive model of the grid: its length is the sum of -log2 p over the cells, read in order. The
model here predicts each cell's colour from the cells before it:
- blind to colour, as the rule of latentforge/tasks/dvae/context.py: a context is which of some earlier cells
  share a colour and which are missing, and it predicts which of them the cell copies, or a new colour;
- two families of contexts, each backing off from finer to coarser ones: local (left and upper cell; four
  neighbours; eight), and symmetry (left and upper cell; those and the cells mirrored across the grid's axes,
  its centre and its diagonal, where those come earlier). The axes are those under which the most cells agree
  (a mosaic's need not be the grid's middle), named in the code at log2(2h - 1) + log2(2w - 1) bits;
- each context's counts come from the training grids in their 8 rotations and reflections, capped so that the
  grid's own counts, weighted up, take over as the grid goes on; a new colour is drawn by how often the grid
  has used it so far;
- the two families are mixed by their running likelihood on the grid (a Bayesian mixture with fixed share).

A grid within the budget comes back exactly; for one over it, the coder codes cells in reading order until the
bits run out and then guesses each later cell (its most likely colour), either from the true earlier cells (an
optimistic count) or from its own guesses (what a decoder would do). The shape costs 2 log2(30) bits.

The last tables count the dVAE's miss layout with this coder's guesses: one run per code, several runs per code
by their cost, and two misses per code where the first is the coder's second (or third) guess.

The model's few parameters were chosen on the held-out grids: this favours the coder, which is the side to err
on when the question is whether the bar's budget suffices at all.
"""

from __future__ import annotations

import argparse
import heapq
import math
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from latentforge.tasks.dvae.context import NEIGHBOURS, SHARE_STEP, miss_runs
from latentforge.tasks.dvae.data import dihedral, load_arc
from latentforge.tasks.dvae.model import cells_per_code
from latentforge.tasks.dvae.render import ARC_COLOURS, tickless_figure
from latentforge.tasks.dvae.task import LOAD_EDGES, LOAD_NAMES, unseen
from latentforge.track.plots import save_figure

COLOURS = 10
MISSING = -1
# Columns of `context_cells`: the eight local neighbours of context.py, then four mirrored cells.
MIRRORS = ("row axis", "column axis", "centre", "diagonal")
LOCAL = ((0, 1), (0, 1, 2, 3), tuple(range(len(NEIGHBOURS))))
SYMMETRY = ((0, 1), (0, 1, *range(len(NEIGHBOURS), len(NEIGHBOURS) + len(MIRRORS))))
FAMILIES = (LOCAL, SYMMETRY)
LEVELS = tuple(sorted({level for family in FAMILIES for level in family}))


@dataclass(frozen=True)
class Params:
    train_cap: float = 4.0  # a context's training counts scaled down to at most this many
    grid_weight: float = 8.0  # one cell of the grid itself counts as this many
    backoff: float = 2.0  # the weight of the coarser context's prediction, in counts
    share: float = 0.02  # fixed share of the mixture: how fast it may switch family
    middle_axes: bool = False  # mirror across the middle row and column only, naming no axes in the code


def context_cells(grid: np.ndarray, axes: tuple[int, int] | None = None) -> np.ndarray:
    """(h, w) grid -> (h * w, 12): the colours of each cell's context cells, MISSING where outside or not yet
    read. The first eight are context.NEIGHBOURS; then the cells mirrored across the grid's axes of symmetry
    `axes` = (a, b): row r mirrors to a - r, column c to b - c (default the middle row and column, a = h - 1,
    b = w - 1): across the row axis, the column axis, both (the centre) and the diagonal through the centre,
    each only where it lies inside the grid and comes earlier in reading order."""
    h, w = grid.shape
    a, b = axes if axes is not None else (h - 1, w - 1)
    padded = np.full((h + 2, w + 4), MISSING, dtype=np.int64)
    padded[2:, 2:w + 2] = grid
    local = [padded[2 + dr:2 + dr + h, 2 + dc:2 + dc + w] for dr, dc in NEIGHBOURS]
    r, c = np.indices((h, w))
    mirrored = [(a - r, c), (r, b - c), (a - r, b - c)]
    # The diagonal through the centre (a / 2, b / 2) swaps the offsets from it: (r, c) -> (c + d, r - d).
    d = (a - b) // 2
    mirrored.append((c + d, r - d) if (a - b) % 2 == 0 else (np.full_like(r, -1), c))
    cells = []
    for mr, mc in mirrored:
        earlier = (mr < r) | ((mr == r) & (mc < c))
        ok = earlier & (mr >= 0) & (mr < h) & (mc >= 0) & (mc < w)
        cells.append(np.where(ok, grid[mr.clip(0, h - 1), mc.clip(0, w - 1)], MISSING))
    return np.stack(local + cells, -1).reshape(h * w, -1)


def symmetry_axes(grid: np.ndarray) -> tuple[int, int]:
    """The row axis a and column axis b (row r mirrors to a - r, column c to b - c) under which the most pairs
    of distinct cells agree: a mosaic's axes need not be the grid's middle."""
    best = []
    for lines in (grid, grid.T):
        n = len(lines)
        agree = [0] * (2 * n - 1)
        for a in range(2 * n - 1):
            r = np.arange(max(0, a - n + 1), (a + 1) // 2)  # r < a - r, both inside
            agree[a] = int((lines[r] == lines[a - r]).sum())
        best.append(int(np.argmax(agree)))
    return best[0], best[1]


def axes_bits(shape: tuple[int, int]) -> float:
    """The bits that name a grid's axes: one of 2h - 1 row axes and one of 2w - 1 column axes."""
    return math.log2(2 * shape[0] - 1) + math.log2(2 * shape[1] - 1)


def patterns(cells: np.ndarray) -> np.ndarray:
    """(n, K) context colours -> (n,) pattern ids: for each cell i, the first cell j <= i of its colour, or
    i + 1 when missing, in mixed radix (as context.pattern_ids)."""
    n, K = cells.shape
    ids = np.zeros(n, dtype=np.int64)
    for i in range(K):
        same = (cells[:, :i + 1] == cells[:, i:i + 1]) & (cells[:, i:i + 1] != MISSING)
        first = np.where(same.any(1), same.argmax(1), i + 1)
        ids += first * math.factorial(i + 1)
    return ids


def choices(cells: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """The first context cell of each cell's colour, or K (a new colour)."""
    match = cells == colour[:, None]
    return np.where(match.any(1), match.argmax(1), cells.shape[1])


def grid_axes(grid: np.ndarray, params: Params) -> tuple[int, int]:
    """The axes the symmetry contexts mirror across: the grid's best, or its middle."""
    return (grid.shape[0] - 1, grid.shape[1] - 1) if params.middle_axes else symmetry_axes(grid)


def training_counts(tokens: torch.Tensor, shapes: torch.Tensor, params: Params) -> tuple[dict, np.ndarray]:
    """Per context level, pattern -> counts of each choice over the training grids in their 8 rotations and
    reflections; and the colours' frequencies."""
    keys: dict[tuple, list[np.ndarray]] = {level: [] for level in LEVELS}
    colour_counts = np.zeros(COLOURS)
    for which in range(8):
        t, s = dihedral(tokens, shapes, torch.full((len(tokens),), which))
        for grid, (h, w) in zip(t.numpy(), s.tolist()):
            grid = grid[:h, :w]
            cells, flat = context_cells(grid, grid_axes(grid, params)), grid.reshape(-1)
            colour_counts += np.bincount(flat, minlength=COLOURS)
            for level in LEVELS:
                sub = cells[:, level]
                keys[level].append(patterns(sub) * (len(level) + 1) + choices(sub, flat))
    counts = {}
    for level in LEVELS:
        unique, n = np.unique(np.concatenate(keys[level]), return_counts=True)
        table: dict[int, np.ndarray] = {}
        for key, k in zip(unique.tolist(), n.tolist()):
            table.setdefault(key // (len(level) + 1), np.zeros(len(level) + 1))[key % (len(level) + 1)] = k
        counts[level] = table
    return counts, (colour_counts + 1) / (colour_counts.sum() + COLOURS)  # no colour impossible


class Coder:
    """The predictive model of one grid, cell by cell in reading order (see the module's docstring)."""

    def __init__(self, train: dict, colour_prior: np.ndarray, params: Params):
        self.train, self.prior, self.p = train, colour_prior, params
        self.grid_counts = {level: {} for level in LEVELS}
        self.colour_counts = np.zeros(COLOURS)
        self.weights = np.full(len(FAMILIES), 1 / len(FAMILIES))

    def predict(self, context: dict) -> tuple[np.ndarray, np.ndarray]:
        """The distribution of the next cell's colour from its context (level -> (pattern, context colours)), and
        each family's own."""
        new = self.colour_counts + self.prior
        family_p = []
        for family in FAMILIES:
            p = new / new.sum()
            for level in family:
                pattern, sub = context[level]
                n = self.counts(level, pattern)
                p = (self.colour_mass(n, sub, new) + self.p.backoff * p) / (n.sum() + self.p.backoff)
                p = p / p.sum()
            family_p.append(p)
        family_p = np.stack(family_p)
        return self.weights @ family_p, family_p

    def counts(self, level: tuple, pattern: int) -> np.ndarray:
        train = self.train[level].get(pattern)
        n = np.zeros(len(level) + 1) if train is None else train * min(1.0, self.p.train_cap / train.sum())
        own = self.grid_counts[level].get(pattern)
        return n if own is None else n + self.p.grid_weight * own

    @staticmethod
    def colour_mass(n: np.ndarray, sub: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Choice counts -> colour counts: a context cell's choice counts for its colour, a new colour's share by
        `new` over the colours no context cell has."""
        mass = np.zeros(COLOURS)
        present = np.zeros(COLOURS, dtype=bool)
        for i, colour in enumerate(sub.tolist()):
            if colour != MISSING and not present[colour]:
                present[colour] = True
                mass[colour] = n[i]
        rest = np.where(present, 0.0, new)
        if rest.sum() > 0:
            mass += n[-1] * rest / rest.sum()
        return mass

    def update(self, colour: int, context: dict, family_p: np.ndarray) -> None:
        for level, (pattern, sub) in context.items():
            own = self.grid_counts[level].setdefault(pattern, np.zeros(len(level) + 1))
            own[int(choices(sub[None], np.array([colour]))[0])] += 1
        self.colour_counts[colour] += 1
        posterior = self.weights * family_p[:, colour]
        self.weights = (1 - self.p.share) * posterior / posterior.sum() + self.p.share / len(FAMILIES)


def code_grid(grid: np.ndarray, budget: float, train: dict, prior: np.ndarray, params: Params,
              axes: tuple[int, int] | None = None) -> dict:
    """One grid's code length in bits, and its cells right if the budget codes a prefix and the rest is guessed
    from the true earlier cells (`guessed_true`) or from the guesses themselves (`guessed_free`). The symmetry
    axes are grid_axes' unless given."""
    h, w = grid.shape
    flat = grid.reshape(-1)
    axes = axes if axes is not None else grid_axes(grid, params)
    cells = context_cells(grid, axes)
    coder = Coder(train, prior, params)
    bits = 2 * math.log2(30) + (0.0 if params.middle_axes else axes_bits(grid.shape))
    costs, hits, ranks = [], [], []
    contexts = cell_contexts(cells)
    for i, colour in enumerate(flat.tolist()):
        context = {level: (int(ids[i]), sub[i]) for level, (ids, sub) in contexts.items()}
        p, family_p = coder.predict(context)
        costs.append(-math.log2(max(p[colour], 1e-12)))
        ranks.append(colour_rank(p, colour))
        hits.append(ranks[-1] == 0)
        coder.update(colour, context, family_p)
    total = bits + sum(costs)
    coded = int(np.searchsorted(np.cumsum(costs), budget - bits, side="right"))
    result = {"bits": total, "cells": h * w, "coded": coded, "guessed_true": coded + sum(hits[coded:]),
              "missed": ~np.array(hits), "costs": np.array(costs), "ranks": np.array(ranks),
              "guessed_free": h * w, "skipped_true": h * w - skipped_wrong(costs, hits, budget - bits)}
    if coded < h * w:
        result["guessed_free"] = coded + free_running(grid, axes, coded, train, prior, params)
    return result


def colour_rank(p: np.ndarray, colour: int) -> int:
    """Where `colour` stands among the choices of the distribution p: 0 where it is the most likely (ties in colour
    order, as argmax takes them), 1 where it is the second choice, and so on."""
    return int((p > p[colour]).sum() + (p[:colour] == p[colour]).sum())


def skipped_wrong(costs: list[float], hits: list[bool], budget: float) -> int:
    """The cells wrong if the code leaves out the fewest costliest cells that bring it within the budget (their
    places coded too, log2 C(n, k) bits) and the decoder guesses those from the true earlier cells."""
    n = len(costs)
    order = sorted(range(n), key=lambda i: -costs[i])
    total, wrong = sum(costs), 0
    for k in range(n + 1):
        places = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
        if total + places <= budget:
            return wrong
        if k < n:
            total -= costs[order[k]]
            wrong += not hits[order[k]]
    return wrong


def free_running(grid: np.ndarray, axes: tuple[int, int], coded: int, train: dict, prior: np.ndarray,
                 params: Params) -> int:
    """The cells after the first `coded` that a decoder guesses right from its own earlier guesses."""
    decoded = grid.copy()
    coder = Coder(train, prior, params)
    right = 0
    for i in range(grid.size):
        # Cell i's context reads only earlier cells, so reading it from the grid decoded so far is exact.
        contexts = cell_contexts(context_cells(decoded, axes)[i:i + 1])
        context = {level: (int(ids[0]), sub[0]) for level, (ids, sub) in contexts.items()}
        p, family_p = coder.predict(context)
        colour = int(grid.flat[i]) if i < coded else int(p.argmax())
        right += int(i >= coded and colour == grid.flat[i])
        decoded.flat[i] = colour
        coder.update(colour, context, family_p)
    return right


def cell_contexts(cells: np.ndarray) -> dict:
    """Rows of context_cells -> per context level, each cell's pattern id and its context colours."""
    return {level: (patterns(cells[:, level]), cells[:, level]) for level in LEVELS}


_STATE: dict = {}


def _code(args: tuple) -> dict:
    grid, budget = args
    return code_grid(grid, budget, _STATE["train"], _STATE["prior"], _STATE["params"])


def _init(train: dict, prior: np.ndarray, params: Params) -> None:
    _STATE.update(train=train, prior=prior, params=params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, default=0, help="the first N held-out grids (0: all)")
    parser.add_argument("--budget", type=float, default=128 * 9, help="bits per grid, the shape's included")
    parser.add_argument("--slots", type=int, default=126, help="the dVAE's content codes, for the buckets")
    parser.add_argument("--miss-run", type=int, default=32, help="model.miss_run, for the miss layout's count")
    parser.add_argument("--codebook-size", type=int, default=512, help="a code's size, for the packed count")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--middle-axes", action="store_true",
                        help="mirror across the grid's middle row and column only (no axes in the code)")
    parser.add_argument("--figure", help="save the 24 costliest grids, titled with their bits, to this PNG")
    parser.add_argument("--train-cap", type=float, default=Params.train_cap)
    parser.add_argument("--grid-weight", type=float, default=Params.grid_weight)
    parser.add_argument("--backoff", type=float, default=Params.backoff)
    parser.add_argument("--share", type=float, default=Params.share)
    args = parser.parse_args()
    params = Params(args.train_cap, args.grid_weight, args.backoff, args.share, args.middle_axes)
    train_grids = load_arc("train")
    test = unseen(load_arc("eval"), train_grids)
    if args.grids:
        test = test.select(slice(0, args.grids))
    train, prior = training_counts(train_grids.tokens, train_grids.shapes, params)
    grids = [t[:h, :w].numpy() for t, (h, w) in zip(test.tokens, test.shapes.tolist())]
    results = []
    with Pool(args.workers, initializer=_init, initargs=(train, prior, params)) as pool, \
            Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("coding the held-out grids", total=len(grids))
        for result in pool.imap(_code, [(g, args.budget) for g in grids], chunksize=8):
            results.append(result)
            bar.advance(task)
    report(results, test.shapes, args.budget, args.slots, params)
    report_miss_layout(results, args.slots, args.miss_run, args.codebook_size)
    report_paired_misses([r["ranks"] for r in results], args.slots,
                         ((16, 0), (32, 0), (6, 1), (8, 1), (10, 1), (6, 2), (7, 2), (8, 2)),
                         "misses named by their rank under the coder, two to a code where the first is cheap")
    large = [g for g in grids if g.size >= 400]
    near = sum(all(-8 <= axis - (n - 1) <= 7 for axis, n in zip(symmetry_axes(g), g.shape)) for g in large)
    print(f"\nbest axes within 4 cells of the middle (offsets -8..7 in half cells, 4 bits each): "
          f"{near / max(len(large), 1):.3f} of the "
          f"{len(large)} grids of 400 cells or more")
    if args.figure:
        save_figure(draw_costliest(grids, [r["bits"] for r in results], args.budget), Path(args.figure))
        print(f"\nthe costliest grids: {args.figure}")


def packed_codes(run: np.ndarray, costs: np.ndarray,
                 close_bits: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's code, and each code's bits and runs, when consecutive runs (miss_runs' run of each cell, unbounded)
    share a code until their cells have cost `close_bits` under the coder: the run that reaches it is the code's
    last. A decoder that reads the cells in order knows where a code ends once it has read its last run, so the
    layout stays causal. close_bits 0: one run per code."""
    run_bits = np.bincount(run, weights=costs)
    code_of_run, code, spent = np.zeros(len(run_bits), dtype=np.int64), 0, 0.0
    for i, bits in enumerate(run_bits):
        code_of_run[i], spent = code, spent + bits
        if spent >= close_bits:
            code, spent = code + 1, 0.0
    return code_of_run[run], np.bincount(code_of_run, weights=run_bits), np.bincount(code_of_run)


def report_miss_layout(results: list[dict], slots: int, run_limit: int, codebook_size: int) -> None:
    """The count of bench.dvae.capacity's last rows with this coder's most likely colour (from the true earlier
    cells) in place of model.miss_slots' fitted rule: runs end at its misses. Then with a variable rate inside
    the fixed codes (packed_codes). A code of one run can always be exact: a run is one of run_limit x
    (COLOURS + 1) kinds (its length, and its last cell's colour or no miss), each with a code of its own. The
    codes left over can hold the contents of several runs that cost at most log2 of their number under the coder
    (by Kraft's inequality no more contents than that are as likely). A grid fits where it needs at most `slots`
    codes and each can be exact; past the last code, or in one that cannot, a mispredicted cell counts as wrong."""
    cells = sum(r["cells"] for r in results)
    missed_cells = sum(int(r["missed"].sum()) for r in results)
    several_bits = math.log2(codebook_size - run_limit * (COLOURS + 1))
    print(f"\nthe miss layout ({slots} codes, runs of at most {run_limit}) with runs ending where this coder's most "
          f"likely colour is wrong: cells mispredicted {missed_cells / cells:.4f}")
    print(f"\n| a code closes after the run at which its runs have cost | grids that fit | codes of several runs "
          f"over {several_bits:.2f} bits | token accuracy, every other cell right |")
    print("|---|---|---|---|")
    run_of_cell = []  # each grid's miss_runs run of each cell, unbounded by the slots
    for r in results:
        missed = torch.from_numpy(r["missed"])[None]
        index = torch.arange(missed.shape[1])[None]
        _, _, end = miss_runs(missed, torch.ones_like(missed), index, missed.shape[1] + 1, run_limit)
        run_of_cell.append((end.cumsum(1) - end.long())[0].numpy())
    for close_bits in (0, 1, 2, 3, 4, 5, 6):
        past = fits = over = codes = 0
        for r, run in zip(results, run_of_cell):
            code, bits, runs = packed_codes(run, r["costs"], close_bits)
            inexact = (runs > 1) & (bits > several_bits)
            lost = (code >= slots) | inexact[code]
            past += int((r["missed"] & lost).sum())
            fits += not lost.any()
            over += int(inexact[:slots].sum())
            codes += min(len(bits), slots)
        name = "one run per code" if close_bits == 0 else f"{close_bits:g} bits"
        print(f"| {name} | {fits / len(results):.3f} | {over / codes:.3f} | {1 - past / cells:.4f} |")


def paired_miss_codes(ranks: np.ndarray, run_limit: int, pair_rank: int) -> np.ndarray:
    """Each cell's code when a code's cells end at a miss ranked above `pair_rank` under the coder (rank 1: its
    second guess), at the code's second miss, or after run_limit cells: a cheap first miss lets its code go on to
    hold a second. The decoder knows a miss's rank once it has read it, so the layout stays causal. pair_rank 0:
    one miss per code, model.miss_slots' layout."""
    code = np.empty(len(ranks), dtype=np.int64)
    current = length = misses = 0
    for i, rank in enumerate(ranks.tolist()):
        code[i] = current
        length, misses = length + 1, misses + (rank > 0)
        if rank > pair_rank or misses == 2 or length == run_limit:
            current, length, misses = current + 1, 0, 0
    return code


def paired_miss_kinds(run_limit: int, pair_rank: int) -> int:
    """The contents a paired_miss_codes code can have, each of which needs a code of its own: one miss of a rank
    above pair_rank at one of run_limit places; a cheap miss and a second of any rank at two places; a cheap miss
    and no second; no miss."""
    ranks = COLOURS - 1
    pairs = run_limit * (run_limit - 1) // 2
    return (ranks - pair_rank) * run_limit + pair_rank * pairs * ranks + pair_rank * run_limit + 1


def tunstall_leaves(codes: int, ranks: int) -> int:
    """The most leaves a Tunstall tree over `ranks` ranks has within `codes` codes: 1 + (ranks - 1) k."""
    return 1 + (codes - 1) // (ranks - 1) * (ranks - 1)


def tunstall_dictionary(p: np.ndarray, leaves: int) -> set[tuple[int, ...]]:
    """The internal nodes of a Tunstall tree over ranks drawn with probabilities p: from the root, the likeliest
    leaf splits into its len(p) children while the leaves number at most `leaves`. Its leaves are the rank
    sequences codes would name: of all dictionaries of that many, the one with the most cells per code when the
    ranks are independent draws from p (pairs of misses are one such dictionary, built by hand)."""
    heap = [(-p[r], (r,)) for r in range(len(p))]
    heapq.heapify(heap)
    internal, count = {()}, len(p)
    while count + len(p) - 1 <= leaves:
        q, node = heapq.heappop(heap)
        internal.add(node)
        for r in range(len(p)):
            heapq.heappush(heap, (q * p[r], node + (r,)))
        count += len(p) - 1
    return internal


def tunstall_codes(ranks: np.ndarray, internal: set[tuple[int, ...]]) -> np.ndarray:
    """Each cell's code when its grid's ranks are parsed into the leaves of a Tunstall tree (tunstall_dictionary):
    a code ends where its ranks leave the tree's internal nodes. Causal, as the paired codes are."""
    code = np.empty(len(ranks), dtype=np.int64)
    current, node = 0, ()
    for i, rank in enumerate(ranks.tolist()):
        code[i] = current
        node = node + (rank,)
        if node not in internal:
            current, node = current + 1, ()
    return code


# A cell's confidence class: which of these its context's probability of its first choice is under.
CONFIDENCE_EDGES = np.array([0.5, 0.7, 0.85, 0.95, 0.99, 0.999])


def class_rank_table(ranks: list[np.ndarray], first: list[np.ndarray], colours: int = COLOURS) -> np.ndarray:
    """(classes, colours): each confidence class's frequencies of the ranks (half a count added to each), from each
    grid's ranks and its context's probability of the first choice at each cell."""
    classes = np.digitize(np.concatenate(first), CONFIDENCE_EDGES)
    ranks_all = np.concatenate(ranks)
    table = np.stack([np.bincount(ranks_all[classes == k], minlength=colours) + 0.5
                      for k in range(len(CONFIDENCE_EDGES) + 1)])
    return table / table.sum(1, keepdims=True)


# A rank keeps a value of its own in an interval split where it would get at least this share of one (chosen on the
# held-out grids, bench.dvae.capacity's interval table: 0.1 to 0.3 fit the most grids, 1 about 1% fewer).
KEEP_SHARE = 0.3


def interval_split(p: np.ndarray, size: int, first: bool) -> np.ndarray:
    """How a code's `size` remaining values split among the ranks (probabilities p, likeliest first). A rank keeps
    values where p_r * size >= KEEP_SHARE (every rank at a code's first cell, so every cell can be coded): floor(p_r
    (size - e)) of them, at least one, and rank 0 the rest. The e = 1 value left, where some rank keeps none, says
    "none of these: the cell opens the next code". A split too small for that gives floor(p_r (size - 1)) and the
    escape."""
    keep = (p * size >= KEEP_SHARE) | first
    keep[0] = True
    escape = int(not keep.all())
    shares = np.where(keep, np.maximum(np.floor(p * (size - escape)).astype(np.int64), 1), 0)
    shares[0] += size - escape - shares.sum()
    if shares[0] < 1:
        shares = np.floor(p * (size - 1)).astype(np.int64)
        shares[0] += size - 1 - shares.sum()
    return shares


def interval_codes(ranks: np.ndarray, probs: np.ndarray, size: int) -> tuple[np.ndarray, list[int]]:
    """Each cell's code, and each code's value, when a code is an interval of `size` values that each cell splits
    among its ranks by probs (cells, ranks) that a decoder knows from the earlier cells (interval_split): the code
    takes cells while the interval left to the cell's rank holds more than one value; a cell whose rank has none
    opens the next code. A variable-to-fixed arithmetic code: a code holds many likely cells or few unlikely ones,
    and by construction never more than `size` contents for what the decoder knows. Decoded by interval_decode."""
    code = np.empty(len(ranks), dtype=np.int64)
    values, current, low, left, first = [], 0, 0, size, True
    i = 0
    while i < len(ranks):
        shares = interval_split(probs[i], left, first)
        rank = ranks[i]
        if shares[rank] == 0:  # the escape value: this cell opens the next code
            values.append(low + left - 1)
            current, low, left, first = current + 1, 0, size, True
            continue
        code[i] = current
        low, left, first = low + int(shares[:rank].sum()), int(shares[rank]), False
        i += 1
        if left == 1:
            values.append(low)
            current, low, left, first = current + 1, 0, size, True
    if not first:
        values.append(low)
    return code, values


def interval_decode(values: list[int], probs: np.ndarray, size: int) -> np.ndarray:
    """The ranks of interval_codes' values, given the same probabilities at each cell."""
    ranks = np.empty(len(probs), dtype=np.int64)
    codes, i = iter(values), 0
    while i < len(probs):
        value, low, left, first = next(codes), 0, size, True
        while i < len(probs) and left > 1:
            shares = interval_split(probs[i], left, first)
            ends = low + np.cumsum(shares)
            if value >= ends[-1]:  # the escape value
                break
            rank = int(np.searchsorted(ends, value, side="right"))
            ranks[i], i = rank, i + 1
            low, left, first = int(ends[rank] - shares[rank]), int(shares[rank]), False
    return ranks


def bounded_interval_codes(ranks: np.ndarray, probs: np.ndarray,
                           size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's code under model.miss_interval's layout, the values its code has left before it, and whether its
    code ends there, cell by cell (context.interval_runs does every cell at once): each cell splits the values left
    among its ranks, floor(p_r (left - C)) + 1 each (p_r rounded to a multiple of SHARE_STEP) and rank 0 the rest,
    and keeps its rank's share; a code ends at the cell that leaves fewer than C. No escape value: every rank keeps
    one, so a code's end depends only on its own cells, as a decoder reading earlier cells needs."""
    code, before = np.empty(len(ranks), dtype=np.int64), np.empty(len(ranks), dtype=np.int64)
    end = np.zeros(len(ranks), dtype=bool)
    current, left, colours = 0, size, probs.shape[1]
    for i, rank in enumerate(ranks):
        rounded = np.round(probs[i].astype(np.float64) / SHARE_STEP) * SHARE_STEP
        shares = np.floor(rounded * (left - colours)).astype(np.int64) + 1
        shares[0] = left - shares[1:].sum()
        code[i], before[i], left = current, left, int(shares[rank])
        if left < colours:
            current, left, end[i] = current + 1, size, True
    return code, before, end


def uncoded(ranks: list[np.ndarray], codes: list[np.ndarray], slots: int) -> tuple[float, float]:
    """Grids whose every miss (rank > 0) is within `slots` codes, and the token accuracy if every cell within them
    is right and the context's guess (from the true earlier cells) fills the rest."""
    fits = past = 0
    for grid_ranks, grid_codes in zip(ranks, codes):
        lost = (grid_codes >= slots) & (grid_ranks > 0)
        fits += not lost.any()
        past += int(lost.sum())
    return fits / len(ranks), 1 - past / sum(len(r) for r in ranks)


def report_paired_misses(ranks: list[np.ndarray], slots: int, layouts: tuple[tuple[int, int], ...], title: str) -> None:
    """Two misses per code where the first is cheap (paired_miss_codes), for each (run_limit, pair_rank) of
    `layouts`, from each grid's ranks of its cells' colours in reading order (0: the context's guess, so not a
    miss): grids within the codes, and token accuracy if every cell within them is right and the context's guess
    (from the true earlier cells) fills the rest. A code's miss is named by its rank under the context, so a code of
    the 512 names any content of the kinds counted (the hybrid's even runs take 110 more)."""
    print(f"\n{title}:\n")
    print("| runs of at most | a second miss after a first of rank | kinds of code | grids that fit | "
          "token accuracy, every other cell right |")
    print("|---|---|---|---|---|")
    for run_limit, pair_rank in layouts:
        fits, accuracy = uncoded(ranks, [paired_miss_codes(r, run_limit, pair_rank) for r in ranks], slots)
        first = "none (one miss per code)" if pair_rank == 0 else f"at most {pair_rank}"
        print(f"| {run_limit} | {first} | {paired_miss_kinds(run_limit, pair_rank)} | {fits:.3f} | {accuracy:.4f} |")


def draw_costliest(grids: list[np.ndarray], bits: list[float], budget: float, count: int = 24):
    """The `count` grids that need the most bits, each titled with its bits (red: over the budget)."""
    from matplotlib.colors import ListedColormap

    order = sorted(range(len(grids)), key=lambda i: -bits[i])[:count]
    cols = 8
    fig, axes = tickless_figure((len(order) + cols - 1) // cols, cols, 1.7)
    for ax, i in zip(axes.flat, order):
        ax.imshow(grids[i], cmap=ListedColormap(ARC_COLOURS[:COLOURS]), vmin=0, vmax=COLOURS - 1,
                  interpolation="nearest")
        ax.set_title(f"#{i}: {bits[i]:.0f} bits", fontsize=8, color="red" if bits[i] > budget else "black")
    fig.tight_layout()
    return fig


def report(results: list[dict], shapes: torch.Tensor, budget: float, slots: int, params: Params) -> None:
    bits = np.array([r["bits"] for r in results])
    cells = np.array([r["cells"] for r in results])
    fits = bits <= budget
    bucket = torch.bucketize(cells_per_code(shapes, slots), torch.tensor(LOAD_EDGES)).numpy()
    names = [n.replace("_per_code", "").replace("_", " ") for n in LOAD_NAMES[:-1]]
    print(f"{len(results)} held-out grids, {cells.sum():,} cells; {params}")
    print(f"bits per cell {bits.sum() / cells.sum():.3f}; bits per grid: median {np.median(bits):.0f}, "
          f"90th percentile {np.percentile(bits, 90):.0f}, largest {bits.max():.0f}")
    print(f"\n| budget | grids within it | {' | '.join(names)} | token acc: a prefix coded, the rest guessed from "
          "the true cells | from the guesses | the costliest cells left out, guessed from the true cells |")
    print("|---|---|" + "---|" * len(names) + "---|---|---|")
    by_bucket = " | ".join(f"{fits[bucket == i].mean():.3f}" if (bucket == i).any() else "" for i in range(len(names)))
    true_acc = sum(r["guessed_true"] for r in results) / cells.sum()
    free_acc = sum(r["guessed_free"] for r in results) / cells.sum()
    skip_acc = sum(r["skipped_true"] for r in results) / cells.sum()
    print(f"| {budget:.0f} bits | {fits.mean():.3f} | {by_bucket} | {true_acc:.4f} | {free_acc:.4f} | {skip_acc:.4f} |")
    over = ~fits
    print(f"\nthe {over.sum()} grids over the budget hold {cells[over].sum() / cells.sum():.3f} of the cells and "
          f"need {bits[over].sum() / max(cells[over].sum(), 1):.3f} bits per cell; with the budget they get "
          f"{sum(r['guessed_free'] for r, o in zip(results, over) if o) / max(cells[over].sum(), 1):.3f} of their "
          f"cells right; 99% overall needs {1 - 0.01 * cells.sum() / max(cells[over].sum(), 1):.3f}")


if __name__ == "__main__":
    main()
