"""Batches of row indices over a finite dataset, epoch after epoch, each epoch freshly shuffled.

Batch i is a pure function of (seed, i): resuming needs only the batch index, and a batch that
crosses an epoch boundary takes the end of one shuffle and the start of the next.
"""

from __future__ import annotations

import torch


class EpochSampler:
    def __init__(self, size: int, batch_size: int, seed: int, device: torch.device):
        self.size, self.batch_size, self.seed, self.device = size, batch_size, seed, device
        self._cache: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._cache = (epoch, torch.randperm(self.size, generator=g).to(self.device))
        return self._cache[1]

    def rows(self, index: int, count: int = 1) -> torch.Tensor:
        """The dataset rows of batches index .. index+count-1, one after the other."""
        start, chunks, taken, wanted = index * self.batch_size, [], 0, count * self.batch_size
        while taken < wanted:
            epoch, offset = divmod(start + taken, self.size)
            take = min(self.size - offset, wanted - taken)
            chunks.append(self.permutation(epoch)[offset: offset + take])
            taken += take
        return torch.cat(chunks)
