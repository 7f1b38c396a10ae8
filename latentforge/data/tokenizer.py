"""Tokenizers behind one small interface (encode, decode, vocab_size, eos_id): the built-in byte
tokenizer, or any HF `tokenizers` tokenizer (a tokenizer.json, or an HF model directory), plus
training a byte-level BPE on local text."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from latentforge.errors import ConfigError, DataError

# The names an end-of-text token goes by in common tokenizers (GPT-2, Llama, Gemma ...).
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    fingerprint: str  # equal fingerprints tokenize identically (checked against a shard directory's)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and id 256 as end-of-text: no files, no training, any text."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """An HF `tokenizers.Tokenizer`; documents end with its end-of-text token."""

    def __init__(self, tok, source: str):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = [tok.token_to_id(name) for name in EOS_NAMES]
        found = [i for i in ids if i is not None]
        if not found:
            raise ConfigError(f"tokenizer {source} has no end-of-text token (one of {', '.join(EOS_NAMES)})")
        self.eos_id = found[0]
        self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


@lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """`bytes`, a tokenizer.json file, or a directory holding one (an HF model or tokenizer directory;
    one with only vocab/merges files is converted by transformers)."""
    from tokenizers import Tokenizer as HFTok

    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        try:
            return HFTokenizer(HFTok.from_file(str(file)), spec)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"cannot read tokenizer {file}: {str(e).splitlines()[0]}") from None
    if path.is_dir():
        from transformers import AutoTokenizer

        try:
            fast = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read a tokenizer from {path}: {str(e).splitlines()[0]}") from None
        return HFTokenizer(fast.backend_tokenizer, spec)
    raise ConfigError(f"tokenizer must be 'bytes', a tokenizer.json file or a directory holding one (got {spec!r})")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: Path) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, `<|endoftext|>` as end-of-text) trained on `texts`, saved as
    a tokenizer.json at `out` (atomically)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from latentforge.track.files import write_atomic

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(f"--vocab must be at least {len(alphabet) + 1} (256 bytes + end-of-text), got {vocab_size}")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_NAMES[0]], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() == 0:
        raise DataError("no text to train the tokenizer on")
    write_atomic(out, tok.to_str())
    return HFTokenizer(tok, str(out))
