"""Checkpoints: `checkpoints/step_XXXXXXXX/{state.pt, meta.json}`, written to a temporary
directory and renamed, verified by checksum on load, pruned to the last K plus the best.

A run of several processes also writes `dcp/`: the model and optimizer through
torch.distributed.checkpoint, each rank its own shards, loadable by any number of ranks (state.pt
then holds the rest: step, RNG, data position)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from latentforge.engine.distributed import DistEnv, barrier, broadcast
from latentforge.engine.eval_queue import prune_lock, queued_steps
from latentforge.errors import CheckpointError
from latentforge.track.files import write_json

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SHARDED_DIR = "dcp"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashingFile:
    """A file that hashes the bytes written to it: a checkpoint's checksum then costs no second pass
    over the file (a 124M model with its optimizer is 1.4 GiB)."""

    def __init__(self, f: Any):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], kind: str,
                    extra_meta: dict[str, Any] | None = None, sharded: dict[str, Any] | None = None,
                    env: DistEnv = DistEnv()) -> Path:
    """Write state for `step` atomically; an existing checkpoint of the same step is replaced.
    With `sharded`, every rank calls this: all write their shards of it, rank 0 the rest."""
    final = ckpt_dir / step_dir_name(step)
    # Every rank must name the same temporary directory, so only one process's pid is used.
    tmp = ckpt_dir / f".tmp-{step_dir_name(step)}-{broadcast(os.getpid(), env)}"
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if sharded is not None:
        barrier(env)
        dcp.save(sharded, checkpoint_id=tmp / SHARDED_DIR)
        barrier(env)
    if not env.is_main:
        barrier(env)
        return final
    with open(tmp / STATE_FILE, "wb") as f:
        hashing = _HashingFile(f)
        torch.save(state, hashing)
        f.flush()
        os.fsync(f.fileno())
    meta = {"step": step, "kind": kind, "time": time.time(), "sha256": hashing.digest.hexdigest(),
            **(extra_meta or {})}
    write_json(tmp / META_FILE, meta)
    if final.exists():
        old = ckpt_dir / f".old-{step_dir_name(step)}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    barrier(env)
    return final


def is_sharded(path: Path) -> bool:
    return (path / SHARDED_DIR).is_dir()


def load_sharded(path: Path, template: dict[str, Any]) -> None:
    """Fill `template` (state dicts shaped for this process's ranks) from a checkpoint's shards."""
    try:
        with warnings.catch_warnings():
            # One-process commands (eval, predict, model.init_from) read shards without a process group on purpose.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning,
                                    module=r"torch\.distributed\.checkpoint")
            dcp.load(template, checkpoint_id=path / SHARDED_DIR)
    except (RuntimeError, ValueError, KeyError, OSError, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path / SHARDED_DIR} cannot be read: {str(e).splitlines()[0]}") from None


def list_checkpoints(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints, oldest first (temporary directories are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for d in ckpt_dir.iterdir():
        if d.is_dir() and d.name.startswith("step_") and (d / META_FILE).is_file():
            try:
                steps.append(int(d.name[len("step_"):]))
            except ValueError:
                continue
    return sorted(steps)


def resolve_checkpoint(ckpt_dir: Path, which: str | int, best_step: int | None) -> Path:
    """'latest', 'best' or a step number -> the checkpoint directory."""
    steps = list_checkpoints(ckpt_dir)
    if not steps:
        raise CheckpointError(f"no checkpoint in {ckpt_dir}")
    if which == "latest":
        step = steps[-1]
    elif which == "best":
        if best_step is None or best_step not in steps:
            raise CheckpointError(f"no best checkpoint in {ckpt_dir} (was checkpoint.metric evaluated?)")
        step = best_step
    else:
        try:
            step = int(which)
        except ValueError:
            raise CheckpointError(f"checkpoint must be latest, best or a step number (got {which!r})") from None
        if step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} (have: {', '.join(map(str, steps))})")
    return ckpt_dir / step_dir_name(step)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify one checkpoint directory; a damaged one is a CheckpointError."""
    meta_path, state_path = path / META_FILE, path / STATE_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path} has no readable {META_FILE}") from None
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}")
    if meta.get("sha256") and _sha256(state_path) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {state_path} is truncated or corrupt (checksum mismatch)")
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"checkpoint {state_path} cannot be read: {str(e).splitlines()[0]}") from None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Remove half-written checkpoints left by a process that died while saving."""
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            if d.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(d, ignore_errors=True)


def prune_checkpoints(ckpt_dir: Path, keep: int, protected: set[int]) -> None:
    """Remove all but the newest `keep` checkpoints, never one whose step is protected nor one
    queued for evaluation (engine/eval_queue.py)."""
    with prune_lock(ckpt_dir):
        protected = protected | queued_steps(ckpt_dir)
        prunable = [s for s in list_checkpoints(ckpt_dir) if s not in protected]
        for step in prunable[:-keep] if keep > 0 else prunable:
            shutil.rmtree(ckpt_dir / step_dir_name(step), ignore_errors=True)
