"""torch.compile as the engine calls it, for modules and plain functions alike."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from latentforge.errors import ConfigError

Compilable = TypeVar("Compilable", bound=Callable)


def compiled(fn: Compilable, mode: str = "default", options: dict[str, Any] | None = None) -> Compilable:
    """`options`: inductor settings (train.compile_options), which torch takes instead of a mode; a name or
    type it does not know is a ConfigError here, before anything is traced."""
    with warnings.catch_warnings():
        # torch.compile imports torch.utils.mkldnn, whose own classes still use a deprecated torch.jit decorator.
        warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated",
                                category=DeprecationWarning, module=r"torch\.jit")
        if not options:
            return torch.compile(fn, mode=mode)
        try:
            return torch.compile(fn, options=dict(options))
        except RuntimeError as e:
            reason = str(e).split(", known options are")[0]
            raise ConfigError(f"train.compile_options: {reason[0].lower()}{reason[1:]} (torch {torch.__version__}; "
                              f"the names are torch._inductor.config's)") from None
