"""Training curves as a PNG in the run's artifacts/ (a researcher would rather look than read)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from latentforge.track.rundir import RunDir


def plot_run(run: RunDir) -> Path | None:
    """Train loss (log scale) and each split's headline eval metrics over steps."""
    records = run.read_metrics()
    loss = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.count("/") == 1 and not key.startswith(("train/", "guard/")) and not key.endswith("/examples"):
                evals.setdefault(key, []).append((r["step"], value))
    if not loss and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if loss:
        axes[0].plot(*zip(*loss), label="train/loss")
        axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss")
    for key, points in sorted(evals.items()):
        axes[1].plot(*zip(*points), marker="o", markersize=3, label=key)
    axes[1].set_xlabel("step")
    axes[1].set_title("evaluation")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(run.id)
    fig.tight_layout()
    path = run.artifacts / "curves.png"
    run.artifacts.mkdir(exist_ok=True)
    save_figure(fig, path)
    for family, rows in indexed_metrics(records).items():
        plot_indexed(family, rows, run.artifacts / f"{family.replace('/', '_')}.png", run.id)
    return path


def indexed_metrics(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[int, float]]]:
    """Metrics logged once per position, `split/name/0`, `split/name/1`, ... (e.g. multiply's accuracy
    of each answer digit): {`split/name`: {step: {position: value}}}, for families of 2+ positions."""
    families: dict[str, dict[int, dict[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            family, _, index = key.rpartition("/")
            if (family.count("/") == 1 and index.isdigit() and not family.startswith(("train/", "guard/"))
                    and isinstance(value, (int, float)) and "step" in r):
                families.setdefault(family, {}).setdefault(r["step"], {})[int(index)] = float(value)
    return {f: rows for f, rows in families.items() if len({i for row in rows.values() for i in row}) >= 2}


def plot_indexed(family: str, rows: dict[int, dict[int, float]], path: Path, title: str) -> None:
    """One family of per-position metrics as a heatmap, evaluations down and positions across: where a
    table of them would be read cell by cell, this shows which positions are learned first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(rows)
    positions = sorted({i for row in rows.values() for i in row})
    values = [[rows[s].get(i, math.nan) for i in positions] for s in steps]
    finite = [v for row in values for v in row if math.isfinite(v)]
    # Accuracies on their whole scale, so that 0.98 does not look like 0.
    scale = {"vmin": 0.0, "vmax": 1.0} if finite and 0.0 <= min(finite) and max(finite) <= 1.0 else {}
    fig, ax = plt.subplots(figsize=(min(0.45 * len(positions) + 3, 16), min(0.3 * len(steps) + 1.8, 12)))
    image = ax.imshow(values, cmap="viridis", aspect="auto", interpolation="nearest", **scale)
    xticks = range(0, len(positions), max(1, len(positions) // 30))
    ax.set_xticks(list(xticks), [str(positions[t]) for t in xticks])
    yticks = range(0, len(steps), max(1, len(steps) // 12))
    ax.set_yticks(list(yticks), [str(steps[t]) for t in yticks])
    ax.set_xlabel(f"k in {family}/k")
    ax.set_ylabel("step")
    fig.colorbar(image, ax=ax)
    ax.set_title(f"{title}: {family}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG atomically (a viewer never sees half a file), then close it."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def save_heatmap(values: list[list[float]], row_labels: list[str], column_labels: list[str],
                 annotations: list[list[str]], title: str, path: Path) -> Path:
    """A rows x columns grid of values in [0, 1] (colour) with a text label in each cell, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(column_labels) + 3, 0.55 * len(row_labels) + 1.6))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(column_labels)), column_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    for i, row in enumerate(annotations):
        for j, text in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", color="white" if values[i][j] < 0.6 else "black")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path
