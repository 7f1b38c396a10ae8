"""Pictures of grids: inputs beside reconstructions (ARC colours or grey levels), code usage, and
grids as text for the terminal."""

from __future__ import annotations

from typing import Any

import torch

# The ARC palette (colours 0..9), and white for padding.
ARC_COLOURS = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF",
               "#870C25", "#FFFFFF"]


def tickless_figure(rows: int, cols: int, size: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def draw_reconstructions(inputs: torch.Tensor, recon: torch.Tensor, shapes: torch.Tensor, kind: str,
                         vocab_size: int) -> Any:
    """Top row the grids, bottom row their reconstructions (cropped to each grid's shape), each
    reconstruction titled with its wrong cells inside the grid and in its padding."""
    from matplotlib.colors import ListedColormap

    fig, axes = tickless_figure(2, len(inputs), 1.6)
    if kind == "arc":
        cmap, vmax = ListedColormap(ARC_COLOURS[:vocab_size]), vocab_size - 1
    else:
        cmap, vmax = "gray", vocab_size - 1
    for i, (grid, out, (h, w)) in enumerate(zip(inputs, recon, shapes.tolist())):
        axes[0, i].imshow(grid[:h, :w].numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        axes[1, i].imshow(out[:h, :w].numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        wrong = int((grid[:h, :w] != out[:h, :w]).sum())
        in_padding = int((grid != out).sum()) - wrong
        title = "exact" if wrong + in_padding == 0 else f"{wrong} wrong" + (f" +{in_padding} pad" if in_padding else "")
        axes[1, i].set_title(title, fontsize=8, color="green" if wrong + in_padding == 0 else "red")
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("reconstruction")
    fig.tight_layout()
    return fig


def draw_code_usage(counts: torch.Tensor) -> Any:
    """How often each code is chosen, most used first (log scale): a collapsed codebook is a cliff."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = counts.sort(descending=True).values
    used = int((counts > 0).sum())
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(ordered)), ordered.clamp(min=0.5).tolist(), width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("code rank")
    ax.set_ylabel("uses")
    ax.set_title(f"code usage on the held-out grids: {used} of {len(counts)} codes used", fontsize=9)
    fig.tight_layout()
    return fig


def grid_text(grid: torch.Tensor, pad_id: int | None) -> str:
    """A grid as rows of digits, padding cropped away (or shown as '.' inside the grid)."""
    cells = grid.tolist()
    if pad_id is not None:
        keep_rows = [r for r, row in enumerate(cells) if any(c != pad_id for c in row)]
        keep_cols = [c for c in range(len(cells[0])) if any(row[c] != pad_id for row in cells)]
        if not keep_rows:
            return "(all padding)"
        cells = [[cells[r][c] for c in range(keep_cols[0], keep_cols[-1] + 1)]
                 for r in range(keep_rows[0], keep_rows[-1] + 1)]
    return "\n" + "\n".join(" ".join("." if c == pad_id else str(c) for c in row) for row in cells)
