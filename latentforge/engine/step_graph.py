"""The whole training update as one CUDA graph (train.cuda_graph).

A small model's step is a few hundred kernels of a few microseconds each: launching them from Python
costs more than running them. torch.compile's reduce-overhead mode graphs the forward and the backward,
but the clipping, the guard, the optimizer and the bookkeeping between them still launch one by one.
Here the update the Trainer would run eagerly -- forward, backward, gradient clipping, the device-side
guard, the fused AdamW or BatchedMuon step -- is recorded once as a CUDA graph and replayed: a step is then one copy of
the batch into static buffers, one fill of the learning rate and one graph launch.

The recorded update replays exactly what it recorded: the kernels, and the Python values the task read
while it was recorded. So a graph is kept per batch signature (tensor shapes and dtypes, and every
non-tensor value of the batch); a new signature is recorded anew after `warmup` eager steps. A task whose
batches change a host value every step would record forever: after MAX_RECORDINGS recordings the Trainer
goes on without new graphs and warns once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from latentforge.errors import ConfigError

MAX_RECORDINGS = 8


def signature(batch: dict[str, Any]) -> tuple[Hashable, ...]:
    """What a recorded graph depends on: each tensor's shape, dtype and device, each other value itself."""
    return tuple((k, (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else v)
                 for k, v in sorted(batch.items()))


class StepGraph:
    """Records `update(batch)` as a CUDA graph and replays it for batches of the same signature."""

    def __init__(self, update: Callable[[dict[str, Any]], Any], optimizers: list[torch.optim.Optimizer],
                 device: torch.device, warmup: int = 2):
        self.update, self.optimizers, self.warmup = update, optimizers, warmup
        # Fused AdamW and BatchedMuon read a tensor learning rate on the device: one fill per step.
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.stream = torch.cuda.Stream(device)
        self.key: tuple[Hashable, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Any] = {}
        self.outputs: Any = None
        self.eager_steps = 0
        self.recordings = 0

    def reset(self) -> None:
        """Forget the graph: the optimizer's state or a buffer it reads was replaced."""
        self.graph, self.key, self.static, self.outputs, self.eager_steps = None, None, {}, None, 0

    def __call__(self, batch: dict[str, Any], lr: float, context: tuple[Hashable, ...] = ()) -> Any:
        """One update on `batch` at learning rate `lr` (the optimizer's groups hold it as a float already).
        `context`: anything else the graph depends on (the data pointers of buffers that may be replaced)."""
        if not isinstance(batch, dict):
            raise ConfigError(f"train.cuda_graph=true needs batches that are dicts (got {type(batch).__name__})")
        key = (context, signature(batch))
        if key != self.key:
            self.reset()
            self.key = key
            self.static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        # The eager warm-up steps read the static buffers too: torch.compile then specialises on them (a
        # batch whose tensors alias one another would make it recompile, and compiling cannot be recorded).
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                self.static[k].copy_(v, non_blocking=True)
        self.lr.fill_(lr)
        if self.graph is None:
            if self.eager_steps < self.warmup or self.recordings >= MAX_RECORDINGS:
                self.eager_steps += 1
                return self._eager(self.static)
            self._record()
        self.graph.replay()
        return self.outputs

    @contextlib.contextmanager
    def _device_lr(self) -> Iterator[None]:
        """The optimizers read the learning rate from the device tensor, in the eager steps as in the recorded
        ones: both then do the same arithmetic (BatchedMuon's decay and update round differently with a float
        LR), so a run whose graph is recorded anew, as after a resume, takes the same steps."""
        groups = [g for o in self.optimizers for g in o.param_groups]
        floats = [g["lr"] for g in groups]
        for g in groups:
            # `capturable` only gates the optimizer's graph check: the fused kernel is the same either way.
            g["lr"], g["capturable"] = self.lr, True
        try:
            yield
        finally:
            for g, lr in zip(groups, floats):
                g["lr"], g["capturable"] = lr, False

    def _eager(self, batch: dict[str, Any]) -> Any:
        """An eager update on a side stream (CUDA's recipe before recording: lazy initialisations happen
        outside the recorded stream)."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), self._device_lr():
            outputs = self.update(batch)
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def _record(self) -> None:
        self.recordings += 1
        if self.recordings == MAX_RECORDINGS:
            warnings.warn(f"train.cuda_graph: the batches changed shape or host values {MAX_RECORDINGS} times; "
                          "training goes on without recording new graphs", RuntimeWarning, stacklevel=2)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with self._device_lr(), torch.cuda.graph(self.graph):
            self.outputs = self.update(self.static)
