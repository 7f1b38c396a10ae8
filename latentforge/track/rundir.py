"""The run directory: a run is its folder, so listing and reading runs never fall out of sync.

    <runs>/<id>/config.yaml      fully resolved config (enough to rerun)
                run.json         status, host, versions, device, params, times, step, best metric
                metrics.jsonl    every logged record (TensorBoard and W&B are sinks of the same)
                tb/              TensorBoard event files
                checkpoints/     step_XXXXXXXX/{state.pt, meta.json}
                artifacts/       plots, evaluation results
                logs/            rank<N>.log: each process's console lines (progress, evaluations, warnings, errors)
                profile/         torch.profiler traces (train.profile), with profile.jsonl beside
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from latentforge.errors import RunError
from latentforge.track.files import write_atomic, write_json

# `=` is allowed so that sweep runs can be named after their values (000-d_model=32).
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


def default_runs_dir(runs_dir: str | Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get("LATENTFORGE_RUNS") or "runs")


def new_run_id(label: str) -> str:
    return f"{label.replace('/', '-')}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


# A code snapshot (launch/slurm.py) holds its checkout's commit in this file, beside the package.
SNAPSHOT_SHA = "GIT_SHA"


def git_sha() -> str | None:
    """The commit of the latentforge checkout this code runs from, with -dirty if modified (for a snapshot
    of the code, the commit it was taken from)."""
    root = Path(__file__).resolve().parents[2]
    if (root / SNAPSHOT_SHA).is_file():
        return (root / SNAPSHOT_SHA).read_text().strip() or None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # ---- layout
    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    # ---- creation and lookup
    @classmethod
    def create(cls, runs_dir: Path, run_id: str, overwrite: bool) -> RunDir:
        if not RUN_ID.match(run_id):
            raise RunError(f"run name {run_id!r} may only hold letters, digits, '.', '_', '=' and '-'")
        path = Path(runs_dir) / run_id
        if path.exists():
            if not overwrite:
                raise RunError(f"run directory {path} already exists; pass --overwrite to replace it "
                               f"or --name to choose another name")
            if not path.is_dir() or (not (path / "run.json").is_file() and any(path.iterdir())):
                raise RunError(f"{path} exists and is not a latentforge run; refusing to overwrite it")
            shutil.rmtree(path)
        try:
            for sub in ("", "checkpoints", "artifacts"):
                (path / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {path}: {e.strerror}") from None
        return cls(path)

    @classmethod
    def find(cls, spec: str | Path, runs_dir: str | Path | None = None) -> RunDir:
        """A run directory given as a path or as an id under the runs directory."""
        spec_path = Path(spec)
        candidates = [spec_path, default_runs_dir(runs_dir) / str(spec)]
        for path in candidates:
            if (path / "run.json").is_file():
                run = cls(path)
                run.info()  # fail early on an unreadable run.json
                return run
        if spec_path.is_dir():
            raise RunError(f"{spec_path} is not a latentforge run (no run.json)")
        raise RunError(f"no run {str(spec)!r} (looked for a directory and in {default_runs_dir(runs_dir)}/)")

    # ---- run.json
    def info(self) -> dict[str, Any]:
        try:
            return json.loads(self.info_path.read_text())
        except OSError as e:
            raise RunError(f"cannot read {self.info_path}: {e.strerror}") from None
        except json.JSONDecodeError:
            raise RunError(f"{self.info_path} is not valid JSON; the run's record is damaged") from None

    def write_info(self, info: dict[str, Any]) -> None:
        info["updated"] = time.time()
        write_json(self.info_path, info)

    def update_info(self, **fields: Any) -> dict[str, Any]:
        info = self.info()
        info.update(fields)
        self.write_info(info)
        return info

    @staticmethod
    def host() -> str:
        return socket.gethostname()

    # ---- metrics.jsonl
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        # In step order: `eval --all-checkpoints` appends earlier steps' records after later ones.
        return sorted(records, key=lambda r: r.get("step", 0))

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records logged after `after_step`, so a resumed run's history has no duplicates."""
        records = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))


class FollowerRunDir(RunDir):
    """The run directory as seen by the ranks other than 0 of a distributed run: readable, but
    every write is rank 0's, so here writing does nothing."""

    def write_info(self, info: dict[str, Any]) -> None:
        """run.json is rank 0's."""

    def update_info(self, **fields: Any) -> dict[str, Any]:
        return self.info()

    def append_metrics(self, record: dict[str, Any]) -> None:
        """metrics.jsonl is rank 0's (with the metrics reduced over the ranks)."""

    def truncate_metrics(self, after_step: int) -> None:
        """metrics.jsonl is rank 0's."""
