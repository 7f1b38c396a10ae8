"""Sweep reports: each run's best value of a metric, as a table, report.csv and one plot per x key.

Only run directories are read (run.json, config.yaml, metrics.jsonl), so any directory of runs can be
reported on, whatever launched them. A sweep.yaml beside them (as `latentforge sweep` leaves) supplies
its report: section and its grid keys; without one, the grid is the config keys whose values differ.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from latentforge.api import Run
from latentforge.errors import ConfigError, LatentforgeError, RunError
from latentforge.launch.sweep import CONFIG, PARAMS, ReportSpec, flatten, read_sweep_file
from latentforge.track.compare import STATUS_COLORS, natural_key, si
from latentforge.track.files import write_csv
from latentforge.track.plots import save_figure


@dataclass
class Report:
    directory: Path
    metric: str
    mode: str  # min or max: which end of the metric is better
    keys: list[str]  # the config columns: grid keys, then any other x or curves key
    x: list[str]
    curves: str | None
    rows: list[dict[str, Any]]


def best_value(records: list[dict[str, Any]], metric: str, mode: str) -> tuple[float, int] | None:
    """The best finite value of `metric` over a run's records and its step (the earliest on a tie)."""
    found = [(r[metric], r.get("step")) for r in records
             if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not found:
        return None
    return (min if mode == "min" else max)(found, key=lambda pair: pair[0])


def value_text(value: Any) -> str:
    """A grid value as the table, CSV and plots write it; a YAML file is named by its file name."""
    if isinstance(value, str):
        return Path(value).name if value.endswith((".yaml", ".yml")) else value
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _RunData:
    id: str
    status: str
    info: dict[str, Any]
    config: dict[str, Any]  # flattened: {"model.d_model": 32, ...}
    records: list[dict[str, Any]]


def _read_runs(directory: Path) -> list[_RunData]:
    paths = sorted((p for p in directory.iterdir() if (p / "run.json").is_file()),
                   key=lambda p: natural_key(p.name)) if directory.is_dir() else []
    if not paths:
        raise RunError(f"no runs in {directory}/ (a run is a folder with a run.json)")
    runs = []
    for path in paths:
        try:
            run = Run(path)
            info = run.info
            runs.append(_RunData(path.name, info["status"], info, flatten(run.config.to_dict()), run.metrics))
        except LatentforgeError:
            runs.append(_RunData(path.name, "unreadable", {}, {}, []))  # listed, never fatal to the report
    return runs


def _value(run: _RunData, key: str) -> Any:
    if key == CONFIG:
        return run.info.get("source")
    if key == PARAMS:
        return run.info.get("params")
    return run.config.get(key)


def _varying_keys(runs: list[_RunData]) -> list[str]:
    """Without a sweep file, the grid is every config key (and `config`) whose value differs between runs."""
    readable = [r for r in runs if r.config]
    keys = [CONFIG] + list(dict.fromkeys(key for r in readable for key in r.config))
    return [key for key in keys if len({json.dumps(_value(r, key), sort_keys=True) for r in readable}) > 1]


def _resolve_metric(runs: list[_RunData], spec: ReportSpec, metric: str | None, mode: str | None) -> tuple[str, str]:
    """--metric, else the sweep file's, else the runs' checkpoint.metric; the mode likewise, and only from a
    source that speaks of this metric: a wrong guess of min or max would report the worst run as the best."""
    readable = [r for r in runs if r.config]
    if metric is None:
        metric = spec.metric
    if metric is None:
        found = sorted({r.config.get("checkpoint.metric") or "" for r in readable} - {""})
        if len(found) != 1:
            picked = f"they pick their best on {', '.join(found)}" if found else "none has a checkpoint.metric"
            raise ConfigError(f"which metric? {picked}; choose one with --metric")
        metric = found[0]
    if mode is None and metric == spec.metric:
        mode = spec.mode
    if mode is None:
        modes = {r.config.get("checkpoint.mode") for r in readable if r.config.get("checkpoint.metric") == metric}
        if len(modes) != 1:
            raise ConfigError(f"is a lower or a higher {metric} better? pass --mode min or --mode max")
        mode = modes.pop()
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode must be min or max (got {mode!r})")
    return metric, mode


def build_report(directory: Path, metric: str | None = None, mode: str | None = None) -> Report:
    """One row per run: status, params, the grid values, and its best `metric` with that value's step."""
    runs = _read_runs(directory)
    sweep_file = directory / "sweep.yaml"
    sweep = read_sweep_file(sweep_file) if sweep_file.is_file() else None
    spec = sweep.report if sweep else ReportSpec()
    metric, mode = _resolve_metric(runs, spec, metric, mode)
    grid = sweep.keys if sweep else _varying_keys(runs)
    x = spec.x or [PARAMS, *grid]
    keys = list(dict.fromkeys([*grid, *(k for k in x if k != PARAMS), *([spec.curves] if spec.curves else [])]))
    rows = []
    for run in runs:
        best = best_value(run.records, metric, mode)
        rows.append({"run": run.id, "status": run.status, "params": run.info.get("params"),
                     **{key: _value(run, key) for key in keys}, "metric": metric, "mode": mode,
                     "best": best[0] if best else None, "best_step": best[1] if best else None})
    if all(row["best"] is None for row in rows):
        logged = sorted({k for r in runs for rec in r.records for k in rec
                         if "/" in k and not k.startswith(("train/", "guard/"))})
        raise RunError(f"no run in {directory} logged {metric} (they logged: {', '.join(logged[:8]) or 'nothing'}); "
                       f"choose a metric with --metric")
    return Report(directory, metric, mode, keys, x, spec.curves, rows)


def print_rows(rows: list[dict[str, Any]], keys: list[str], best_label: str, console: Console, title: str) -> None:
    """Run, status, [params,] the grid values, and the best value with its step."""
    with_params = any("params" in row for row in rows)
    table = Table(title=title, show_edge=False, header_style="bold")
    for column in ("run", "status", *(["params"] if with_params else []), *keys, best_label, "at step"):
        table.add_column(column, justify="left" if column in ("run", "status") else "right", no_wrap=column == "run")
    for row in rows:
        status = row["status"]
        params = [f"{row['params']:,}" if row.get("params") else "-"] if with_params else []
        table.add_row(row["run"], f"[{STATUS_COLORS.get(status, 'white')}]{status}[/]", *params,
                      *(value_text(row.get(key)) for key in keys),
                      "-" if row.get("best") is None else f"{row['best']:.4f}",
                      "-" if row.get("best_step") is None else str(row["best_step"]))
    console.print(table)


def print_report(report: Report, console: Console) -> None:
    print_rows(report.rows, report.keys, f"best {report.metric}", console,
               f"{report.directory}: best {report.metric} ({report.mode}) per run")


def _csv_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lists and mappings as JSON (what a CSV reader can parse back), everything else as it is."""
    return [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows]


def plot_envelope(report: Report, x: str, path: Path) -> bool:
    """Best metric vs x, one curve per value of the curves key; at each x, the best of the runs that share
    it (the envelope over the other keys). Returns False, drawing nothing, when no run has both."""
    rows = [r for r in report.rows if r["best"] is not None and r.get(x) is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    better = min if report.mode == "min" else max
    numeric = all(_is_number(r[x]) for r in rows)
    categories = list(dict.fromkeys(value_text(r[x]) for r in rows))  # in run order, i.e. grid order
    by = report.curves if report.curves != x else None  # curves of x against itself would be single points
    curves: dict[str, dict[float, float]] = {}
    for r in rows:
        curve = value_text(r.get(by)) if by else report.metric
        position = r[x] if numeric else categories.index(value_text(r[x]))
        points = curves.setdefault(curve, {})
        points[position] = better(points[position], r["best"]) if position in points else r["best"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve, points in curves.items():
        xs = sorted(points)
        # Categories have no order to draw a line along.
        ax.plot(xs, [points[v] for v in xs], marker="o", linestyle="-" if numeric else "none", label=curve)
    short = FuncFormatter(lambda value, _: si(value))  # 13.1k, 0.001: not 1.31x10^4
    if numeric and all(r[x] > 0 for r in rows):
        ax.set_xscale("log")
    if numeric and len(categories) <= 12:
        # Ticks at the grid's own values: a grid often spans less than a decade, where log ticks say little.
        ax.set_xticks(sorted({r[x] for r in rows}))
        ax.xaxis.set_major_formatter(short)
        ax.xaxis.set_minor_formatter(NullFormatter())
    if not numeric:
        ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
    ys = [y for points in curves.values() for y in points.values()]  # what is drawn
    if min(ys) > 0:
        ax.set_yscale("log")
        # Enough digits to tell the ticks apart when the runs lie close together (2.4974, 2.5003).
        digits = max(3, math.ceil(math.log10(max(ys) / max(max(ys) - min(ys), 1e-12 * max(ys)))) + 2)
        plain = FuncFormatter(lambda value, _: f"{value:.{digits}g}")
        ax.yaxis.set_major_formatter(plain)
        # Within one decade only minor ticks fall inside the axis: label them too.
        ax.yaxis.set_minor_formatter(plain if max(ys) < 10 * min(ys) else NullFormatter())
    ax.set_xlabel(x)
    ax.set_ylabel(f"best {report.metric} ({report.mode})")
    ax.set_title(f"best {report.metric} vs {x}" + (f", per {by}" if by else ""))
    if by:
        ax.legend(title=by, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def save_report(report: Report, out_dir: Path) -> list[Path]:
    """report.csv and report-<x>.png for each x with data; a bad --out is one line, not a traceback."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out {out_dir} is a file, not a directory")
    written = [out_dir / "report.csv"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(_csv_rows(report.rows), written[0])
        for x in report.x:
            path = out_dir / f"report-{re.sub(r'[^A-Za-z0-9._=-]+', '_', x)}.png"
            if plot_envelope(report, x, path):
                written.append(path)
    except OSError as e:
        raise RunError(f"cannot write the report to {out_dir}: {e.strerror or e}") from None
    return written
