"""Asynchronous checkpoint save (checkpoint.async_save): training is blocked only while the state is
copied to host memory; a background thread does everything that touches the disk.

A 124M model with its AdamW state is 1.4 GiB: torch.save, fsync and the rename take seconds, the copy
to pinned host memory a fraction of one. The pinned buffers are kept and reused by the next save, so
a save costs one device-to-host pass. At most one write is in flight: a new save first waits for the
previous one, which is also what makes reusing the buffers safe.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from latentforge.errors import CheckpointError

Key = tuple[Any, ...]  # where a tensor sits in the state: the keys and indices leading to it


def snapshot(state: Any, pinned: dict[Key, torch.Tensor] | None = None) -> Any:
    """A copy of `state` that later training cannot change: every tensor copied to the CPU (into the
    reusable pinned buffer `pinned[path]` when it is on a GPU and `pinned` is given), everything else
    deep-copied. Tensors that share memory (tied weights) share one copy, as torch.save would keep them."""
    copies: dict[tuple, torch.Tensor] = {}
    on_gpu = False

    def visit(value: Any, path: Key) -> Any:
        nonlocal on_gpu
        if isinstance(value, torch.Tensor):
            value = value.detach()
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                   value.dtype, value.device)
            if key in copies:
                return copies[key]
            if value.device.type == "cuda" and pinned is not None:
                buffer = pinned.get(path)
                if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                    buffer = pinned[path] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                buffer.copy_(value, non_blocking=True)
                on_gpu = True
                copies[key] = buffer
            else:
                copies[key] = value.to("cpu", copy=True)
            return copies[key]
        if isinstance(value, dict):  # a module's state_dict is an OrderedDict with `_metadata`
            out = type(value)((k, visit(v, (*path, k))) for k, v in value.items())
            if hasattr(value, "_metadata"):
                out._metadata = copy.deepcopy(value._metadata)
            return out
        if type(value) in (list, tuple):
            return type(value)(visit(v, (*path, i)) for i, v in enumerate(value))
        return copy.deepcopy(value)

    out = visit(state, ())
    if on_gpu:
        torch.cuda.synchronize()  # the non-blocking copies have landed before the writer reads them
    return out


def as_checkpoint_error(error: BaseException, what: str) -> BaseException:
    """An OS failure (disk full, a path in the way) as the one-line error the CLI shows."""
    if isinstance(error, OSError):
        return CheckpointError(f"cannot write {what}: {error.strerror or error}"
                               + (f" ({error.filename})" if error.filename else ""))
    return error


class CheckpointWriter:
    """Runs one checkpoint write at a time on a background thread; `wait` joins it and raises its error
    on the training thread."""

    def __init__(self, device: torch.device):
        self.pinned: dict[Key, torch.Tensor] | None = {} if device.type == "cuda" else None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.write_s = 0.0  # seconds the last finished write took on the thread

    def save(self, state: dict[str, Any], write: Callable[[dict[str, Any]], None]) -> None:
        """Snapshot `state` and start `write(snapshot)` in the background (after `wait`: one write at a time)."""
        if self.thread is not None:
            raise RuntimeError("a checkpoint write is still in flight: wait() for it first")
        frozen = snapshot(state, self.pinned)
        # Not a daemon: an interpreter that exits still finishes the checkpoint it is writing.
        self.thread = threading.Thread(target=self._run, args=(write, frozen), name="latentforge-checkpoint")
        self.thread.start()

    def _run(self, write: Callable[[dict[str, Any]], None], state: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            write(state)
        except BaseException as e:  # handed to the training thread by wait()
            self.error = e
        self.write_s = time.perf_counter() - start

    def wait(self) -> float | None:
        """Block until the write in flight is on disk and return the seconds it took (None if there was
        none); its failure is raised here, on the training thread."""
        if self.thread is None:
            return None
        self.thread.join()
        self.thread = None
        error, self.error = self.error, None
        if error is not None:
            raise error
        return self.write_s
