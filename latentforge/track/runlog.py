"""The run's text log: each process appends the lines its console shows (progress, evaluations,
warnings, errors) to <run>/logs/rank<N>.log, so a run's story survives the terminal it ran in."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from latentforge.errors import LatentforgeError, TrainingStopped


class RunLog:
    def __init__(self, run_path: Path, rank: int):
        self.path = Path(run_path) / "logs" / f"rank{rank}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Appended to on resume; line-buffered, so a crash loses no finished line.
        self.file: TextIO | None = open(self.path, "a", buffering=1)

    def write(self, message: str) -> None:
        if self.file is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in message.splitlines() or [""]:
            self.file.write(f"{stamp}  {line}\n")

    @contextlib.contextmanager
    def warnings(self) -> Iterator[None]:
        """Every warning shown while the block runs is also written here."""
        show = warnings.showwarning

        def show_and_log(message: Any, category: type[Warning], filename: str, lineno: int, *args: Any) -> None:
            self.write(f"warning: {category.__name__}: {message} ({filename}:{lineno})")
            show(message, category, filename, lineno, *args)

        warnings.showwarning = show_and_log
        try:
            yield
        finally:
            warnings.showwarning = show

    def failure(self, error: BaseException) -> None:
        """The line the console shows for an error that ended the run."""
        if isinstance(error, KeyboardInterrupt):
            self.write("aborted (second Ctrl-C)")
        elif isinstance(error, TrainingStopped):
            self.write(f"stopped: {error}")
        elif isinstance(error, LatentforgeError):
            self.write(f"error: {error}")
        else:
            self.write(f"error: {type(error).__name__}: {error}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
