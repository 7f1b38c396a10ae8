"""Tokenized text as WebDataset tar shards: `latentforge data build` writes them, training reads them.

A shard directory holds `shard-NNNNNN.tar` files (one sample per document: `<key>.npy`, its token
ids without the end-of-text token), `manifest.jsonl` (one line per shard: file, documents, tokens,
bytes, sha256), `dataset.json` (the tokenizer and totals) and, for an HF tokenizer, a copy of it as
`tokenizer.json`. Every shard is checked against its manifest line when it is read, so a truncated,
corrupt or swapped file stops training with one line naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentforge.data import rawtext
from latentforge.data.tokenizer import HFTokenizer, load_tokenizer
from latentforge.errors import ConfigError, DataError
from latentforge.track.files import write_atomic, write_json

MANIFEST = "manifest.jsonl"
INFO = "dataset.json"
FORMAT = "latentforge-text-shards/1"
DEFAULT_SHARD_TOKENS = 4_000_000


@dataclass
class ShardEntry:
    shard: str
    documents: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    root: Path
    info: dict[str, Any]
    shards: list[ShardEntry]


def is_shard_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def read_manifest(root: str | Path) -> Manifest:
    """A shard directory's manifest, with every shard file present and of the size it records."""
    root = Path(root).expanduser()
    try:
        info = json.loads((root / INFO).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{root / INFO} cannot be read ({getattr(e, 'strerror', None) or e}); "
                        "rebuild with latentforge data build") from None
    if info.get("format") != FORMAT:
        raise DataError(f"{root / INFO} is not a {FORMAT} dataset")
    shards = []
    for n, line in enumerate((root / MANIFEST).read_text().splitlines(), 1):
        try:
            entry = ShardEntry(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(f"{root / MANIFEST} line {n} is malformed ({e})") from None
        file = root / entry.shard
        if not file.is_file():
            raise DataError(f"{file} is listed in {root / MANIFEST} but missing")
        size = file.stat().st_size
        if size != entry.bytes:
            raise DataError(f"{file} has {size} bytes but {root / MANIFEST} says {entry.bytes}: the manifest "
                            "disagrees with its shard (rebuild with latentforge data build)")
        shards.append(entry)
    if not shards:
        raise DataError(f"{root / MANIFEST} lists no shards")
    return Manifest(root, info, shards)


def read_shard(root: Path, entry: ShardEntry) -> list[np.ndarray]:
    """The token ids of every document of one shard, checked against its manifest line."""
    file = root / entry.shard
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read shard {file}: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise DataError(f"shard {file} is corrupt: its sha256 differs from {root / MANIFEST}")
    docs = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".npy"):
                    docs.append(np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False))
    except (tarfile.TarError, ValueError, OSError) as e:
        raise DataError(f"shard {file} cannot be read as a tar of .npy documents: {e}") from None
    tokens = sum(len(d) for d in docs)
    if len(docs) != entry.documents or tokens != entry.tokens:
        raise DataError(f"shard {file} holds {len(docs)} documents / {tokens} tokens but {root / MANIFEST} "
                        f"says {entry.documents} / {entry.tokens}")
    return docs


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode, member.mtime = len(payload), 0o644, 0
    tar.addfile(member, io.BytesIO(payload))


def _write_shard(path: Path, docs: list[np.ndarray]) -> ShardEntry:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, doc in enumerate(docs):
            array = io.BytesIO()
            np.save(array, doc, allow_pickle=False)
            _add(tar, f"{i:08d}.npy", array.getvalue())
    data = buffer.getvalue()
    path.write_bytes(data)
    return ShardEntry(path.name, len(docs), int(sum(len(d) for d in docs)), len(data),
                      hashlib.sha256(data).hexdigest())


def _documents(files: list[Path], progress: bool) -> Iterator[str]:
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("tokenizing", total=len(files))
        for file in files:
            yield from rawtext.read_documents(file)
            bar.advance(task)


def build_shards(sources: list[str], out: Path, tokenizer: str, shard_tokens: int | None = None,
                 shard_sequences: int | None = None, force: bool = False, progress: bool = True) -> dict[str, str]:
    """Tokenize text files into shards in `out`. The directory appears whole or not at all: it is
    built beside `out` and renamed into place (replacing an old one only with `force`)."""
    out = Path(out).expanduser()
    if shard_tokens is not None and shard_sequences is not None:
        raise ConfigError("give --shard-tokens or --shard-sequences, not both")
    limit_docs = shard_sequences is not None
    limit = shard_sequences if limit_docs else (shard_tokens or DEFAULT_SHARD_TOKENS)
    if limit < 1:
        raise ConfigError(f"--shard-{'sequences' if limit_docs else 'tokens'} must be >= 1 (got {limit})")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out} is not empty; pass --force to replace it")
    files = []
    for source in sources:
        if is_shard_dir(source):
            raise DataError(f"{source} is already a shard directory (train on it directly with data.sources)")
        files += rawtext.expand(source)
    tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        entries: list[ShardEntry] = []
        pending: list[np.ndarray] = []
        pending_tokens = 0
        for text in _documents(files, progress):
            doc = np.asarray(tok.encode(text), dtype=dtype)
            pending.append(doc)
            pending_tokens += len(doc)
            if (len(pending) if limit_docs else pending_tokens) >= limit:
                entries.append(_write_shard(tmp / f"shard-{len(entries):06d}.tar", pending))
                pending, pending_tokens = [], 0
        if pending:
            entries.append(_write_shard(tmp / f"shard-{len(entries):06d}.tar", pending))
        if not entries:
            raise DataError(f"no text in {', '.join(sources)}")
        info = {"format": FORMAT, "tokenizer": tokenizer, "tokenizer_fingerprint": tok.fingerprint,
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "sources": [str(s) for s in sources],
                "shards": len(entries), "documents": sum(e.documents for e in entries),
                "tokens": sum(e.tokens for e in entries)}
        if isinstance(tok, HFTokenizer):
            write_atomic(tmp / "tokenizer.json", tok.tok.to_str())
        write_json(tmp / INFO, info)
        write_atomic(tmp / MANIFEST, "".join(json.dumps(vars(e)) + "\n" for e in entries))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "shards": str(info["shards"]), "documents": str(info["documents"]),
            "tokens": str(info["tokens"]), "tokenizer": f"{tokenizer} (vocab {tok.vocab_size}, eos {tok.eos_id})"}
