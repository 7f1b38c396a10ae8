"""`model.init_from`: a new run starts from another run's weights (not its optimizer, step or data
position), or from weights the task loads itself (a Hugging Face checkpoint directory, say).

RUN[@STEP|@best] names a run directory or a run id under the runs directory; without a suffix its
latest checkpoint is used. Checkpoints written by one process or by several (`dcp/` shards) load alike.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from latentforge.config import Config, read_config
from latentforge.engine.checkpoint import SHARDED_DIR, is_sharded, load_checkpoint, load_sharded, resolve_checkpoint
from latentforge.engine.task import Task
from latentforge.errors import CheckpointError, ConfigError, LatentforgeError
from latentforge.track.rundir import RunDir, default_runs_dir

SELECTOR = re.compile(r"^(latest|best|\d+)$")
# A sharded checkpoint names the model's weights `model.<param>` under the `model` entry.
SHARDED_PREFIX = "model.model."


def split_spec(spec: str) -> tuple[str, str]:
    """`RUN@STEP` -> (RUN, STEP); `RUN` -> (RUN, latest). An `@` that is not followed by a step,
    best or latest belongs to the path."""
    name, at, which = spec.rpartition("@")
    return (name, which) if at and SELECTOR.match(which) else (spec, "latest")


def find_run(name: str, runs_dir: str | Path | None) -> RunDir | None:
    for path in (Path(name).expanduser(), default_runs_dir(runs_dir) / name):
        if (path / "run.json").is_file():
            return RunDir(path)
    return None


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a checkpoint, whether one process wrote them (state.pt) or several (dcp/)."""
    state = load_checkpoint(path)
    if not is_sharded(path):
        return state["model"]
    try:
        metadata = FileSystemReader(path / SHARDED_DIR).read_metadata()
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path / SHARDED_DIR} cannot be read: {str(e).splitlines()[0]}") from None
    weights = {key: torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in metadata.state_dict_metadata.items()
               if key.startswith(SHARDED_PREFIX) and isinstance(m, TensorStorageMetadata)}
    load_sharded(path, weights)
    return {key.removeprefix(SHARDED_PREFIX): value for key, value in weights.items()}


def _names(keys: list[str], limit: int | None = None) -> str:
    shown = keys if limit is None else keys[:limit]
    more = f" (and {len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def load_fitting(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool, source: str) -> list[str]:
    """Copy `weights` into `model`. Strict: every key and shape must match, else one CheckpointError
    line. Otherwise the weights that fit are loaded; returns a line for each kind that did not."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    problems = {
        "missing keys (left as initialised)": missing,
        "unexpected keys (ignored)": unexpected,
        "keys of another shape (left as initialised)": [
            f"{k} {list(weights[k].shape)} vs {list(own[k].shape)}" for k in reshaped],
    }
    if strict and (missing or unexpected or reshaped):
        found = "; ".join(f"{kind.split(' (')[0]}: {_names(keys, 5)}" for kind, keys in problems.items() if keys)
        raise CheckpointError(f"{source} does not fit this model ({found}); model.init_strict=false loads "
                              f"the weights that fit")
    model.load_state_dict({k: v for k, v in weights.items() if k in own and k not in reshaped}, strict=False)
    return [f"{source}: {len(keys)} {kind}: {_names(keys)}" for kind, keys in problems.items() if keys]


def model_differences(cfg: Config, run: RunDir) -> str:
    """The `model` keys whose values differ between the source run and this config (why shapes differ), as
    the tail of an error line; empty when the source's config cannot be read or nothing differs."""
    try:
        theirs = dataclasses.asdict(read_config(run.config_path).model)
    except LatentforgeError:
        return ""
    mine = dataclasses.asdict(cfg.model)
    differ = [f"model.{key}={theirs[key]!r} (here {value!r})" for key, value in mine.items()
              if key not in ("init_from", "init_strict") and key in theirs and theirs[key] != value]
    return f"; the source run was trained with {', '.join(differ)}" if differ else ""


def init_model(cfg: Config, task: Task, model: nn.Module,
               runs_dir: str | Path | None) -> tuple[dict[str, Any], list[str]]:
    """Load cfg.model.init_from into `model`; returns what run.json records of the source, and the
    lines to show (keys a partial load left out)."""
    spec = cfg.model.init_from
    source = f"model.init_from={spec}"
    name, which = split_spec(spec)
    run = find_run(name, runs_dir)
    if run is None:
        path = Path(spec).expanduser()
        if task.init_from_path(model, path):
            return {"path": str(path.resolve())}, []
        raise ConfigError(f"{source} is not a run (looked for a directory with run.json and in "
                          f"{default_runs_dir(runs_dir)}/) nor weights the {task.name} task can load")
    best = (run.info().get("best") or {}).get("step")
    try:
        path = resolve_checkpoint(run.checkpoints, which, best)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    try:
        lines = load_fitting(model, checkpoint_weights(path), cfg.model.init_strict, source)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{model_differences(cfg, run)}") from None
    return {"run": str(run.path.resolve()), "step": int(path.name.removeprefix("step_")),
            "checkpoint": str(path.resolve())}, lines
