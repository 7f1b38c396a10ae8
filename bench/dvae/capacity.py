"""How many cells each code must carry on the held-out ARC grids, with patch slots and with grid slots.

    python -m bench.dvae.capacity [key=value ...]     # overrides of the dvae/arc-vq preset

One code of K is log2(K) bits; n cells of 10 colours need n * log2(10) bits when nothing about the grid
is assumed. So a code can hold any run of floor(log2(K) / log2(10)) cells exactly (2 for K = 512); past
that, exact reconstruction needs the grid's structure. Patch slots give every code its patch of the
canvas (4 x 2 cells for 128 slots on 32 x 32) whatever the grid's size; grid slots (model.grid_slots)
give the N - 2 slots the grid's own cells, ceil(h * w / (N - 2)) per slot.

A second count is the grids' structure along one axis: the runs of one colour along the rows (or the
columns, whichever has fewer). One code can name a run (10 colours x 30 lengths < 512), so a grid with at
most N - 2 runs fits one run per code; more than that needs structure across rows.

The third is how far codes that describe only their own run of cells can go: if a code meant one of the K
commonest runs of its length among the training grids' runs (the decoder knows each run's length from the
grid's shape), which held-out grids would come back exactly? Those whose every run is among them; counted
also per load (cells per code), the buckets of the evaluation's test/exact_match/<load>.
The fourth asks the same of runs fitted to the content: each row's runs of one colour, the adjacent pair
with the fewest cells merged until the grid has at most N - 2 (within a row, so at most one row per code),
and a code meaning one of the K commonest such segments of any length (the decoder would have to learn
each segment's length from its code).
The fifth asks what a decoder that reads the grid's earlier cells (model.autoregressive) could get if the codes
carried only the cells that a fixed context rule mispredicts (the rule: the upper cell where the left and
upper-left cells agree, else the left cell). With grid slots, a code of K holds its run's mispredicted cells if
their places and colours are one of K cases; with codes spent only where the rule fails (each naming the next
mispredicted cell's distance and colour), the grid needs one code per mispredicted cell. Its last row is the
layout of model.miss_slots: runs that end at each cell the rule of latentforge/tasks/dvae/context.py (fitted to the
training grids, eight neighbours) mispredicts, or after model.miss_run cells without one; a grid fits if its last
mispredicted cell is in one of the N - 2 runs. The last line is the token accuracy that layout can reach if
every cell within its codes comes back and the rule guesses the cells past the last code.
The last tables count codes at the misses of the model's adaptive context (model.miss_axes), two to a code where
the first is cheap (model.miss_pair_rank); the best fixed dictionary of rank sequences (a Tunstall tree); and
interval codes, whose content depends on what the decoder knows (bench.dvae.entropy.interval_codes), with the
cells past the last code guessed from the true earlier cells and, as greedy decoding does, from its own guesses.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections import Counter, defaultdict

import numpy as np
import torch

from latentforge.config import load_config
from latentforge.nn.rope import grid_positions
from latentforge.tasks.dvae.context import (
    AdaptiveContext,
    colour_ranks,
    context_guesses,
    fit_context_rule,
    inside_cells,
    miss_layout,
    symmetry_axes,
    uncoded_misses,
)
from latentforge.tasks.dvae.data import Grids
from latentforge.tasks.dvae.model import cells_per_code, grid_slot_layout
from latentforge.tasks.dvae.task import DVAE, LOAD_EDGES, LOAD_NAMES


def main(overrides: list[str]) -> None:
    cfg = load_config("dvae/arc-vq", ["train.device=cpu", *overrides])
    m = cfg.model
    task = DVAE(cfg, torch.device("cpu"))
    grids = task.grids("test")
    shapes = grids.shapes.long()
    cells = shapes[:, 0] * shapes[:, 1]
    free = int(math.log2(m.codebook_size) // math.log2(10))
    per_patch = cfg.data.grid_size**2 // m.latents
    per_slot = cells_per_code(shapes, m.latents - 2)
    print(f"{len(cells)} held-out grids (median {int(cells.median())} cells); {m.latents} codes of "
          f"{m.codebook_size}: a code holds any {free} cells")
    print("| cells per code | patch slots | grid slots |")
    print("|---|---|---|")
    for n in range(1, int(per_slot.max()) + 1):
        patch = 1.0 if per_patch <= n else 0.0
        print(f"| <= {n} | {patch:.3f} | {float((per_slot <= n).float().mean()):.3f} |")
    runs = torch.tensor([fewest_runs(t[:h, :w]) for t, (h, w) in zip(grids.tokens, shapes.tolist())])
    slots = m.latents - 2
    print(f"\nruns of one colour along the rows or the columns (the fewer; median {int(runs.median())}):")
    print("| runs per grid | grids |")
    print("|---|---|")
    for n in (slots // 2, slots, 2 * slots):
        print(f"| <= {n} | {float((runs <= n).float().mean()):.3f} |")
    train_runs, test_runs = slot_runs(task.grids("train"), slots), slot_runs(grids, slots)
    # The same buckets as the held-out evaluation's test/exact_match/<load>, to set the model's beside.
    bucket = torch.bucketize(per_slot, torch.tensor(LOAD_EDGES)).tolist()
    names = [n.replace("_per_code", "").replace("_", " ") for n in LOAD_NAMES[:-1]]
    print("\ngrid slots whose codes each name one of the K commonest training runs of their length:")
    print(f"| K per run length | held-out grids exact | held-out runs covered | {' | '.join(names)} |")
    print("|---|---|---|" + "---|" * len(names))
    for k in (m.codebook_size, 8 * m.codebook_size):
        hits = run_hits(train_runs, test_runs, k, by_length=True)
        exact, covered = hit_fractions(hits)
        whole = [all(h) for h in hits]
        by_load = [[w for w, b in zip(whole, bucket) if b == i] for i in range(len(names))]
        print(f"| {k} | {exact:.3f} | {covered:.3f} | "
              + " | ".join(f"{sum(w) / len(w):.3f}" if w else "" for w in by_load) + " |")
    train_segments = [fitted_segments(g, slots) for g in grid_contents(task.grids("train"))]
    test_segments = [fitted_segments(g, slots) for g in grid_contents(grids)]
    print("\nsegments fitted to the content (each row's single-colour runs, merged) whose codes each name one of the K "
          "commonest training segments:")
    print("| K | held-out grids exact | held-out segments covered |")
    print("|---|---|---|")
    for k in (m.codebook_size, 8 * m.codebook_size):
        exact, covered = local_code_bound(train_segments, test_segments, k, by_length=False)
        print(f"| {k} | {exact:.3f} | {covered:.3f} |")
    misses = [context_misses(g) for g in grid_contents(grids)]
    print("\ncodes that carry only the cells a context rule mispredicts (the fifth count above):")
    print(f"| codes | held-out grids | {' | '.join(names)} |")
    print("|---|---|" + "---|" * len(names))
    runs_fit = [fits_runs(miss, slots, m.codebook_size) for miss in misses]
    list_fits = [fits_list(miss, slots, m.codebook_size) for miss in misses]
    # model.miss_slots: runs ending at each cell the context fitted to the training grids (context.py) mispredicts:
    # the fixed rule, or the adaptive context (model.miss_context), each as the model fits it.
    rule = fit_context_rule(task.train_grids.tokens, task.train_grids.shapes)
    adaptive = AdaptiveContext(colours=10).fit(task.train_grids.tokens, task.train_grids.shapes)
    mirrored = AdaptiveContext(colours=10, axes=True).fit(task.train_grids.tokens, task.train_grids.shapes)
    uncoded = {}
    for context, guesses in (("rule", lambda t, s: context_guesses(t, s, rule)), ("adaptive", adaptive.guesses),
                             ("axes", lambda t, s: mirrored.guesses(t, s, symmetry_axes(t, s)))):
        guess = torch.cat([guesses(grids.tokens[i:i + 256], grids.shapes[i:i + 256])
                           for i in range(0, len(grids), 256)])
        layout = miss_layout(grids.tokens, grids.shapes, guess, slots, m.miss_run)
        uncoded[context] = uncoded_misses(layout.slot, layout.missed, slots)
    miss_fits = {context: (~past.any(1)).tolist() for context, past in uncoded.items()}
    for layout, ok in (("one per grid slot's run", runs_fit), ("one per mispredicted cell", list_fits),
                       ("either, whichever fits the grid", [a or b for a, b in zip(runs_fit, list_fits)]),
                       (f"one per cell the fitted rule mispredicts (model.miss_slots, runs <= {m.miss_run})",
                        miss_fits["rule"]),
                       (f"one per cell the adaptive context mispredicts (model.miss_context=adaptive, runs <= "
                        f"{m.miss_run})", miss_fits["adaptive"]),
                       ("the same, mirrored about each grid's own axes (model.miss_axes)", miss_fits["axes"])):
        by_load = [[o for o, b in zip(ok, bucket) if b == i] for i in range(len(names))]
        print(f"| {layout} | {sum(ok) / len(ok):.3f} | "
              + " | ".join(f"{sum(o) / len(o):.3f}" if o else "" for o in by_load) + " |")
    # The token accuracy within the miss layout's reach: every cell within its codes right, the guess past them.
    cells = int(shapes.prod(1).sum())
    for context, name in (("rule", "fitted rule"), ("adaptive", "adaptive context"),
                          ("axes", "axes-mirrored adaptive context")):
        past = int(uncoded[context].sum())
        unfit = [not ok for ok in miss_fits[context]]
        unfit_cells = int(shapes[unfit].prod(1).sum())
        print(f"\nmiss layout, every cell within the codes right and the {name}'s guess past the last code (from "
              f"the true earlier cells): held-out token accuracy {1 - past / cells:.3f}; it mispredicts {past:,} "
              f"cells past the last code ({past / cells:.3f} of the {cells:,}), so 99% needs a decoder that gets "
              f"{max(0.0, 1 - 0.01 * cells / max(past, 1)):.2f} of them right without a code. The {sum(unfit)} "
              f"grids that do not fit hold {unfit_cells / cells:.3f} of the cells, "
              f"{1 - past / max(unfit_cells, 1):.3f} of theirs right so")
    report_paired_misses(grids, task.train_grids, mirrored, slots, m.miss_run, m.codebook_size)


def grid_ranks(grids: Grids, context: AdaptiveContext,
               axes: torch.Tensor | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each grid's ranks of its cells' colours under the context (mirrored about each grid's own `axes`, computed
    if None), and its cells' colour probabilities sorted likeliest first (cells, colours), in reading order."""
    axes = symmetry_axes(grids.tokens, grids.shapes) if axes is None else axes
    ranks, probs = [], []
    for i in range(0, len(grids), 256):
        tokens, shapes = grids.tokens[i:i + 256], grids.shapes[i:i + 256]
        sorted_probs, choices = context.ranked(tokens, shapes, axes[i:i + 256])
        inside = inside_cells(shapes, tokens.shape[-1])
        rank = colour_ranks(choices, torch.where(inside, tokens.flatten(1), 0).clamp(max=context.colours - 1))
        for r, p, keep in zip(rank, sorted_probs, inside):  # reading order: the grid sits top-left
            ranks.append(r[keep].numpy())
            probs.append(p[keep].numpy())
    return ranks, probs


