"""Comparing runs side by side: which model variant buys the most exact match per parameter and per FLOP.

Everything is read from the run directories (run.json's last evaluation, or a later `latentforge eval`
result in artifacts/), so comparing never re-evaluates a model.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from latentforge.errors import LatentforgeError, RunError
from latentforge.track.files import write_csv
from latentforge.track.plots import save_figure

if TYPE_CHECKING:
    from latentforge.api import Run

STATUS_COLORS = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red", "crashed": "red"}


def natural_key(text: str) -> list[Any]:
    """Sort digit runs by value, so bucket 2x2 comes before 10x10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def default_split(run: Run) -> str:
    """The split that picks the run's best checkpoint, else the first one with an exact match logged."""
    metric = run.config.checkpoint.metric
    if metric:
        return metric.split("/")[0]
    last_eval = run.info.get("last_eval") or {}
    for key in last_eval:
        if key.endswith("/exact_match"):
            return key.split("/")[0]
    raise RunError(f"run {run.id} has no evaluation metrics yet; evaluate it first: latentforge eval {run.id}")


def _eval_artifacts(run: Run) -> list[tuple[int, str, dict[str, Any]]]:
    """(step, file name, metrics) of each result `latentforge eval` saved in the run's artifacts/."""
    results = []
    for path in sorted(run.dir.artifacts.glob("eval_*_step*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(path.read_text())
            results.append((int(data["step"]), path.name, data["metrics"]))
        except (OSError, json.JSONDecodeError, KeyError):
            raise RunError(f"{path} is not a readable evaluation result; delete it or rerun latentforge eval") from None
    return results


def split_metrics(run: Run, split: str) -> tuple[int, str, dict[str, float]]:
    """The newest metrics of one split, as (step, where they come from, {name without the split: value}).

    run.json keeps only the last evaluation during training; a later `latentforge eval` of the same or a
    newer checkpoint (e.g. on another split) wins, so `eval` followed by `compare` shows its numbers.
    """
    prefix = f"{split}/"
    last_eval = run.info.get("last_eval") or {}
    candidates = [(int(last_eval.get("step", 0)), "run.json", last_eval)] if last_eval else []
    candidates += _eval_artifacts(run)  # oldest first, so on equal steps the latest eval wins
    found = [c for c in candidates if any(key.startswith(prefix) for key in c[2])]
    if not found:
        known = sorted({key.split("/")[0] for c in candidates for key in c[2] if "/" in key})
        raise RunError(f"run {run.id} has no {split!r} metrics (it has: {', '.join(known) or 'none'}); "
                       f"evaluate it first: latentforge eval {run.id} --split {split}")
    step, source, metrics = sorted(found, key=lambda c: c[0])[-1]  # a stable sort: the latest of equal steps
    return step, source, {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}


def compare_rows(runs: list[Run], split: str | None = None) -> list[dict[str, Any]]:
    """One row per run: size, cost, training time and the split's metrics (None where not measured)."""
    if split is None:
        defaults = {run.id: default_split(run) for run in runs}
        if len(set(defaults.values())) > 1:
            listed = ", ".join(f"{run_id}: {name}" for run_id, name in defaults.items())
            raise RunError(f"the runs evaluate different splits by default ({listed}); choose one with --split")
        split = next(iter(defaults.values()))
    measured = []
    for run in runs:
        info, task = run.info, run.config.task
        step, source, metrics = split_metrics(run, split)
        measured.append((run, info, getattr(task, "variant", None) or task.name, step, source, metrics))
    buckets = sorted({key for *_, metrics in measured for key in metrics if key.startswith("exact_match/")},
                     key=natural_key)
    rows = []
    for run, info, variant, step, source, metrics in measured:
        exact, params = metrics.get("exact_match"), info.get("params")
        rows.append({
            "run": run.id, "variant": variant, "status": info["status"], "split": split,
            "params": params, "flops_per_example": info.get("flops_per_example"),
            "steps": info.get("step"), "train_seconds": info.get("train_seconds"),
            "eval_step": step, "metrics_from": source, "loss": metrics.get("loss"), "exact_match": exact,
            **{bucket: metrics.get(bucket) for bucket in buckets},
            "exact_match_per_mparam": exact / (params / 1e6) if exact is not None and params else None,
        })
    return rows


def format_seconds(seconds: float | None) -> str:
    """As `runs show` writes a duration: 0h04m12s."""
    if seconds is None:
        return "-"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"


def si(value: float | None) -> str:
    """1.2M, 3.4G: FLOPs are read by their order of magnitude."""
    if value is None:
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _table(header: list[str], lines: list[list[str]], text_columns: int) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < text_columns else "right", no_wrap=i == 0)
    for line in lines:
        table.add_row(*line)
    return table


def print_comparison(rows: list[dict[str, Any]], console: Console) -> None:
    """One row per run; runs as columns instead when that is too wide for the terminal (many buckets)."""
    buckets = [key for key in rows[0] if key.startswith("exact_match/")]
    header = ["run", "variant", "status", "params", "FLOPs/answer", "steps", "wall time", "metrics at step",
              "loss", "exact match", *(key.split("/", 1)[1] for key in buckets), "EM per M params"]
    lines = [[
        r["run"], r["variant"], f"[{STATUS_COLORS.get(r['status'], 'white')}]{r['status']}[/]",
        f"{r['params']:,}" if r["params"] else "-", si(r["flops_per_example"]), str(r["steps"]),
        format_seconds(r["train_seconds"]), str(r["eval_step"]), _num(r["loss"]), _num(r["exact_match"]),
        *(_num(r[key]) for key in buckets), _num(r["exact_match_per_mparam"], ".4g"),
    ] for r in rows]
    table = _table(header, lines, text_columns=3)
    if Measurement.get(console, console.options.update(max_width=10**6), table).maximum > console.width:
        table = _table(["", *(line[0] for line in lines)], [list(cells) for cells in zip(header, *lines)][1:], 1)
    table.title = f"{rows[0]['split']} split"
    console.print(table)


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Exact match per run as bars, and against parameters and FLOPs per answer (log x), coloured by variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import EngFormatter, NullFormatter

    scored = [r for r in rows if r["exact_match"] is not None]
    panels = [("params", "parameters")]
    if any(r["flops_per_example"] for r in scored):
        panels.append(("flops_per_example", "FLOPs per answer"))
    variants = sorted({r["variant"] for r in rows})
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5.5 * (1 + len(panels)), 4.5))
    bars = axes[0].bar([r["run"] for r in scored], [r["exact_match"] for r in scored],
                       color=[colors[r["variant"]] for r in scored])
    axes[0].bar_label(bars, fmt="%.3f", fontsize=8)
    plt.setp(axes[0].get_xticklabels(), rotation=30, ha="right", fontsize=8)
    axes[0].set_title("exact match")
    axes[0].legend(handles=[Patch(color=colors[v], label=v) for v in variants], fontsize=8, title="variant")
    for ax, (key, label) in zip(axes[1:], panels):
        points = [r for r in scored if r[key]]
        for r in points:
            ax.scatter(r[key], r["exact_match"], color=colors[r["variant"]])
            ax.annotate(r["run"], (r[key], r["exact_match"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.margins(x=0.25)  # room for the run names
        # Ticks at the runs' own sizes (3.4k, 12.9k): runs often lie within one decade, where log ticks say little.
        ax.set_xticks(sorted({r[key] for r in points}))
        ax.xaxis.set_major_formatter(EngFormatter(places=1, sep=""))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_xlabel(label)
        ax.set_title(f"exact match vs {label}")
    for ax in axes:
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{rows[0]['split']} split")
    fig.tight_layout()
    save_figure(fig, path)


def save_comparison(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """compare-<time>.csv and .png in out_dir; bad --out is one line, not a traceback."""
    stem = f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    csv_path, png_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.png"
    if out_dir.exists() and not out_dir.is_dir():
        raise LatentforgeError(f"--out {out_dir} is a file, not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(rows, csv_path)
        plot_comparison(rows, png_path)
    except OSError as e:
        raise LatentforgeError(f"cannot write the comparison to {out_dir}: {e.strerror or e}") from None
    return csv_path, png_path
