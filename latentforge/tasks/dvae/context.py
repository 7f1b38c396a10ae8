"""A fixed context rule for ARC grids, and slots laid out where it fails (model.miss_slots).

The rule guesses each cell from its earlier neighbours in reading order (NEIGHBOURS: left, upper, upper-left,
upper-right, and four more two cells away). It is blind to colour: it looks only at which of those neighbours
share a colour and which lie outside the grid (one of 9! patterns), and copies the neighbour that most often
had the cell's colour under that pattern in the training grids (or guesses none). A table fitted once, from
the training grids, gives that choice for each pattern.

miss_layout ties the codes to the cells this rule gets wrong: reading the grid in order, a run of cells ends at
each mispredicted cell, or after `run_limit` cells without one, and code k belongs to the k-th run. A cell's
run and its place in the run depend only on the cells before it, so an autoregressive decoder knows, cell by
cell, which code to read. A code then need only say where in its run the rule fails and with what colour.
Counted on ARC-AGI-1's held-out grids, 126 such codes hold every mispredicted cell of 92% of the grids, against
78% for codes tied to even runs of cells (bench/dvae/capacity.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn.rope import grid_positions
from latentforge.tasks.dvae.data import dihedral

# (row, column) offsets of the neighbours the rule reads: all earlier than the cell in reading order.
NEIGHBOURS = ((0, -1), (-1, 0), (-1, -1), (-1, 1), (0, -2), (-2, 0), (-1, -2), (-2, -1))
PATTERNS = math.factorial(len(NEIGHBOURS) + 1)
NO_GUESS = -1  # a neighbour outside the grid, or the rule's guess where no neighbour will do


class MissLayout(NamedTuple):
    """Codes tied to the cells a context mispredicts (miss_layout, paired_miss_runs, interval_runs), each (B, S*S)."""

    slot: Tensor  # the run of each cell, `slots` outside the grid and past the last code
    offset: Tensor  # its place in its run
    end: Tensor  # whether its run ends there
    missed: Tensor  # whether the guess is wrong there
    guess: Tensor  # the guess given
    # Codes that name ranks (model.miss_pair_rank, model.miss_interval): (B, S*S, colours), each cell's colours as
    # the context ranks them.
    choices: Tensor | None = None
    # model.miss_interval: (B, S*S, colours) the log share of the values left that each rank keeps at each cell, and
    # (B, S*S) the values left before it (interval_runs).
    split: Tensor | None = None
    left: Tensor | None = None


def inside_cells(shapes: Tensor, grid_size: int) -> Tensor:
    """(B, S*S): whether each canvas cell lies inside its grid, for (B, 2) grid shapes (content at the top left)."""
    rows, cols = grid_positions(grid_size, grid_size, shapes.device)
    return (rows < shapes[:, :1]) & (cols < shapes[:, 1:])


def neighbour_colours(grids: Tensor, shapes: Tensor) -> Tensor:
    """(B, S, S) grids and their (B, 2) shapes -> (B, S*S, len(NEIGHBOURS)): each cell's neighbours' colours,
    NO_GUESS outside the grid."""
    B, S, _ = grids.shape
    inside = inside_cells(shapes, S).view(B, S, S)
    canvas = F.pad(torch.where(inside, grids, NO_GUESS), (2, 2, 2, 0), value=NO_GUESS)
    return torch.stack([canvas[:, 2 + dr:2 + dr + S, 2 + dc:2 + dc + S].flatten(1) for dr, dc in NEIGHBOURS], -1)


def pattern_ids(neighbours: Tensor) -> Tensor:
    """(..., K) neighbour colours -> (...) the pattern they form, in [0, (K + 1)!): for each neighbour i, the
    first neighbour j <= i of its colour, or i + 1 when it lies outside the grid, in mixed radix."""
    K = neighbours.shape[-1]
    same = (neighbours.unsqueeze(-1) == neighbours.unsqueeze(-2)) & (neighbours != NO_GUESS).unsqueeze(-2)
    same = same & torch.ones(K, K, dtype=torch.bool, device=neighbours.device).tril()  # j <= i
    first = torch.where(same.any(-1), same.int().argmax(-1), torch.arange(1, K + 1, device=neighbours.device))
    return sum(first[..., i] * math.factorial(i + 1) for i in range(K))


def fit_context_rule(grids: Tensor, shapes: Tensor) -> Tensor:
    """The rule's table from training grids: for each pattern, the neighbour (0..K-1) that most often had the
    cell's colour, or K (no guess) where none did most often; uint8, (PATTERNS,)."""
    K = len(NEIGHBOURS)
    neighbours = neighbour_colours(grids, shapes)
    inside = inside_cells(shapes, grids.shape[-1])
    neighbours, colours = neighbours[inside], grids.flatten(1)[inside]
    pattern = pattern_ids(neighbours)
    match = neighbours == colours.unsqueeze(-1)
    choices = torch.cat([match, ~match.any(-1, keepdim=True)], -1)  # (cells, K + 1)
    slots = pattern.unsqueeze(-1) * (K + 1) + torch.arange(K + 1, device=grids.device)
    counts = torch.bincount(slots[choices], minlength=PATTERNS * (K + 1)).view(PATTERNS, K + 1)
    return counts.argmax(-1).to(torch.uint8).cpu()