def report_paired_misses(grids: Grids, train: Grids, context: AdaptiveContext, slots: int, miss_run: int,
                         codebook_size: int) -> None:
    """bench.dvae.entropy's two misses to a code where the first is cheap, counted with the model's own context
    (model.miss_axes'): its misses and the ranks of their colours, the first row one miss per code as model.miss_slots
    lays them out. Then the best fixed dictionary of rank sequences for ranks drawn independently, a Tunstall tree
    fitted to the training grids' ranks; and codes whose content depends on what the decoder knows, intervals split
    at each cell by the probabilities of its ranks (bench.dvae.entropy.interval_codes)."""
    from bench.dvae import entropy

    axes = symmetry_axes(grids.tokens, grids.shapes)
    per_grid, per_grid_probs = grid_ranks(grids, context, axes)
    entropy.report_paired_misses(per_grid, slots, ((miss_run, 0), (10, 1), (7, 2)),
                                 "misses of the axes-mirrored adaptive context named by their rank, two to a code "
                                 "where the first is cheap (bench.dvae.entropy's last table, with the model's "
                                 "context)")
    train_ranks, train_probs = grid_ranks(train, context)
    p = np.bincount(np.concatenate(train_ranks), minlength=context.colours) / sum(map(len, train_ranks))
    leaves = entropy.tunstall_leaves(codebook_size, context.colours)
    tree = entropy.tunstall_dictionary(p, leaves)
    fits, accuracy = entropy.uncoded(per_grid, [entropy.tunstall_codes(r, tree) for r in per_grid], slots)
    print(f"\na Tunstall dictionary of rank sequences, fitted to the training grids' ranks (rank 0 {p[0]:.3f} of "
          f"their cells), its longest code {max(map(len, tree)) + 1} cells:\n")
    print("| codes of | grids that fit | token accuracy, every other cell right |")
    print("|---|---|---|")
    print(f"| {leaves} | {fits:.3f} | {accuracy:.4f} |")
    table = entropy.class_rank_table(train_ranks, [q[:, 0] for q in train_probs])
    splits = (("the training grids' rank frequencies (as the Tunstall tree)", lambda q: np.broadcast_to(p, q.shape)),
              ("the rank frequencies of the cell's confidence class (the context's probability of its first "
               "choice, 7 classes, fitted to the training grids)",
               lambda q: table[np.digitize(q[:, 0], entropy.CONFIDENCE_EDGES)]),
              ("the context's own probabilities", lambda q: q))
    print(f"\ncodes of {codebook_size} values split at each cell by the probabilities of its ranks "
          f"(bench.dvae.entropy.interval_codes):\n")
    print("| each cell's split by | grids that fit | token accuracy, every other cell right | the rest from its own "
          "guesses |")
    print("|---|---|---|---|")
    layouts = [(name, [entropy.interval_codes(r, split(q), codebook_size)[0] for r, q in zip(per_grid, per_grid_probs)])
               for name, split in splits]
    layouts.append(("the context's own probabilities, every rank keeping a value and no escape (model.miss_interval)",
                    [entropy.bounded_interval_codes(r, q, codebook_size)[0] for r, q in zip(per_grid, per_grid_probs)]))
    # No code boundaries: an ideal arithmetic coder with the context's probabilities, cut at the codes' bits (every
    # cell within them in code 0, the others past the last).
    budget = slots * math.log2(codebook_size)
    ideal = [np.where(np.cumsum(-np.log2(q[np.arange(len(r)), r].clip(min=1e-12))) <= budget, 0, slots)
             for r, q in zip(per_grid, per_grid_probs)]
    layouts.append((f"no code boundaries: an ideal arithmetic coder with the context's probabilities, cut at "
                    f"{budget:.0f} bits", ideal))
    for name, codes in layouts:
        fits, accuracy = entropy.uncoded(per_grid, codes, slots)
        coded = torch.tensor([int((c < slots).sum()) for c in codes])
        print(f"| {name} | {fits:.3f} | {accuracy:.4f} | {own_guess_accuracy(grids, context, coded, axes):.4f} |")


