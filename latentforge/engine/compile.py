"""torch.compile as the engine calls it, for modules and plain functions alike."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

Compilable = TypeVar("Compilable", bound=Callable)


def compiled(fn: Compilable, mode: str = "default") -> Compilable:
    with warnings.catch_warnings():
        # torch.compile imports torch.utils.mkldnn, whose own classes still use a deprecated torch.jit decorator.
        warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated",
                                category=DeprecationWarning, module=r"torch\.jit")
        return torch.compile(fn, mode=mode)
