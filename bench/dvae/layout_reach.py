"""What a preset's miss layout (model.miss_slots) gives back from perfect codes on the held-out ARC grids.

    python -m bench.dvae.layout_reach [PRESET] [key=value ...]     # default dvae/arc-vq-miss

A grid fits if every cell its context mispredicts lies within its codes: perfect codes then give it back exactly.
In a grid that does not fit, the cells past the last code take the context's guess. Counted from the true earlier
cells (bench.dvae.capacity's count) that is optimistic: greedy decoding guesses from its own earlier cells, so a
miss it cannot code can lead the guesses after it astray. This counts both; the second is what a model whose codes
are all right would score, the ceiling of its held-out token accuracy.
It also counts the runs a grid that does not fit needs past its codes. An encoder could drop misses instead (code the
grid with the context's guess in their place): each dropped miss merges its run into the next, so it saves at most
one run, and costs its cell. Where the guesses after a dropped miss do not change, that keeps at most one minus those
runs over all cells.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from rich.progress import track

from latentforge.config import load_config
from latentforge.tasks.dvae.context import inside_cells
from latentforge.tasks.dvae.model import GridDVAE
from latentforge.tasks.dvae.task import DVAE


@torch.no_grad()
def layout_reach(model: GridDVAE, tokens: torch.Tensor, shapes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For (B, S, S) grids of (B, 2) shapes: whether each fits the model's codes, its cells wrong when those past
    the last code take the context's guess from the true earlier cells, and from the guesses before them (a Jacobi
    iteration to the fixed point, as GridDVAE.generate decodes), and the runs it needs past its codes (up to its last
    miss). A grid that fits is decoded right: only the others are iterated."""
    axes = model.grid_axes(tokens, shapes)
    layout = model.layout(tokens, shapes, axes)
    past = inside_cells(shapes, model.grid_size) & (layout.slot >= model.slots)
    wrong_true = (past & layout.missed).sum(1)
    fit = wrong_true == 0
    run = layout.end.cumsum(1) - layout.end.long()
    excess = (torch.where(layout.missed, run, -1).amax(1) + 1 - model.slots).clamp(min=0)
    wrong_free = torch.zeros_like(wrong_true)
    if fit.all():
        return fit, wrong_true, wrong_free, excess
    unfit = ~fit
    grids, grid_shapes, grid_axes = tokens[unfit], shapes[unfit], None if axes is None else axes[unfit]
    decoded = own_guesses(lambda g: model.layout(g, grid_shapes, grid_axes).guess, grids, past[unfit])
    wrong_free[unfit] = (decoded != grids.flatten(1)).sum(1)
    return fit, wrong_true, wrong_free, excess


def own_guesses(guess: Callable[[torch.Tensor], torch.Tensor], grids: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """(B, S, S) grids -> (B, S*S) them with the cells of `past` (B, S*S) decoded as greedy decoding does: each the
    guess (B, S*S) from the decoded grid's earlier cells, iterated to the fixed point (a Jacobi iteration; the guess
    reads only earlier cells, so each pass fixes at least one more)."""
    truth = grids.flatten(1)
    decoded = truth.clone()
    for _ in range(int(past.sum(1).max()) + 1):
        guessed = torch.where(past, guess(decoded.view_as(grids)), truth)
        if torch.equal(guessed, decoded):
            break
        decoded = guessed
    return decoded


def main(args: list[str]) -> None:
    preset = args[0] if args and "=" not in args[0] else "dvae/arc-vq-miss"
    cfg = load_config(preset, ["train.device=cpu", *[a for a in args if "=" in a]])
    if not cfg.model.miss_slots:
        raise SystemExit(f"{preset} does not lay its codes out by a context's misses (model.miss_slots=false)")
    task = DVAE(cfg, torch.device("cpu"))
    model = task.build_model()
    grids = task.grids("test")
    counts = []
    for i in track(range(0, len(grids), 128), description="held-out grids", transient=True):
        counts.append(layout_reach(model, grids.tokens[i:i + 128].long(), grids.shapes[i:i + 128].long()))
    fit, wrong_true, wrong_free, excess = (torch.cat(column) for column in zip(*counts))
    cells = grids.shapes.long().prod(1)
    total = int(cells.sum())
    print(f"{preset} {' '.join(a for a in args if '=' in a)}: {len(fit)} held-out grids, {total:,} cells")
    print("| grids that fit | token accuracy, the rest guessed from the true cells | from its own guesses | "
          "cells in the grids that do not fit | of theirs right, from its own guesses | runs past the codes | "
          "token accuracy, one cell given up per run past the codes |")
    print("|---|---|---|---|---|---|---|")
    unfit_cells = int(cells[~fit].sum())
    print(f"| {float(fit.float().mean()):.4f} | {1 - int(wrong_true.sum()) / total:.4f} | "
          f"{1 - int(wrong_free.sum()) / total:.4f} | {unfit_cells / total:.3f} | "
          f"{1 - int(wrong_free.sum()) / max(unfit_cells, 1):.3f} | {int(excess.sum()):,} | "
          f"{1 - int(excess.sum()) / total:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