def own_guess_accuracy(grids: Grids, context: AdaptiveContext, coded: torch.Tensor,
                       axes: torch.Tensor | None = None) -> float:
    """The held-out token accuracy when each grid's first `coded` cells (in reading order) come back right and the
    rest are the context's guesses from the decoded earlier cells, as greedy decoding makes them
    (bench.dvae.layout_reach.own_guesses), mirrored about each grid's `axes` (computed if None)."""
    from bench.dvae.layout_reach import own_guesses

    tokens, shapes = grids.tokens.long(), grids.shapes.long()
    size = tokens.shape[-1]
    rows, cols = grid_positions(size, size, tokens.device)
    reading = rows * shapes[:, 1:] + cols  # each inside cell's place in reading order
    past = inside_cells(shapes, size) & (reading >= coded.unsqueeze(1))
    axes = symmetry_axes(tokens, shapes) if axes is None else axes
    wrong = 0
    for i in range(0, len(grids), 256):
        part = slice(i, i + 256)
        tail = past[part].any(1)
        if tail.any():
            grid, grid_shapes, grid_axes = tokens[part][tail], shapes[part][tail], axes[part][tail]
            decoded = own_guesses(lambda g, s=grid_shapes, a=grid_axes: context.guesses(g, s, a), grid,
                                  past[part][tail])
            wrong += int((decoded != grid.flatten(1)).sum())
    return 1 - wrong / int(shapes.prod(1).sum())


