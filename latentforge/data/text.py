"""Text for language models: the `data` config section, the resumable training stream and the fixed
held-out set. Task-agnostic: a task turns these batches into a loss.

A batch is a dict of tensors on the device: input_ids [B, T], labels [B, T] (-100: not scored),
doc_ids [B, T] (attention must stay within equal ids; -1 is padding) and positions [B, T] (the
position within the token's own document, for RoPE).
"""

from __future__ import annotations

import signal
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torchdata.stateful_dataloader import StatefulDataLoader

from latentforge.config import require
from latentforge.data.packing import DocumentQueue, MixtureStream, fill_row, stack
from latentforge.data.sources import Source, parse_sources
from latentforge.data.tokenizer import Tokenizer, load_tokenizer
from latentforge.engine.distributed import DistEnv
from latentforge.engine.signals import PREEMPT_SIGNALS
from latentforge.errors import ConfigError, DataError, LatentforgeError

__all__ = ["TextDataConfig", "TextBatches", "text_batches", "eval_batches", "load_tokenizer", "Tokenizer"]


@dataclass
class TextDataConfig:
    # [{path, weight, seed}, ...]: path is a shard directory built by `latentforge data build`, or raw
    # text tokenized on the fly (a .txt/.jsonl file, a directory of them, a glob, or the named corpus
    # python-stdlib: this Python's standard library source, see data/corpora.py); weight is the
    # source's share of rows (default 1); seed its own shard shuffle seed (default: its index).
    sources: list[dict[str, Any]] = field(default_factory=list)
    # "bytes" (256 byte ids + end-of-text), a tokenizer.json, or an HF model/tokenizer directory.
    tokenizer: str = "bytes"
    seq_len: int = 256
    # Pack documents into full rows (boundaries kept in doc_ids), or one document per row + padding.
    pack: bool = True
    # Loader worker processes per rank (0: read in the training process).
    workers: int = 0
    seed: int = 0
    # This fraction of the training sources' documents is held out for evaluation (never trained
    # on), unless valid_sources names separate held-out sources (same form as sources).
    valid_fraction: float = 0.01
    valid_sources: list[dict[str, Any]] = field(default_factory=list)
    # Rows of seq_len tokens in the held-out set (shared among sources by weight).
    eval_rows: int = 64
    # Batches each worker prepares ahead.
    prefetch: int = 2
    # Places each reader reads from at once, per source: row i of a batch comes from lane i mod lanes,
    # so a batch mixes text from `lanes` shards instead of holding consecutive rows of one document
    # (each shard is still read once a pass while readers x lanes is at most a source's shard count).
    lanes: int = 1

    def validate(self) -> None:
        require(bool(self.sources), "sources", "must list at least one source: [{path: DIR_OR_FILE, weight: 1}]")
        parse_sources(self.sources, "sources")
        parse_sources(self.valid_sources, "valid_sources")
        require(bool(self.tokenizer), "tokenizer", "must be bytes, a tokenizer.json or an HF directory")
        require(self.seq_len >= 1, "seq_len", f"must be >= 1 (got {self.seq_len})")
        require(self.workers >= 0, "workers", f"must be >= 0 (got {self.workers})")
        require(self.seed >= 0, "seed", f"must be >= 0 (got {self.seed})")
        require(0 <= self.valid_fraction < 1, "valid_fraction", f"must be in [0, 1) (got {self.valid_fraction})")
        require(self.eval_rows >= 1, "eval_rows", f"must be >= 1 (got {self.eval_rows})")
        require(self.prefetch >= 1, "prefetch", f"must be >= 1 (got {self.prefetch})")
        require(self.lanes >= 1, "lanes", f"must be >= 1 (got {self.lanes})")


def open_sources(cfg: TextDataConfig, held_out: bool = False) -> list[Source]:
    """The training sources (documents of the held-out fraction excluded), or the held-out ones."""
    if held_out and cfg.valid_sources:
        return [Source(s, cfg.tokenizer, cfg.seed) for s in parse_sources(cfg.valid_sources, "data.valid_sources")]
    fraction = 0.0 if cfg.valid_sources else cfg.valid_fraction
    return [Source(s, cfg.tokenizer, cfg.seed, fraction) for s in parse_sources(cfg.sources, "data.sources")]


def _ignore_stop_signals(worker: int) -> None:
    """Ctrl-C and a scheduler's warning (SIGUSR1/2) reach the whole process group: the training
    process decides when to stop (after a checkpoint) and ends its workers itself, so they must not
    die first. SIGTERM stays: it is how the loader ends its workers."""
    for sig in (signal.SIGINT, *PREEMPT_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)


def _one_line(e: LatentforgeError) -> LatentforgeError:
    """A worker's error re-raised by the loader carries the worker's traceback: keep its last line."""
    text = str(e).strip()
    if "Traceback" not in text:
        return e
    return type(e)(text.splitlines()[-1].split(": ", 1)[-1])


