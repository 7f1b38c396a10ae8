"""The training progress bar: step, loss, lr, throughput and ETA (off with --quiet); its lines also
go to the run's text log when there is one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from latentforge.track.runlog import RunLog


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool, description: str = "train", log: RunLog | None = None):
        self.total, self.description, self.log = total, description, log
        self.progress = None
        if enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.task = self.progress.add_task(description, total=total, completed=start, stats="")
            self.progress.start()

    def update(self, step: int, stats: str | None = None) -> None:
        if self.log is not None and stats is not None:
            self.log.write(f"{self.description} {step}/{self.total}  {stats}")
        if self.progress is not None:
            fields = {"stats": stats} if stats is not None else {}
            self.progress.update(self.task, completed=step, **fields)

    def print(self, message: str) -> None:
        if self.log is not None:
            self.log.write(message)
        if self.progress is not None:
            self.progress.console.print(message, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


T = TypeVar("T")
_shown: ContextVar[TrainProgress | None] = ContextVar("latentforge_shown_progress", default=None)


@contextlib.contextmanager
def shown_in(progress: TrainProgress | None) -> Iterator[None]:
    """Inside, `tracked` puts its bars below `progress`'s (the training bar, or an eval command's)."""
    token = _shown.set(progress)
    try:
        yield
    finally:
        _shown.reset(token)


def tracked(items: Sequence[T], description: str) -> Iterator[T]:
    """`items` one by one, with a bar of their own below the running one while they last: for the batches of an
    evaluation, which can take minutes (greedy decoding). Where no bar is shown (--quiet, a library call), just
    `items`."""
    shown = _shown.get()
    bars = shown.progress if shown is not None else None
    if bars is None:
        yield from items
        return
    task = None
    try:
        task = bars.add_task(description, total=len(items), stats="")
        for item in items:
            yield item
            bars.advance(task)
    finally:
        if task is not None:
            bars.remove_task(task)