def slot_runs(grids: Grids, slots: int) -> list[list[tuple[int, ...]]]:
    """Each grid's runs of cells, one per grid slot (grid_slot_layout), as tuples of colours."""
    slot, _ = grid_slot_layout(grids.shapes.long(), grids.tokens.shape[-1], slots)
    out = []
    for tokens, owners in zip(grids.tokens.flatten(1).tolist(), slot.tolist()):
        runs: dict[int, list[int]] = defaultdict(list)
        for colour, owner in zip(tokens, owners):
            if owner < slots:
                runs[owner].append(colour)
        out.append([tuple(run) for run in runs.values()])
    return out


def local_code_bound(train: list[list[tuple[int, ...]]], test: list[list[tuple[int, ...]]], k: int,
                     by_length: bool = True) -> tuple[float, float]:
    """The fraction of test grids whose every run is among the k commonest training runs of its length (or
    of any length), and the fraction of test runs that are."""
    return hit_fractions(run_hits(train, test, k, by_length))


def hit_fractions(hits: list[list[bool]]) -> tuple[float, float]:
    """From run_hits: the fraction of test grids whose every run is known, and the fraction of runs that are."""
    return (sum(all(h) for h in hits) / len(hits), sum(map(sum, hits)) / sum(map(len, hits)))


