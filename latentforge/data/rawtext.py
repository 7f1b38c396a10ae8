"""Raw text on disk as documents: a .txt (or any text) file is one document, a .jsonl file holds one
document per line in its "text" field. A source names a file, a directory (its *.txt and *.jsonl
files, recursively), a glob, or a named corpus (data/corpora.py: `python-stdlib`)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from latentforge.data.corpora import CORPORA
from latentforge.errors import DataError

DIRECTORY_SUFFIXES = (".txt", ".jsonl")


def expand(source: str) -> list[Path]:
    """The files of a source, sorted (so every run and every rank sees the same order)."""
    if source in CORPORA:
        return CORPORA[source]()
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = sorted(p for p in files if p.is_file())
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DIRECTORY_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data source {source} does not exist")
    if not files:
        what = "matches" if any(c in source for c in "*?[") else f"*{' or *'.join(DIRECTORY_SUFFIXES)} files under"
        raise DataError(f"no files {what} data source {source}")
    return files


def names(files: list[Path]) -> list[str]:
    """Each file's path relative to the files' common folder: stable names for held-out selection."""
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    return [str(f.resolve().relative_to(root)) for f in files]


def read_documents(file: Path) -> list[str]:
    """The non-empty documents of one file."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror}") from None
    if file.suffix != ".jsonl":
        return [text] if text else []
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file} line {n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{file} line {n}: needs a \"text\" string field")
        if record["text"]:
            docs.append(record["text"])
    return docs