def context_guesses(grids: Tensor, shapes: Tensor, rule: Tensor) -> Tensor:
    """(B, S*S): the rule's guess of each cell's colour from its earlier neighbours (NO_GUESS for none)."""
    neighbours = neighbour_colours(grids, shapes)
    choice = rule[pattern_ids(neighbours)].long()
    padded = F.pad(neighbours, (0, 1), value=NO_GUESS)  # choice K: no guess
    return padded.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def miss_layout(grids: Tensor, shapes: Tensor, guess: Tensor, slots: int, run_limit: int) -> MissLayout:
    """Codes tied to the cells a context's guess (B, S*S) mispredicts (context_guesses' of the fitted rule, or
    AdaptiveContext.guesses), for (B, S, S) grids of (B, 2) shapes. Each (B, S*S):
    - slot: the run of each cell, `slots` outside the grid and past the last code;
    - offset: its place in its run (0 .. run_limit - 1);
    - end: whether its run ends there (a mispredicted cell, or the run's run_limit-th cell);
    - missed: whether the guess is wrong there;
    - guess: the guess given.
    A cell's slot and offset depend only on the cells before it (each run starts after the previous end)."""
    S = grids.shape[-1]
    rows, cols = grid_positions(S, S, grids.device)
    inside = inside_cells(shapes, S)
    index = rows * shapes[:, 1:] + cols  # the cell's place in the grid's reading order
    missed = inside & (grids.flatten(1) != guess)  # the rule's first cell always: all its neighbours lie outside
    return MissLayout(*miss_runs(missed, inside, index, slots, run_limit), missed, guess)


def miss_runs(missed: Tensor, inside: Tensor, index: Tensor, slots: int,
              run_limit: int) -> tuple[Tensor, Tensor, Tensor]:
    """The runs of miss_layout from (B, L) cells in canvas order: whether each is mispredicted, inside its grid,
    and its place in the grid's reading order. Returns slot, offset and end as miss_layout does."""
    last_miss = torch.where(missed, index, -1).cummax(1).values
    end = inside & ((index - last_miss) % run_limit == 0)
    run = end.cumsum(1) - end.long()
    previous_end = F.pad(torch.where(end, index, -1).cummax(1).values[:, :-1], (1, 0), value=-1)
    slot = torch.where(inside & (run < slots), run, slots)
    offset = torch.where(inside, index - previous_end - 1, 0)
    return slot, offset, end


