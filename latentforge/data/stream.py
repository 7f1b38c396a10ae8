"""The common shape of synthetic training streams: batch i is a pure function of i, so the
stream's whole state is the index of the next batch (exact resume, any-rank sharding)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class IndexedStream(ABC):
    index: int = 0

    @abstractmethod
    def batch(self, index: int) -> Any:
        """Batch `index`, the same whenever it is asked for."""

    def next_batch(self) -> Any:
        batch = self.batch(self.index)
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
