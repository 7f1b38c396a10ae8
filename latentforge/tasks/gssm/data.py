"""GSSM datasets: an endless stream of fresh sequences, or a finite train set (n sequences, repeated
over epochs) with a held-out test set; either generated from seeds or read from a file that
`latentforge data generate` wrote.

Train and test are different streams of one seed (keys 2*seed and 2*seed+1), so they never share
a sequence's randomness. Each sequence carries its Bayes-optimal loss (the mean over its scored
tokens), so training logs the gap to the optimum at no extra cost.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.data.epochs import EpochSampler
from latentforge.data.stream import IndexedStream
from latentforge.errors import DataError
from latentforge.tasks.gssm.graph import Graph
from latentforge.tasks.gssm.optimum import forward_filter
from latentforge.tasks.gssm.sampling import sample

SPLIT_KEYS = {"train": 0, "test": 1}
FILE_FORMAT = "latentforge-gssm-1"


def stream_key(seed: int, split: str) -> int:
    return 2 * seed + SPLIT_KEYS[split]


@dataclass
class SequenceSet:
    """Sequences with what evaluation and probing need: tokens (n, T), hidden states (n, T, H),
    the mean optimal loss of each sequence (n,) (NaN when not computed), per-sequence tables."""

    tokens: torch.Tensor
    states: torch.Tensor
    optimal: torch.Tensor
    context_tables: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: torch.Tensor | slice) -> SequenceSet:
        return SequenceSet(self.tokens[rows], self.states[rows], self.optimal[rows],
                           {k: v[rows] for k, v in self.context_tables.items()})

    def to(self, device: torch.device) -> SequenceSet:
        return SequenceSet(self.tokens.to(device), self.states.to(device), self.optimal.to(device),
                           {k: v.to(device) for k, v in self.context_tables.items()})


def generate(graph: Graph, key: int, first: int, n: int, length: int, device: torch.device, optimum: bool,
             chunk: int = 4096) -> SequenceSet:
    """Sequences first .. first+n-1 of a stream, with their optimal loss (chunked to bound memory)."""
    parts = []
    for start in range(first, first + n, chunk):
        seqs = sample(graph, key, start, min(chunk, first + n - start), length, device)
        if optimum:
            optimal = forward_filter(graph, seqs.tokens, seqs.context_tables)[0].mean(1)
        else:
            optimal = torch.full((len(seqs.tokens),), float("nan"), dtype=torch.float64, device=device)
        parts.append(SequenceSet(seqs.tokens, seqs.states, optimal, seqs.context_tables))
    return SequenceSet(torch.cat([p.tokens for p in parts]), torch.cat([p.states for p in parts]),
                       torch.cat([p.optimal for p in parts]),
                       {k: torch.cat([p.context_tables[k] for p in parts]) for k in parts[0].context_tables})


class GSSMBatches(IndexedStream):
    """Training batches {inputs, targets, optimal}: epochs over a finite train set, or consecutive
    fresh sequences of the endless train stream (generated `chunk` sequences at a time)."""

    def __init__(self, graph: Graph, seed: int, length: int, batch_size: int, device: torch.device,
                 optimum: bool, train_set: SequenceSet | None, chunk: int):
        self.graph, self.key, self.length = graph, stream_key(seed, "train"), length
        self.batch_size, self.device, self.optimum = batch_size, device, optimum
        self.train_set = train_set
        self.sampler = EpochSampler(len(train_set), batch_size, seed, device) if train_set is not None else None
        self.chunk = max(chunk, batch_size)
        self._cached: tuple[int, SequenceSet] | None = None

    def sequences(self, index: int) -> SequenceSet:
        if self.train_set is not None:
            return self.train_set.select(self.sampler.rows(index))
        first = index * self.batch_size
        if self._cached is None or not (self._cached[0] <= first and first + self.batch_size
                                        <= self._cached[0] + len(self._cached[1])):
            self._cached = (first, generate(self.graph, self.key, first, self.chunk, self.length, self.device,
                                            self.optimum))
        start = first - self._cached[0]
        return self._cached[1].select(slice(start, start + self.batch_size))

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        seqs = self.sequences(index)
        tokens = seqs.tokens.long()
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "optimal": seqs.optimal}


# ----------------------------------------------------------------------------- files


def write_dataset(path: Path, splits: dict[str, SequenceSet], meta: dict[str, Any]) -> None:
    """One .npz with every split's tokens, states, optimal losses and tables, plus the config that
    made them; written to a temporary name and renamed."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps({"format": FILE_FORMAT, **meta}))}
    for split, seqs in splits.items():
        arrays[f"{split}/tokens"] = seqs.tokens.cpu().numpy().astype(np.int32)
        arrays[f"{split}/states"] = seqs.states.cpu().numpy().astype(np.int32)
        arrays[f"{split}/optimal"] = seqs.optimal.cpu().numpy()
        for name, table in seqs.context_tables.items():
            arrays[f"{split}/table/{name}"] = table.cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_dataset(path: str | Path) -> tuple[dict[str, Any], dict[str, SequenceSet]]:
    """The config a dataset file was made with, and its splits (on the CPU)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} is not a dataset written by `latentforge data generate` ({e})") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
        assert meta.get("format") == FILE_FORMAT
    except (KeyError, ValueError, AssertionError):
        raise DataError(f"{path} is not a dataset written by `latentforge data generate`") from None
    splits = {}
    for split in ("train", "test"):
        if f"{split}/tokens" not in arrays:
            raise DataError(f"{path} has no {split} split")
        tables = {k.split("/", 2)[2]: torch.from_numpy(v) for k, v in arrays.items()
                  if k.startswith(f"{split}/table/")}
        splits[split] = SequenceSet(torch.from_numpy(arrays[f"{split}/tokens"]),
                                    torch.from_numpy(arrays[f"{split}/states"]),
                                    torch.from_numpy(arrays[f"{split}/optimal"]), tables)
    return meta, splits