def paired_miss_runs(ranks: Tensor, inside: Tensor, slots: int, run_limit: int,
                     pair_rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The runs of model.miss_pair_rank from (B, L) cells in canvas order: the rank of each cell's colour under the
    context (0: its guess) and whether it is inside its grid. A run ends at a miss ranked above pair_rank, at its
    second miss, or at its run_limit-th cell, so a cheap miss lets its code go on to hold a second (pair_rank 0:
    miss_runs' runs). Returns slot, offset and end as miss_layout does.
    A run's state (its cells and misses so far) is a finite automaton over the cells, so the state before every
    cell is a prefix composition of per-cell transitions: log2(L) parallel steps rather than L sequential ones."""
    state = torch.arange(2 * run_limit, device=ranks.device)  # misses so far * run_limit + cells so far
    misses, length = state // run_limit, state % run_limit
    full = length + 1 == run_limit
    # Per kind of cell (a hit, a cheap miss, a dear one, outside the grid): whether the run ends, and the state after.
    ends = torch.stack([full, full | (misses == 1), torch.ones_like(full), torch.zeros_like(full)])
    after = torch.stack([state + 1, run_limit + length + 1, state, state])
    after = torch.where(ends, 0, after)
    kind = torch.where(inside, (ranks > 0).long() + (ranks > pair_rank).long(), 3)
    prefix = after[kind]  # (B, L, states): prefix[:, i, s], the state after cells ..i from state s before them
    span = 1
    while span < prefix.shape[1]:
        prefix = torch.cat([prefix[:, :span], prefix[:, span:].gather(2, prefix[:, :-span])], 1)
        span *= 2
    before = F.pad(prefix[:, :-1, 0], (1, 0))
    end = ends[kind, before]
    run = end.cumsum(1) - end.long()
    slot = torch.where(inside & (run < slots), run, slots)
    return slot, torch.where(inside, before % run_limit, 0), end


# interval_shares rounds probabilities to multiples of this first, so that its floors are exact: the layout does not
# change with a probability's last bit, which another device or batch size may round differently.
SHARE_STEP = 2.0**-20


def interval_shares(probs: Tensor, left: Tensor) -> Tensor:
    """How `left` values (..., with left >= C) split among C ranks of probabilities `probs` (..., C), likeliest
    first: floor(p_r (left - C)) + 1 each (p_r rounded to a multiple of SHARE_STEP), rank 0 the rest. Every rank
    keeps a value, so every cell can be coded."""
    rounded = torch.round(probs.double() / SHARE_STEP) * SHARE_STEP
    shares = (rounded * (left - probs.shape[-1]).unsqueeze(-1)).floor().long() + 1
    return torch.cat([left.unsqueeze(-1) - shares[..., 1:].sum(-1, keepdim=True), shares[..., 1:]], -1)


def interval_run_bound(size: int, colours: int) -> int:
    """The most cells an interval run holds: each cell leaves at most left - (colours - 1) values, and the run
    takes cells while at least `colours` are left."""
    return (size - colours) // (colours - 1) + 1


@torch.compiler.disable
@torch.no_grad()
def interval_runs(probs: Tensor, ranks: Tensor, inside: Tensor, slots: int,
                  size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The runs of model.miss_interval from (B, L) cells in canvas order: each cell's rank probabilities (B, L, C)
    (the context's, likeliest first, known from the earlier cells), its rank and whether it is inside its grid. A
    code is an interval of `size` values; each cell splits what is left of it among its ranks (interval_shares) and
    keeps its own rank's share; a run ends at the cell that leaves fewer than C values. A variable-to-fixed
    arithmetic code without escapes: a code holds many likely cells or few unlikely ones, never more than `size`
    contents for what the decoder knows, and its end depends only on its cells. Returns slot, offset and end as
    miss_layout does, and the values left before each cell (0 outside the grid).
    A run holds at most interval_run_bound cells, so every cell's run is followed as if a run started there, all at
    once, that many steps; the runs that do start are then the chain of run ends from the first cell
    (chain_from_first)."""
    B, L, colours = probs.shape
    # The grid's cells in reading order first (the grid sits at the top left, so that is canvas order).
    order = torch.sort((~inside).long(), dim=1, stable=True).indices
    probs = probs.gather(1, order.unsqueeze(-1).expand(-1, -1, colours))
    ranks, valid = ranks.gather(1, order), inside.gather(1, order)
    place = torch.arange(L, device=probs.device).expand(B, -1)
    bound = interval_run_bound(size, colours)
    left = torch.full_like(ranks, size)
    active, end_at, lefts = valid, torch.full_like(ranks, L), []
    for k in range(bound):  # the run from each start, at its k-th cell
        p, r = F.pad(probs[:, k:], (0, 0, 0, k)), F.pad(ranks[:, k:], (0, k))
        active = active & F.pad(valid[:, k:], (0, k), value=False)
        lefts.append(torch.where(active, left, 0))
        left = interval_shares(p, left.clamp(min=colours)).gather(-1, r.unsqueeze(-1)).squeeze(-1)
        ends = active & (left < colours)
        end_at = torch.where(ends, place + k, end_at)
        active = active & ~ends
    starts = chain_from_first((end_at + 1).clamp(max=L)) & valid
    start = torch.where(starts, place, 0).cummax(1).values  # each cell's run's first cell
    offset = place - start
    left = torch.stack(lefts, -1).flatten(1).gather(1, start * bound + offset.clamp(max=bound - 1))
    end = valid & (end_at.gather(1, start) == place)
    run = starts.cumsum(1) - 1
    out = (torch.where(valid & (run < slots), run, slots), torch.where(valid, offset, 0), end,
           torch.where(valid, left, 0))
    return tuple(torch.empty_like(x).scatter_(1, order, x) for x in out)


def chain_from_first(following: Tensor) -> Tensor:
    """(B, L) each position's next (> itself; L: none) -> (B, L) whether the chain 0, next(0), next(next(0)), ...
    passes each position. The chain is found by pointer doubling: log2(L) scatters rather than L steps."""
    B, L = following.shape
    jump = torch.cat([following, following.new_full((B, 1), L)], 1)
    reached = torch.zeros_like(jump)
    reached[:, 0] = 1
    for _ in range(max(1, math.ceil(math.log2(L + 1)))):
        reached = reached.scatter_reduce(1, jump, reached, "amax")
        jump = jump.gather(1, jump)
    return reached[:, :L].bool()


def colour_ranks(choices: Tensor, colours: Tensor) -> Tensor:
    """(..., C) colours as a context ranks them and (...) colours -> each colour's rank (0: the guess); 0 for a
    token that is no colour."""
    return (choices == colours.unsqueeze(-1)).int().argmax(-1)


def uncoded_misses(slot: Tensor, missed: Tensor, slots: int) -> Tensor:
    """(B, S*S): the mispredicted cells past the last run, which no code carries (miss_layout's slot and missed).
    A grid fits its codes where it has none."""
    return missed & (slot >= slots)


# The cells mirrored across a grid's middle row, middle column, centre and the diagonal through its centre (where
# h - w is even), read after NEIGHBOURS by the adaptive context; each where it comes earlier in reading order.
MIRRORS = ("middle row", "middle column", "centre", "diagonal")
# AdaptiveContext's two families of contexts (columns of context_cells), each from coarse to fine: local
# neighbours, and the left and upper cells with the mirrored ones.
ADAPTIVE_FAMILIES = (((0, 1), (0, 1, 2, 3), tuple(range(len(NEIGHBOURS)))),
                     ((0, 1), (0, 1, *range(len(NEIGHBOURS), len(NEIGHBOURS) + len(MIRRORS)))))
ADAPTIVE_LEVELS = tuple(sorted({level for family in ADAPTIVE_FAMILIES for level in family}))


def context_cells(grids: Tensor, shapes: Tensor, axes: Tensor | None = None) -> Tensor:
    """(B, S, S) grids of (B, 2) shapes -> (B, S*S, 12): neighbour_colours' eight cells, then the MIRRORS
    (NO_GUESS where outside the grid or not earlier). The mirrors are about the middle row and column, or, given
    (B, 2) `axes` (symmetry_axes'), about row axis a = h - 1 + axes[:, 0] (row r mirrors to a - r) and column
    axis b = w - 1 + axes[:, 1]."""
    B, S, _ = grids.shape
    rows, cols = grid_positions(S, S, grids.device)
    h, w = shapes[:, :1], shapes[:, 1:]
    a, b = (h - 1, w - 1) if axes is None else (h - 1 + axes[:, :1], w - 1 + axes[:, 1:])
    inside = inside_cells(shapes, S)
    mr, mc = a - rows, b - cols
    # The diagonal through the centre (a / 2, b / 2) swaps the offsets from it: (r, c) -> (c + d, r - d).
    d = (a - b).div(2, rounding_mode="floor")
    dr, dc = cols + d, rows - d
    mirrored = [(mr, cols.expand(B, -1), True), (rows.expand(B, -1), mc, True), (mr, mc, True),
                (dr, dc, (a - b) % 2 == 0)]
    flat = grids.flatten(1)
    cells = []
    for r, c, applies in mirrored:
        earlier = (r < rows) | ((r == rows) & (c < cols))
        ok = inside & earlier & (r >= 0) & (r < h) & (c >= 0) & (c < w) & applies
        cells.append(torch.where(ok, flat.gather(1, (r * S + c).clamp(0, S * S - 1)), NO_GUESS))
    return torch.cat([neighbour_colours(grids, shapes), torch.stack(cells, -1)], -1)


# Symmetry axes as offsets from the middle in half cells, -AXIS_REACH..AXIS_REACH - 1 (4 bits each): an axis lies
# within AXIS_REACH / 2 = 4 cells of the middle.
AXIS_REACH = 8


def shape_code_values(grid_size: int, axes: bool) -> int:
    """How many values each of a grid's two shape codes takes: a size - 1 below grid_size, plus (with `axes`)
    grid_size times an axis offset + AXIS_REACH."""
    return grid_size * (2 * AXIS_REACH if axes else 1)


def symmetry_axes(grids: Tensor, shapes: Tensor) -> Tensor:
    """(B, S, S) grids of (B, 2) shapes -> (B, 2) their row and column axes as offsets from the middle, in
    [-AXIS_REACH, AXIS_REACH): those under which the most pairs of distinct cells agree (a mosaic's axes need not
    be the grid's middle; the first such offset on a tie)."""
    B, S, _ = grids.shape
    rows, cols = grid_positions(S, S, grids.device)
    inside = inside_cells(shapes, S)
    flat = grids.flatten(1)
    best = []
    for by_rows, size in ((True, shapes[:, :1]), (False, shapes[:, 1:])):
        line, across = (rows, cols) if by_rows else (cols, rows)
        agree = []
        for offset in range(-AXIS_REACH, AXIS_REACH):
            mirror = size - 1 + offset - line  # the cell's line mirrors to this one; each pair counted once
            pair = inside & (mirror > line) & (mirror < size)
            at = mirror * S + across if by_rows else across * S + mirror
            agree.append((pair & (flat == flat.gather(1, at.clamp(0, S * S - 1)))).sum(1))
        best.append(torch.stack(agree, 1).argmax(1) - AXIS_REACH)
    return torch.stack(best, 1)


def first_choices(cells: Tensor, colours: Tensor) -> Tensor:
    """(..., K) context colours and (...) cell colours -> the first context cell of the cell's colour, or K."""
    match = cells == colours.unsqueeze(-1)
    return torch.where(match.any(-1), match.int().argmax(-1), cells.shape[-1])


def counts_before(groups: Tensor, values: Tensor) -> Tensor:
    """(B, L) group ids and (B, L, C) values -> (B, L, C): for each cell, the sum of `values` over the earlier
    cells of its grid in its group. Each grid's cells sorted stably by group, an exclusive cumulative sum along
    them, each group's start subtracted (all scans run along a grid's cells, not over the whole batch)."""
    B, L, C = values.shape
    order = torch.sort(groups, dim=1, stable=True).indices
    by_group = order.unsqueeze(-1).expand(-1, -1, C)
    sorted_groups, sorted_values = groups.gather(1, order), values.gather(1, by_group)
    sums = sorted_values.cumsum(1) - sorted_values
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[:, 1:] = sorted_groups[:, 1:] != sorted_groups[:, :-1]
    first = torch.where(starts, torch.arange(L, device=groups.device), 0).cummax(1).values
    sums = sums - sums.gather(1, first.unsqueeze(-1).expand(-1, -1, C))
    return torch.empty_like(sums).scatter_(1, by_group, sums)


class AdaptiveContext(nn.Module):
    """A predictor of each cell's colour from the grid's earlier cells, adaptive within the grid (model.miss_context
    = adaptive): blind to colour like the fitted rule, it counts, per pattern of context cells, which of them the
    cell copied (or a new colour), in the training grids (8 rotations and reflections, capped at `train_cap` per
    pattern) and in the grid's own earlier cells (weighted `grid_weight`). A finer context backs off to a coarser
    one (`backoff`, in counts); a new colour is drawn by how often the grid has used it; the two
    ADAPTIVE_FAMILIES are mixed by their likelihood on the earlier cells. Its most likely colour is the guess.
    With `axes`, the mirrored cells are about each grid's own symmetry axes (symmetry_axes), which the caller
    must know: the model carries them in its shape codes (model.miss_axes).
    bench/dvae/entropy.py is the same model cell by cell (with symmetry axes and a fixed share): an arithmetic
    coder driven by that model about the grid's middle holds 97.9% of the held-out grids within 1,152 bits, and
    this one's misses leave 94.8% of them within 126 codes (bench.dvae.capacity)."""

    def __init__(self, colours: int, train_cap: float = 4.0, grid_weight: float = 8.0, backoff: float = 2.0,
                 axes: bool = False):
        super().__init__()
        self.colours, self.train_cap, self.grid_weight, self.backoff = colours, train_cap, grid_weight, backoff
        self.axes = axes
        # Empty until fit(), or until a checkpoint's tables are loaded (_load_from_state_dict takes their sizes).
        for i, level in enumerate(ADAPTIVE_LEVELS):
            self.register_buffer(f"keys_{i}", torch.zeros(0, dtype=torch.long))
            self.register_buffer(f"counts_{i}", torch.zeros(0, len(level) + 1, dtype=torch.float64))
        self.register_buffer("colour_prior", torch.full((colours,), 1 / colours, dtype=torch.float64))

    @torch.no_grad()
    def fit(self, grids: Tensor, shapes: Tensor) -> AdaptiveContext:
        """Count the context patterns of the training grids (B, S, S) of (B, 2) shapes, in their 8 rotations and
        reflections; returns self."""
        colours = self.colours
        keys: dict[tuple, list[Tensor]] = {level: [] for level in ADAPTIVE_LEVELS}
        colour_counts = torch.zeros(colours, dtype=torch.float64, device=grids.device)
        for which in range(8):
            for chunk, chunk_shapes in zip(grids.split(512), shapes.split(512)):
                g, s = dihedral(chunk, chunk_shapes, torch.full((len(chunk),), which, device=grids.device))
                inside = inside_cells(s, g.shape[-1])
                cells = context_cells(g, s, symmetry_axes(g, s) if self.axes else None)[inside]
                flat = g.flatten(1)[inside]
                colour_counts += torch.bincount(flat, minlength=colours)[:colours].double()
                for level in ADAPTIVE_LEVELS:
                    sub = cells[:, list(level)]
                    keys[level].append(pattern_ids(sub) * (len(level) + 1) + first_choices(sub, flat))
        for i, level in enumerate(ADAPTIVE_LEVELS):
            unique, n = torch.unique(torch.cat(keys[level]), return_counts=True)
            patterns, choice = unique // (len(level) + 1), unique % (len(level) + 1)
            table_keys, row = torch.unique(patterns, return_inverse=True)
            table = torch.zeros(len(table_keys), len(level) + 1, dtype=torch.float64, device=grids.device)
            table[row, choice] = n.double()
            setattr(self, f"keys_{i}", table_keys)
            setattr(self, f"counts_{i}", table)
        # No colour impossible: one more of each.
        self.colour_prior = ((colour_counts + 1) / (colour_counts.sum() + colours)).double()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The tables' sizes depend on the grids they were fitted to: take the checkpoint's.
        for i in range(len(ADAPTIVE_LEVELS)):
            for name in (f"keys_{i}", f"counts_{i}"):
                if prefix + name in state_dict:
                    setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def training_counts(self, level: tuple, patterns: Tensor) -> Tensor:
        """(B, L) pattern ids -> (B, L, K + 1) their training counts, scaled down to at most train_cap."""
        i = ADAPTIVE_LEVELS.index(level)
        keys, counts = getattr(self, f"keys_{i}"), getattr(self, f"counts_{i}")
        at = torch.searchsorted(keys, patterns).clamp(max=len(keys) - 1)
        n = torch.where((keys[at] == patterns).unsqueeze(-1), counts[at], 0.0)
        total = n.sum(-1, keepdim=True)
        return n * (self.train_cap / total.clamp(min=self.train_cap))

    def colour_mass(self, n: Tensor, sub: Tensor, new: Tensor) -> Tensor:
        """Choice counts (B, L, K + 1) -> colour counts (B, L, colours): a context cell's choice counts for its
        colour (only a colour's first context cell has any), a new colour's share by `new` over the colours no
        context cell has."""
        index = torch.where(sub == NO_GUESS, self.colours, sub)
        mass = n.new_zeros(*sub.shape[:-1], self.colours + 1).scatter_add(-1, index, n[..., :-1])[..., :-1]
        present = n.new_zeros(*sub.shape[:-1], self.colours + 1).scatter(-1, index, 1.0)[..., :-1] > 0
        rest = torch.where(present, 0.0, new)
        return mass + n[..., -1:] * rest / rest.sum(-1, keepdim=True).clamp(min=1e-30)

    # Eager inside a compiled model: bookkeeping without gradients, whose float64 count kernels Inductor (torch
    # 2.11, Triton) fails to generate.
    @torch.compiler.disable
    @torch.no_grad()
    def guesses(self, grids: Tensor, shapes: Tensor, axes: Tensor | None = None) -> Tensor:
        """(B, S, S) grids of (B, 2) shapes -> (B, S*S): each cell's most likely colour given the earlier cells,
        mirrored about the (B, 2) `axes` (symmetry_axes' offsets: needed where fitted with axes, else the middle).
        A cell inside a grid that holds no colour (padding or a mask, in a grid being decoded) counts as none, and
        reads as missing where it is a context cell."""
        inside = inside_cells(shapes, grids.shape[-1])
        return torch.where(inside, self.distribution(grids, shapes, axes).argmax(-1), NO_GUESS)

    @torch.no_grad()
    def ranks(self, grids: Tensor, shapes: Tensor, axes: Tensor | None = None) -> Tensor:
        """(B, S*S): where each cell's own colour stands among the context's choices (0: its guess, 1: its second
        choice, ...); 0 outside the grid."""
        inside = inside_cells(shapes, grids.shape[-1])
        colour = torch.where(inside, grids.flatten(1), 0).clamp(max=self.colours - 1)
        return torch.where(inside, colour_ranks(self.choices(grids, shapes, axes), colour), 0)

    def choices(self, grids: Tensor, shapes: Tensor, axes: Tensor | None = None) -> Tensor:
        """(B, S*S, colours): each cell's colours, likeliest first given the earlier cells (ties in colour order,
        as the guess takes them)."""
        return self.ranked(grids, shapes, axes)[1]

    @torch.compiler.disable
    @torch.no_grad()
    def ranked(self, grids: Tensor, shapes: Tensor, axes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, S*S, colours) each cell's colour probabilities given the earlier cells, likeliest first, and the
        colours they belong to (choices')."""
        return self.distribution(grids, shapes, axes).sort(dim=-1, descending=True, stable=True)

    def distribution(self, grids: Tensor, shapes: Tensor, axes: Tensor | None = None) -> Tensor:
        """(B, S*S, colours): each cell's colour distribution given the earlier cells (guesses' arguments)."""
        if self.axes != (axes is not None):
            raise ValueError("an adaptive context fitted with symmetry axes guesses with them, and one without without")
        if not len(self.keys_0):
            raise ValueError("an adaptive context guesses once fitted (fit) or loaded from a checkpoint")
        inside = inside_cells(shapes, grids.shape[-1])
        coloured = inside & (grids.flatten(1) < self.colours)
        flat = torch.where(coloured, grids.flatten(1), 0)
        cells = context_cells(grids, shapes, axes)
        cells = torch.where(cells >= self.colours, NO_GUESS, cells)
        seen = F.one_hot(flat, self.colours).double() * coloured.unsqueeze(-1)
        new = seen.cumsum(1) - seen + self.colour_prior
        counted = {}  # per level (the families share their coarsest): colour counts and their total
        for level in ADAPTIVE_LEVELS:
            sub = cells[..., list(level)]
            patterns = pattern_ids(sub)
            chosen = F.one_hot(first_choices(sub, flat), len(level) + 1).double() * coloured.unsqueeze(-1)
            own = counts_before(patterns, chosen)
            n = self.training_counts(level, patterns) + self.grid_weight * own
            counted[level] = self.colour_mass(n, sub, new), n.sum(-1, keepdim=True)
        predictions, loglik = [], []
        for family in ADAPTIVE_FAMILIES:
            p = new / new.sum(-1, keepdim=True)
            for level in family:
                mass, total = counted[level]
                p = (mass + self.backoff * p) / (total + self.backoff)
                p = p / p.sum(-1, keepdim=True)
            predictions.append(p)
            right = p.gather(-1, flat.unsqueeze(-1)).squeeze(-1).clamp(min=1e-300).log() * coloured
            loglik.append(F.pad(right.cumsum(1)[:, :-1], (1, 0)))  # over the earlier cells only, exactly
        weights = torch.stack(loglik, -1).softmax(-1)  # (B, L, families)
        return (torch.stack(predictions, -1) * weights.unsqueeze(-2)).sum(-1)
