"""A data source as a list of shards of documents, whatever it is on disk: a shard directory built by
`latentforge data build` (a shard = a tar file), or raw text tokenized on the fly (a shard = a file).

The order in which shards are read is a pure function of (seed, source seed, pass): every pass is a
fresh permutation, so shards are sampled without replacement within a pass. Documents are shuffled
within a shard the same way. Held-out documents are picked by a hash of (shard, document index), so
the split never depends on the order of reading, the number of workers or the number of ranks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentforge.config import require
from latentforge.data import rawtext, shards
from latentforge.data.tokenizer import load_tokenizer
from latentforge.errors import ConfigError

SOURCE_KEYS = ("path", "weight", "seed")


@dataclass(frozen=True)
class SourceSpec:
    path: str
    weight: float = 1.0
    seed: int = 0


def parse_sources(specs: list[dict[str, Any]], key: str) -> list[SourceSpec]:
    """`[{path, weight, seed}, ...]` checked (the config key named in errors); a source's seed defaults
    to its index, so every source has its own shard shuffle."""
    parsed = []
    for i, spec in enumerate(specs):
        name = f"{key}[{i}]"
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        require(not unknown, name, f"has unknown keys {unknown} (allowed: {', '.join(SOURCE_KEYS)})")
        path, weight, seed = spec.get("path"), spec.get("weight", 1.0), spec.get("seed", i)
        require(isinstance(path, str) and bool(path), f"{name}.path", "must be a shard directory, file or glob")
        require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0, f"{name}.weight",
                f"must be a number > 0 (got {weight!r})")
        require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, f"{name}.seed",
                f"must be an integer >= 0 (got {seed!r})")
        parsed.append(SourceSpec(path, float(weight), seed))
    return parsed


@dataclass
class Source:
    """One source's shards; `documents(i)` reads shard i (token arrays, or text still to encode)."""

    spec: SourceSpec
    tokenizer: str
    # The stream's seed: with the source's own seed it keys every shard and document order.
    seed: int
    # Documents whose hash falls below this fraction are held out of training (0: none).
    valid_fraction: float = 0.0
    names: list[str] = field(init=False)
    manifest: shards.Manifest | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        tok = load_tokenizer(self.tokenizer)
        self.eos_id = tok.eos_id
        if shards.is_shard_dir(self.spec.path):
            self.manifest = shards.read_manifest(self.spec.path)
            built = self.manifest.info.get("tokenizer_fingerprint")
            if built != tok.fingerprint:
                copy = self.manifest.root / "tokenizer.json"
                use = f"data.tokenizer={copy}" if copy.is_file() else "data.tokenizer=bytes"
                raise ConfigError(f"{self.spec.path} was built with tokenizer {self.manifest.info.get('tokenizer')!r}, "
                                  f"which differs from data.tokenizer={self.tokenizer!r} (use {use})")
            self.names = [e.shard for e in self.manifest.shards]
        else:
            self.files = rawtext.expand(self.spec.path)
            self.names = rawtext.names(self.files)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def documents(self, shard: int) -> list[Any]:
        if self.manifest is not None:
            return shards.read_shard(self.manifest.root, self.manifest.shards[shard])
        return rawtext.read_documents(self.files[shard])

    def encode(self, doc: Any) -> np.ndarray:
        """A document's token ids followed by end-of-text."""
        ids = doc if isinstance(doc, np.ndarray) else load_tokenizer(self.tokenizer).encode(doc)
        return np.append(np.asarray(ids, dtype=np.int64), self.eos_id)

    def shard_at(self, visit: int) -> tuple[int, int]:
        """(pass, shard) of the `visit`-th shard read from this source, counting over all passes."""
        epoch, position = divmod(visit, len(self))
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, self.spec.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self)))
        return epoch, int(self._perm[1][position])

    def document_order(self, epoch: int, shard: int, count: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.spec.seed, epoch, shard, 1]).permutation(count)

    def held_out(self, shard: int, doc: int) -> bool:
        if self.valid_fraction <= 0:
            return False
        return zlib.crc32(f"{self.names[shard]}\0{doc}".encode()) / 2**32 < self.valid_fraction
