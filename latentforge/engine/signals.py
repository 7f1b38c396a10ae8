"""Catching Ctrl-C and SIGTERM for the length of a `with` block, so a long-running loop can stop
cleanly (checkpoint, forward to children) instead of dying mid-write."""

from __future__ import annotations

import signal
import threading
from abc import ABC, abstractmethod
from typing import Any


class CatchSignals(ABC):
    """Routes SIGINT and SIGTERM to `handle` inside the block (main thread only), then restores."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    @abstractmethod
    def handle(self, signum: int, frame: Any) -> None:
        """What a signal does while the block runs."""

    def __enter__(self) -> CatchSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
