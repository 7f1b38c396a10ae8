"""Listing runs: read every run directory's run.json; nothing else to keep in sync."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from latentforge.errors import LatentforgeError, RunError
from latentforge.track.rundir import RunDir


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this id exists (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def effective_status(info: dict[str, Any]) -> str:
    """A run marked running whose process on this host is gone has crashed."""
    status = info.get("status", "unknown")
    if status == "running" and info.get("host") == RunDir.host() and info.get("pid") and not pid_alive(info["pid"]):
        return "crashed"
    return status


def status_text(status: str, stopped_by: str | None) -> str:
    """The status as people read it: a run that train.time_limit ended says so."""
    return f"{status} (time limit)" if status == "finished" and stopped_by == "time_limit" else status


def summarize(run: RunDir) -> dict[str, Any]:
    info = run.info()
    best = info.get("best") or {}
    return {
        "id": run.id,
        "path": str(run.path),
        "task": info.get("task", ""),
        "status": effective_status(info),
        "stopped_by": info.get("stopped_by"),
        "step": info.get("step", 0),
        "total_steps": info.get("total_steps"),
        "best_metric": best.get("metric"),
        "best_value": best.get("value"),
        "best_step": best.get("step"),
        "last_loss": info.get("last_loss"),
        "started": info.get("started") or info.get("created"),
        "host": info.get("host", ""),
        "last_eval": info.get("last_eval") or {},
    }


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    if not runs_dir.is_dir():
        return []
    rows = []
    for path in sorted(runs_dir.iterdir()):
        if (path / "run.json").is_file():
            try:
                rows.append(summarize(RunDir(path)))
            except LatentforgeError:
                rows.append({"id": path.name, "path": str(path), "status": "unreadable", "step": 0,
                             "task": "", "host": "", "started": None, "last_eval": {}})
    return rows


def sort_runs(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """date: newest first; step: furthest first; loss: lowest first; a metric: best first."""
    if key == "date":
        return sorted(rows, key=lambda r: r.get("started") or 0, reverse=True)
    if key == "step":
        return sorted(rows, key=lambda r: r.get("step") or 0, reverse=True)
    if key == "loss":
        return sorted(rows, key=lambda r: (r.get("last_loss") is None, r.get("last_loss") or 0))
    if not any(key in r.get("last_eval", {}) for r in rows) and rows:
        known = sorted({k for r in rows for k in r.get("last_eval", {}) if k != "step"})
        raise RunError(f"cannot sort by {key!r}: use date, step, loss or an eval metric "
                       f"({', '.join(known[:8]) or 'none logged yet'})")
    lower_is_better = "loss" in key
    with_metric = [r for r in rows if key in r.get("last_eval", {})]
    without = [r for r in rows if key not in r.get("last_eval", {})]
    return sorted(with_metric, key=lambda r: r["last_eval"][key], reverse=not lower_is_better) + without


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _num(value: Any, fmt: str = ".4f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def print_table(rows: list[dict[str, Any]], console: Console, metric: str | None = None) -> None:
    table = Table(show_edge=False, header_style="bold")
    for column in ("id", "task", "status", "step", "best", "last loss", "started", "host"):
        table.add_column(column, justify="right" if column in ("step", "last loss") else "left")
    if metric:
        table.add_column(metric, justify="right")
    colors = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red", "crashed": "red"}
    for r in rows:
        total = r.get("total_steps")
        best = f"{r['best_metric']}={_num(r['best_value'])}@{r['best_step']}" if r.get("best_metric") else "-"
        status = r["status"]
        shown = status_text(status, r.get("stopped_by"))
        cells = [r["id"], r.get("task", ""), f"[{colors.get(status, 'white')}]{shown}[/]",
                 f"{r.get('step', 0)}/{total if total else '?'}", best, _num(r.get("last_loss")),
                 _when(r.get("started")), r.get("host", "")]
        if metric:
            cells.append(_num(r.get("last_eval", {}).get(metric)))
        table.add_row(*cells)
    console.print(table)


def duration(info: dict[str, Any]) -> str:
    start = info.get("started")
    if not start:
        return "-"
    seconds = (info.get("ended") or time.time()) - start
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"
