"""Seeding and capturing every random number generator (python, numpy, torch CPU and CUDA), and
deterministic kernels (`train.deterministic`)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from latentforge.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """Kernels that give the same bits on every run: torch's deterministic algorithms (an op without
    one raises), cuDNN without autotuning, and the fixed cuBLAS workspace that deterministic cuBLAS
    needs; that must be set before cuBLAS starts, so this runs before CUDA is touched. Process-wide."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def explain_nondeterministic_ops() -> Iterator[None]:
    """An op with no deterministic kernel (train.deterministic) becomes one ConfigError line."""
    try:
        yield
    except RuntimeError as e:
        if "does not have a deterministic implementation" not in str(e):
            raise
        raise ConfigError(f"train.deterministic=true, but {str(e).split(',')[0]} on {torch.__version__}; "
                          f"train this config with train.deterministic=false") from None


def rng_state() -> dict[str, Any]:
    """All generator states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every generator comes out of the block as it went in, whatever the block draws or raises."""
    before = rng_state()
    try:
        yield
    finally:
        set_rng_state(before)
