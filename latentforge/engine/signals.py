"""Catching Ctrl-C and SIGTERM for the length of a `with` block, so a long-running loop can stop
cleanly (checkpoint, forward to children) instead of dying mid-write."""

from __future__ import annotations

import signal
import threading
from abc import ABC, abstractmethod
from typing import Any

# What schedulers send shortly before a time limit or a preemption (Slurm's --signal=USR2@90, submitit's default).
PREEMPT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class CatchSignals(ABC):
    """Routes `signals` (SIGINT and SIGTERM) to `handle` inside the block (main thread only), then restores."""

    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    @abstractmethod
    def handle(self, signum: int, frame: Any) -> None:
        """What a signal does while the block runs."""

    def __enter__(self) -> CatchSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