class TextBatches:
    """The training stream of one rank (a BatchStream). Its state is the loader's (every worker's
    position) plus the shard visits each reader has finished, from which `consumed_shards` (shard
    -> times read to the end, per source) is derived for the checkpoint. Under several processes
    every rank's state is gathered into the one state rank 0 saves."""

    def __init__(self, stream: MixtureStream, workers: int, prefetch: int, device: torch.device, env: DistEnv):
        self.stream, self.device, self.env = stream, device, env
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function here
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = StatefulDataLoader(stream, batch_size=None, num_workers=workers,
                                             prefetch_factor=prefetch if workers else None,
                                             pin_memory=device.type == "cuda", worker_init_fn=_ignore_stop_signals,
                                             # Its own generator: starting an iterator draws a seed, which
                                             # from the global RNG would shift dropout after a resume.
                                             generator=torch.Generator())
        self.iterator: Iterator[dict[str, Any]] | None = None
        # Reader index -> finished shard visits per source and lane, as of the last batch handed out.
        self.visits: dict[int, list[list[int]]] = {}

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.iterator is None:
            self.iterator = iter(self.loader)
        try:
            item = next(self.iterator)
        except LatentforgeError as e:
            raise _one_line(e) from None
        self.visits[int(item.pop("reader"))] = [[int(v) for v in lanes] for lanes in item.pop("visits")]
        return {k: v.to(self.device, non_blocking=True) for k, v in item.items()}

    def consumed_shards(self) -> dict[str, dict[str, int]]:
        """For every source, how many times each shard has been read to the end."""
        L = self.stream.lanes
        cursors = self.env.world_size * max(1, self.loader.num_workers) * L
        consumed: dict[str, Counter] = {s.spec.path: Counter() for s in self.stream.sources}
        for reader, visits in self.visits.items():
            for source, lanes in zip(self.stream.sources, visits):
                for lane, done in enumerate(lanes):
                    for k in range(done):
                        shard = source.shard_at(reader * L + lane + k * cursors)[1]
                        consumed[source.spec.path][source.names[shard]] += 1
        return {path: dict(sorted(counts.items())) for path, counts in consumed.items()}

    def _own_state(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "visits": dict(self.visits),
                "consumed_shards": self.consumed_shards()}

    def state_dict(self) -> dict[str, Any]:
        own = self._own_state()
        if not self.env.enabled:
            return own
        ranks: list[Any] = [None] * self.env.world_size
        torch_dist.all_gather_object(ranks, own)
        return {"ranks": ranks, "consumed_shards": _merge([r["consumed_shards"] for r in ranks])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" in state or self.env.enabled:
            saved = len(state.get("ranks", [state]))
            if saved != self.env.world_size:
                raise ConfigError(f"the checkpoint's data position was saved by {saved} processes; resume with "
                                  f"{saved} to continue its exact data order")
            state = state["ranks"][self.env.rank]
        self.loader.load_state_dict(state["loader"])
        # A state saved before lanes existed holds one count per source: one lane.
        self.visits = {int(k): [lanes if isinstance(lanes, list) else [lanes] for lanes in v]
                       for k, v in state["visits"].items()}
        self.iterator = None


def _merge(parts: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    merged: dict[str, Counter] = {}
    for part in parts:
        for path, counts in part.items():
            merged.setdefault(path, Counter()).update(counts)
    return {path: dict(sorted(counts.items())) for path, counts in merged.items()}


def text_batches(cfg: TextDataConfig, batch_size: int, device: torch.device, dist: DistEnv = DistEnv()) -> TextBatches:
    """The endless training stream of this rank: batch_size // world_size rows a batch (batch_size
    is the global batch), read from shards no other rank reads in the same pass."""
    if batch_size % dist.world_size:
        raise ConfigError(f"the batch size {batch_size} must divide evenly over {dist.world_size} processes")
    stream = MixtureStream(open_sources(cfg), cfg.seq_len, batch_size // dist.world_size, cfg.pack, cfg.seed,
                           dist.rank, dist.world_size, cfg.lanes)
    return TextBatches(stream, cfg.workers, cfg.prefetch, device, dist)


def _held_out_pieces(source: Source, use_all: bool) -> Iterator[np.ndarray]:
    """The held-out documents of a source in a fixed order (shards and documents as stored)."""
    for shard in range(len(source)):
        for i, doc in enumerate(source.documents(shard)):
            if use_all or source.held_out(shard, i):
                yield source.encode(doc)


def eval_batches(cfg: TextDataConfig, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The fixed, finite held-out set: data.eval_rows rows shared among the sources by weight, the
    same on every call and every rank."""
    separate = bool(cfg.valid_sources)
    sources = open_sources(cfg, held_out=True)
    total = sum(s.spec.weight for s in sources)
    rows = []
    for source in sources:
        queue = DocumentQueue(_held_out_pieces(source, use_all=separate))
        for _ in range(max(1, round(cfg.eval_rows * source.spec.weight / total))):
            row = fill_row(queue.piece, cfg.seq_len, cfg.pack, source.eos_id)
            if row is None:
                break
            rows.append(row)
    if not rows:
        raise DataError("the held-out set is empty: raise data.valid_fraction or set data.valid_sources")
    return [{k: v.to(device) for k, v in stack(rows[i: i + batch_size]).items()}
            for i in range(0, len(rows), batch_size)]