def run_hits(train: list[list[tuple[int, ...]]], test: list[list[tuple[int, ...]]], k: int,
             by_length: bool) -> list[list[bool]]:
    """For each run of each test grid: is it among the k commonest training runs of its length (or of any)?"""
    counts: dict[int, Counter] = defaultdict(Counter)
    for runs in train:
        for run in runs:
            counts[len(run) if by_length else 0][run] += 1
    known = {length: {run for run, _ in c.most_common(k)} for length, c in counts.items()}
    return [[run in known.get(len(run) if by_length else 0, ()) for run in runs] for runs in test]


def grid_contents(grids: Grids) -> list[list[list[int]]]:
    """Each grid's own cells, row by row, without the padding."""
    return [t[:h, :w].tolist() for t, (h, w) in zip(grids.tokens, grids.shapes.long().tolist())]


def fitted_segments(rows: list[list[int]], slots: int) -> list[tuple[int, ...]]:
    """A grid's runs of one colour along each row, the adjacent pair of one row with the fewest cells merged
    (the leftmost of equals) until at most `slots` segments are left (or no two segments of one row are left to
    merge). The pairs wait in a heap; a merge leaves its old pairs there, which are skipped when they come up."""
    row_of: list[int] = []
    colours: list[tuple[int, ...]] = []
    for r, row in enumerate(rows):
        start = 0
        for c in range(1, len(row) + 1):
            if c == len(row) or row[c] != row[start]:
                row_of.append(r)
                colours.append(tuple(row[start:c]))
                start = c
    n = len(colours)
    after, before, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
    # (cells, left, right): a segment keeps the index of its leftmost run, so indices keep the segments' order.
    pairs = [(len(colours[i]) + len(colours[i + 1]), i, i + 1) for i in range(n - 1) if row_of[i] == row_of[i + 1]]
    heapq.heapify(pairs)
    left = n
    while left > slots and pairs:
        cells, i, j = heapq.heappop(pairs)
        if not (alive[i] and alive[j] and after[i] == j and len(colours[i]) + len(colours[j]) == cells):
            continue  # a merge has changed this pair since
        colours[i], alive[j], left = colours[i] + colours[j], False, left - 1
        after[i] = after[j]
        if after[j] < n:
            before[after[j]] = i
        for x, y in ((before[i], i), (i, after[i])):
            if x >= 0 and y < n and row_of[x] == row_of[y]:
                heapq.heappush(pairs, (len(colours[x]) + len(colours[y]), x, y))
    return [c for c, keep in zip(colours, alive) if keep]


def context_misses(rows: list[list[int]]) -> list[bool]:
    """Whether each cell of a grid, in reading order, differs from what its earlier neighbours predict: the upper
    cell where the left and upper-left cells agree, else the left cell (the first row: the left cell; the first
    column: the upper cell; the first cell is always a miss)."""
    misses = []
    for r, row in enumerate(rows):
        for c, colour in enumerate(row):
            if r == 0 and c == 0:
                guess = -1
            elif r == 0:
                guess = row[c - 1]
            elif c == 0:
                guess = rows[r - 1][c]
            else:
                guess = rows[r - 1][c] if row[c - 1] == rows[r - 1][c - 1] else row[c - 1]
            misses.append(colour != guess)
    return misses


def fits_runs(misses: list[bool], slots: int, codebook_size: int, colours: int = 10) -> bool:
    """Can each grid slot's code say which of its run's cells the rule misses, and their colours? A run of n
    cells with m misses is one of sum_{i <= m} C(n, i) (colours - 1)^i cases."""
    n_cells = len(misses)
    runs: dict[int, list[bool]] = defaultdict(list)
    for i, miss in enumerate(misses):
        runs[i * slots // n_cells].append(miss)
    return all(sum(math.comb(len(run), i) * (colours - 1) ** i for i in range(sum(run) + 1)) <= codebook_size
               for run in runs.values())


def fits_list(misses: list[bool], slots: int, codebook_size: int, colours: int = 10) -> bool:
    """Do `slots` codes suffice if each names the distance to the next missed cell (up to codebook_size //
    colours - 1; a longer gap costs a code per such stretch) and its colour?"""
    longest = codebook_size // colours - 1
    codes, gap = 0, 0
    for miss in misses:
        if miss:
            codes += 1 + gap // (longest + 1)
            gap = 0
        else:
            gap += 1
    return codes <= slots


def fewest_runs(grid: torch.Tensor) -> int:
    """Runs of one colour along the rows or along the columns of a grid (h, w), whichever are fewer."""
    along_rows = int((grid[:, 1:] != grid[:, :-1]).sum()) + grid.shape[0]
    along_cols = int((grid[1:, :] != grid[:-1, :]).sum()) + grid.shape[1]
    return min(along_rows, along_cols)


if __name__ == "__main__":
    main(sys.argv[1:])
