"""Marks on checkpoints queued for evaluation: a checkpoint that `latentforge eval --all-checkpoints`
is about to read is never pruned by a training run still writing checkpoints into the same run.

A mark is one file per evaluating process, `checkpoints/.eval-queue-<host>-<pid>.json`, listing the
steps it has yet to evaluate; it shrinks as they are done and is removed at the end. A crashed
evaluation must not pin checkpoints forever, so a mark is honoured only while its process lives:
on the same host, while the pid exists; from another host (a shared file system), while the mark
was rewritten within the last STALE_SECONDS. Marking and pruning take the same file lock, so a
prune never deletes a checkpoint between the moment an evaluation lists it and the moment it marks it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from latentforge.track.files import write_json
from latentforge.track.listing import pid_alive

PREFIX = ".eval-queue-"
LOCK_FILE = ".prune.lock"
# A mark from another host that has not been rewritten for this long belongs to a dead evaluation.
STALE_SECONDS = 6 * 3600


@contextlib.contextmanager
def prune_lock(ckpt_dir: Path) -> Iterator[None]:
    """Exclusive between pruning and marking, across processes."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with open(ckpt_dir / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _live(mark: dict, path: Path) -> bool:
    if mark.get("host") == socket.gethostname():
        return pid_alive(int(mark.get("pid", 0)))
    return time.time() - path.stat().st_mtime < STALE_SECONDS


def queued_steps(ckpt_dir: Path) -> set[int]:
    """Steps that a live evaluation has yet to read; stale marks are removed on the way.
    Call under prune_lock."""
    steps: set[int] = set()
    if not ckpt_dir.is_dir():
        return steps
    for path in ckpt_dir.glob(f"{PREFIX}*.json"):
        try:
            mark = json.loads(path.read_text())
            live = _live(mark, path)
        except (OSError, json.JSONDecodeError, ValueError):
            continue  # being replaced right now, or not ours to judge
        if live:
            steps.update(int(s) for s in mark.get("steps", []))
        else:
            path.unlink(missing_ok=True)
    return steps


class EvalQueue:
    """This process's mark: the steps it will still evaluate."""

    def __init__(self, ckpt_dir: Path, steps: list[int]):
        self.path = ckpt_dir / f"{PREFIX}{socket.gethostname()}-{os.getpid()}.json"
        self.steps = list(steps)
        self._write()

    def _write(self) -> None:
        write_json(self.path, {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                               "steps": self.steps})

    def done(self, step: int) -> None:
        """`step` is evaluated: it may be pruned from now on."""
        self.steps.remove(step)
        self._write()

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def queued(ckpt_dir: Path, list_steps: Callable[[], list[int]]) -> Iterator[EvalQueue]:
    """Mark the checkpoints that `list_steps()` finds (listed under the lock, so none of them can be
    pruned before it is marked); the mark is removed on leaving, whatever happens."""
    with prune_lock(ckpt_dir):
        queue = EvalQueue(ckpt_dir, list_steps())
    try:
        yield queue
    finally:
        queue.close()
