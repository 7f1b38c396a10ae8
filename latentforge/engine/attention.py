"""train.sdpa_backends: which kernels scaled_dot_product_attention may use while the model trains.

torch picks among the enabled backends itself (cuDNN's flash kernels on a Hopper GPU, flash on a CPU); naming
them lets a run measure one against another, or rule one out. Evaluation and generation keep torch's choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from latentforge.errors import ConfigError

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
CPU_BACKENDS = ("flash", "math")


def attention_context(names: list[str], device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the training forward and backward run in: the named backends only (and, where
    none of them can run the model's attention, a one-line ConfigError), or for an empty list torch's choice."""
    if not names:
        return contextlib.nullcontext
    if device.type != "cuda" and not set(names) <= set(CPU_BACKENDS):
        raise ConfigError(f"train.sdpa_backends={names}: {device.type} has {' and '.join(CPU_BACKENDS)} only "
                          "(cudnn and efficient need a CUDA device)")
    backends = [BACKENDS[name] for name in names]

    @contextlib.contextmanager
    def only_these() -> Iterator[None]:
        try:
            with sdpa_kernel(backends):
                yield
        except RuntimeError as e:  # compiled, torch's error arrives wrapped, its message kept
            if "No available kernel" not in str(e):
                raise
            raise ConfigError(f"train.sdpa_backends={names}: none of them can run this model's attention (torch's "
                              "warnings say why); add math, or leave the list empty for torch's choice") from None

    return only_these
