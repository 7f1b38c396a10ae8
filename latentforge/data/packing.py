"""Rows of tokens from a weighted mixture of sources, with exact, resumable positions.

Every loader worker of every rank is one *reader* among R = world_size * workers, and each reader
reads through L *lanes* (data.lanes), so there are V = R * L lane cursors per source. Lane l of reader
r reads visits v, v + V, v + 2V ... (v = r * L + l) of each source's endless sequence of shard visits
(a fresh permutation of the shards per pass), so within a pass no two lanes, readers or ranks read the
same shard (while V is at most the shard count). Row i of a reader comes from its lane i mod L: with
L > 1 the rows of a batch are text from L different places, not L consecutive pieces of one document.
A reader's whole position is, per source and lane, (visit, document, token offset) plus its row count:
the stream after `load_state_dict` is the stream that never stopped, mid-shard and mid-document.

A row holds seq_len tokens. Packed, it is filled with consecutive documents (a document that does
not fit continues at the start of the next row); unpacked, it holds one document (or the next piece
of a long one) and padding. doc_ids number the documents within a row (-1: padding), positions
restart at 0 with each of them, and a document's last token (its end-of-text) has no label, so
nothing is ever predicted across a document boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from latentforge.data.sources import Source
from latentforge.errors import ConfigError, DataError

IGNORE = -100

Piece = Callable[[int], "tuple[np.ndarray, np.ndarray] | None"]


class Cursor:
    """One reader's position in one source; `piece(n)` gives the next at most n tokens of the
    current document with their labels."""

    def __init__(self, source: Source, reader: int, readers: int, visit: int = 0, doc: int = 0, offset: int = 0):
        self.source, self.reader, self.readers = source, reader, readers
        self.visit, self.doc, self.offset = visit, doc, offset
        self.docs: list[Any] | None = None
        self.tokens: np.ndarray | None = None

    def state(self) -> list[int]:
        return [self.visit, self.doc, self.offset]

    def _load(self) -> None:
        empty = 0
        while self.tokens is None:
            if self.docs is None:
                epoch, shard = self.source.shard_at(self.reader + self.visit * self.readers)
                raw = self.source.documents(shard)
                order = self.source.document_order(epoch, shard, len(raw))
                self.docs = [raw[i] for i in order if not self.source.held_out(shard, int(i))]
            if self.doc < len(self.docs):
                self.tokens = self.source.encode(self.docs[self.doc])
                return
            empty = empty + 1 if not self.docs else 0
            if empty > len(self.source):
                raise DataError(f"data source {self.source.spec.path} has no training documents "
                                "(all empty or held out: lower data.valid_fraction)")
            self.visit, self.doc, self.offset, self.docs = self.visit + 1, 0, 0, None

    def piece(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        self._load()
        ids, labels, self.offset = cut(self.tokens, self.offset, n)
        if self.offset == len(self.tokens):
            self.doc, self.offset, self.tokens = self.doc + 1, 0, None
            if self.doc == len(self.docs):  # the shard is read to the end: it counts as consumed now
                self.visit, self.doc, self.docs = self.visit + 1, 0, None
        return ids, labels


class DocumentQueue:
    """Pieces of a finite sequence of documents (the held-out set); None once they are used up."""

    def __init__(self, docs: Iterator[np.ndarray]):
        self.docs, self.tokens, self.offset = docs, None, 0

    def piece(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.tokens is None:
            self.tokens, self.offset = next(self.docs, None), 0
            if self.tokens is None:
                return None
        ids, labels, self.offset = cut(self.tokens, self.offset, n)
        if self.offset == len(self.tokens):
            self.tokens = None
        return ids, labels


def cut(tokens: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """At most n tokens of a document from `start`, their labels (the next token of the same
    document; none for the last) and where the next piece starts."""
    end = min(len(tokens), start + n)
    labels = np.full(end - start, IGNORE, dtype=np.int64)
    labels[: len(tokens[start + 1: end + 1])] = tokens[start + 1: end + 1]
    return tokens[start:end], labels, end


def fill_row(piece: Piece, seq_len: int, pack: bool, pad_id: int) -> dict[str, np.ndarray] | None:
    """One row from `piece` (None when it has nothing left and the row is empty)."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    doc_ids = np.full(seq_len, -1, dtype=np.int32)
    positions = np.zeros(seq_len, dtype=np.int64)
    filled, segment = 0, 0
    while filled < seq_len:
        got = piece(seq_len - filled)
        if got is None:
            break
        n = len(got[0])
        ids[filled: filled + n], labels[filled: filled + n] = got
        doc_ids[filled: filled + n] = segment
        positions[filled: filled + n] = np.arange(n)
        filled, segment = filled + n, segment + 1
        if not pack:
            break
    if filled == 0:
        return None
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids, "positions": positions}


def stack(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


class MixtureStream(IterableDataset):
    """Endless batches of `rows` rows for one rank; each loader worker is its own reader. The
    source of every row is drawn from the weights by a generator keyed on (seed, reader, row)."""

    def __init__(self, sources: list[Source], seq_len: int, rows: int, pack: bool, seed: int, rank: int,
                 world_size: int, lanes: int = 1):
        self.sources, self.seq_len, self.rows, self.pack = sources, seq_len, rows, pack
        self.seed, self.rank, self.world_size, self.lanes = seed, rank, world_size, lanes
        weights = np.array([s.spec.weight for s in sources])
        self.cumulative = np.cumsum(weights / weights.sum())
        # The position after the last batch yielded (None: the start); what state_dict saves.
        self.position: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]

    def readers(self) -> tuple[int, int]:
        """(this reader's index, the number of readers) in this process."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def source_of(self, reader: int, row: int) -> int:
        u = np.random.default_rng([self.seed, reader, row]).random()
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.sources) - 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self.readers()
        L = self.lanes
        pos = self.position or {"reader": reader, "readers": readers, "row": 0,
                                "cursors": [[[0, 0, 0]] * L for _ in self.sources]}
        # A position saved before lanes existed holds one [visit, doc, offset] per source: one lane.
        saved = [c if isinstance(c[0], list) else [c] for c in pos["cursors"]]
        if ((pos["reader"], pos["readers"]) != (reader, readers) or len(saved) != len(self.sources)
                or any(len(lanes) != L for lanes in saved)):
            raise ConfigError(f"the saved data position is reader {pos['reader']} of {pos['readers']} with "
                              f"{len(saved)} sources of {len(saved[0])} lanes; resume with the same data.workers, "
                              f"number of processes, data.sources and data.lanes")
        cursors = [[Cursor(s, reader * L + lane, readers * L, *c) for lane, c in enumerate(lanes)]
                   for s, lanes in zip(self.sources, saved)]
        row = pos["row"]
        while True:
            batch = []
            for _ in range(self.rows):
                cursor = cursors[self.source_of(reader, row)][row % L]
                batch.append(fill_row(cursor.piece, self.seq_len, self.pack, self.sources[0].eos_id))
                row += 1
            self.position = {"reader": reader, "readers": readers, "row": row,
                             "cursors": [[c.state() for c in lanes] for lanes in cursors]}
            yield {**stack(batch), "reader": reader, "visits": [[c.visit for c in lanes] for lanes in cursors]}
