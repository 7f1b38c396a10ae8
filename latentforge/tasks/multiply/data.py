"""Multiplication data: operand pairs, their digits and products, and the public implicit-CoT files.

Numbers are LSD-first digit rows; layout.py turns them into tokens. Training pairs are a pure
function of (seed, batch index), so resuming or sharding needs nothing but the index, and they
never include a held-out pair (our own test split, or the public files evaluated on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from latentforge.data.epochs import EpochSampler
from latentforge.data.stream import IndexedStream
from latentforge.errors import DataError

# Small operand spaces are enumerated and held out exactly; larger ones are sampled per batch.
MAX_ENUMERATED_PAIRS = 2_000_000
MAX_OPERAND_DIGITS = 18


def number_range(digits: int) -> tuple[int, int]:
    """[low, high] of the numbers with this many digits (1 digit includes 0)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def to_digits(x: torch.Tensor, width: int) -> torch.Tensor:
    """int64 (B,) -> digits (B, width), least-significant first."""
    pow10 = 10 ** torch.arange(width, device=x.device, dtype=torch.int64)
    return (x[:, None] // pow10) % 10


def digit_count(digits: torch.Tensor) -> torch.Tensor:
    """Number of significant digits of LSD-first digit rows (0 counts as one digit)."""
    width = digits.shape[1]
    position = torch.arange(1, width + 1, device=digits.device)
    return (position * (digits != 0)).amax(dim=1).clamp(min=1)


def column_totals(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The running sums of long multiplication of LSD-first digit rows, (B, Da) x (B, Db) ->
    (B, Da + Db): column k's total is sum(a_i * b_j for i + j = k) plus the carry into column k;
    its last digit is the product's digit k and the rest is carried on."""
    B, Da = a.shape
    Db = b.shape[1]
    partial = a[:, :, None] * b[:, None, :]
    column = (torch.arange(Da, device=a.device)[:, None] + torch.arange(Db, device=a.device)[None]).reshape(-1)
    sums = torch.zeros(B, Da + Db, dtype=torch.int64, device=a.device)
    sums.index_add_(1, column, partial.reshape(B, -1))
    carry = torch.zeros(B, dtype=torch.int64, device=a.device)
    totals = torch.empty_like(sums)
    for k in range(Da + Db):
        totals[:, k] = sums[:, k] + carry
        carry = totals[:, k] // 10
    return totals


def multiply_digits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact long multiplication of LSD-first digit rows: (B, Da) x (B, Db) -> (B, Da + Db)."""
    return column_totals(a, b) % 10


def from_digits(digits: torch.Tensor) -> torch.Tensor:
    """LSD-first digit rows (B, W) -> int64 numbers (exact up to 18 digits)."""
    pow10 = 10 ** torch.arange(digits.shape[1], device=digits.device, dtype=torch.int64)
    return (digits * pow10).sum(1)


@dataclass
class Examples:
    """Operands and product as LSD-first digit rows, with their lengths."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    len_a: torch.Tensor
    len_b: torch.Tensor
    len_c: torch.Tensor

    @classmethod
    def from_digits(cls, a: torch.Tensor, b: torch.Tensor) -> Examples:
        c = multiply_digits(a, b)
        return cls(a, b, c, digit_count(a), digit_count(b), digit_count(c))

    @classmethod
    def from_ints(cls, a: torch.Tensor, b: torch.Tensor, width_a: int, width_b: int) -> Examples:
        return cls.from_digits(to_digits(a, width_a), to_digits(b, width_b))

    def fixed_width(self) -> Examples:
        """The same examples laid out at full width: operands zero-padded to their widest, the
        answer to the sum of the widths (as in the implicit-CoT files), so every row aligns."""
        B = len(self)

        def full(width: int) -> torch.Tensor:
            return torch.full((B,), width, dtype=torch.int64, device=self.a.device)

        return Examples(self.a, self.b, self.c, full(self.a.shape[1]), full(self.b.shape[1]), full(self.c.shape[1]))

    def widened(self, width_a: int, width_b: int) -> Examples:
        """The same examples with digit rows at least width_a and width_b wide (the product's at least their
        sum): zeros on the most significant side, so a shorter set is laid out as the run's own pairs are."""

        def pad(t: torch.Tensor, width: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, max(width - t.shape[1], 0)))

        a, b = pad(self.a, width_a), pad(self.b, width_b)
        return Examples(a, b, pad(self.c, a.shape[1] + b.shape[1]), self.len_a, self.len_b, self.len_c)

    def __len__(self) -> int:
        return self.a.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Examples:
        return Examples(*(fn(getattr(self, f.name)) for f in fields(self)))

    def select(self, index: torch.Tensor) -> Examples:
        return self._map(lambda t: t[index])

    def to(self, device: torch.device) -> Examples:
        return self._map(lambda t: t.to(device))


def pair_keys(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A collision-free int64 key of (a, b) for operands below 10**9, a hash beyond."""
    return a * 1_000_000_007 + b


class OperandSpace:
    """All (a, b) with a in the digit range of operand a and b in that of operand b."""

    def __init__(self, digits_a: tuple[int, int], digits_b: tuple[int, int]):
        self.digits_a, self.digits_b = digits_a, digits_b
        self.low_a, self.high_a = number_range(digits_a[0])[0], number_range(digits_a[1])[1]
        self.low_b, self.high_b = number_range(digits_b[0])[0], number_range(digits_b[1])[1]
        self.size = (self.high_a - self.low_a + 1) * (self.high_b - self.low_b + 1)
        self.symmetric = digits_a == digits_b
        self.enumerated = self.size <= MAX_ENUMERATED_PAIRS

    def all_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.arange(self.low_a, self.high_a + 1)
        b = torch.arange(self.low_b, self.high_b + 1)
        return a.repeat_interleave(len(b)), b.repeat(len(a))

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n pairs: operand lengths uniform over their ranges, then values uniform at that length."""
        return self._sample_operand(self.digits_a, n, generator), self._sample_operand(self.digits_b, n, generator)

    @staticmethod
    def _sample_operand(digits: tuple[int, int], n: int, generator: torch.Generator) -> torch.Tensor:
        length = torch.randint(digits[0], digits[1] + 1, (n,), generator=generator)
        low = torch.where(length == 1, 0, 10 ** (length - 1))
        high = 10**length
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (low + (u * (high - low).double()).long()).clamp(max=high - 1)


class MultiplyData:
    """The held-out test pairs and the training pairs. `exclude` holds further pairs (those of the
    evaluation files) that training never sees, in either order."""

    def __init__(self, digits_a: tuple[int, int], digits_b: tuple[int, int], test_size: int,
                 holdout_commuted: bool, seed: int, exclude: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.space = OperandSpace(digits_a, digits_b)
        self.width_a, self.width_b = digits_a[1], digits_b[1]
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        if self.space.enumerated:
            a, b = self.space.all_pairs()
            test = self._holdout(a, b, test_size, holdout_commuted and self.space.symmetric, g)
            self.test = (a[test], b[test])
            self.train = (a[~test], b[~test])
        else:
            a, b = self._unique_sample(test_size, g)
            if holdout_commuted and self.space.symmetric:
                a, b = torch.cat([a, b]), torch.cat([b, a])
            self.test = (a, b)
            self.train = None
        held_out = [pair_keys(*self.test)]
        if exclude is not None:
            held_out += [pair_keys(*exclude), pair_keys(exclude[1], exclude[0])]
        self.test_keys = torch.unique(torch.cat(held_out))
        if self.train is not None and exclude is not None:
            keep = ~torch.isin(pair_keys(*self.train), self.test_keys)
            self.train = (self.train[0][keep], self.train[1][keep])

    @staticmethod
    def _holdout(a: torch.Tensor, b: torch.Tensor, test_size: int, commuted: bool,
                 g: torch.Generator) -> torch.Tensor:
        """A mask of held-out pairs; with `commuted`, b*a is held out whenever a*b is."""
        key = torch.minimum(a, b) * (b.max() + 1) + torch.maximum(a, b) if commuted else torch.arange(len(a))
        unique_keys, group = torch.unique(key, return_inverse=True)
        order = torch.randperm(len(unique_keys), generator=g)
        sizes = torch.bincount(group, minlength=len(unique_keys))[order]
        chosen = order[: int((sizes.cumsum(0) < test_size).sum()) + 1]
        return torch.isin(group, chosen)

    def _unique_sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.space.sample(2 * n, g)
        _, first = _first_occurrences(pair_keys(a, b))
        first = first[:n]
        return a[first], b[first]

    @property
    def train_size(self) -> int | None:
        return len(self.train[0]) if self.train is not None else None

    def examples(self, a: torch.Tensor, b: torch.Tensor, device: torch.device) -> Examples:
        return Examples.from_ints(a.to(device), b.to(device), self.width_a, self.width_b)


def _first_occurrences(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique keys and the index of each one's first occurrence, in order of first appearance."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(unique),), len(keys), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys)), reduce="amin")
    return unique, first.sort().values


class MultiplyBatches(IndexedStream):
    """Endless training batches: epochs over the enumerated training pairs (a fresh shuffle each
    epoch), or fresh samples that avoid the held-out pairs. Batch i depends only on (seed, i);
    `make_batch(examples, i)` turns the examples into what the model trains on.

    The data path is launch-bound (dozens of small kernels per batch), so the examples of `chunk`
    batches are made in one pass; with `stepless` (make_batch reads neither the step nor an RNG)
    the batches themselves are too. Otherwise make_batch runs when the batch is used, so its random
    draws come in the order they would unchunked, and resume stays exact."""

    def __init__(self, data: MultiplyData, batch_size: int, fixed_width: bool,
                 make_batch: Callable[[Examples, int], Any], device: torch.device, chunk: int = 1,
                 stepless: bool = False):
        self.data, self.batch_size, self.make_batch = data, batch_size, make_batch
        self.fixed_width, self.chunk, self.stepless = fixed_width, chunk, stepless
        self.device = device
        self._chunk_first, self._chunk = 0, None  # the batches (or examples) made together last
        if data.train is not None:
            self.train_a, self.train_b = data.train[0].to(device), data.train[1].to(device)
            self.sampler = EpochSampler(len(self.train_a), batch_size, data.seed, device)
        # On the host: the clash check of sampled pairs then costs no device sync.
        self.test_keys = data.test_keys

    def pairs(self, index: int, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The operand pairs of batches index .. index+count-1, row after row."""
        if self.data.train is not None:
            rows = self.sampler.rows(index, count)
            return self.train_a[rows], self.train_b[rows]
        pairs = [self._sampled_pairs(i) for i in range(index, index + count)]
        return (torch.cat([a for a, _ in pairs]).to(self.device), torch.cat([b for _, b in pairs]).to(self.device))

    def _sampled_pairs(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.data.seed * 1_000_003 + 7_919 * (index + 1))
        a, b = self.data.space.sample(self.batch_size, g)
        while True:
            clash = torch.isin(pair_keys(a, b), self.test_keys)
            if not bool(clash.any()):
                return a, b
            na, nb = self.data.space.sample(self.batch_size, g)
            a, b = torch.where(clash, na, a), torch.where(clash, nb, b)

    def examples(self, index: int, count: int = 1) -> Examples:
        ex = self.data.examples(*self.pairs(index, count), self.device)
        return ex.fixed_width() if self.fixed_width else ex

    def batch(self, index: int) -> Any:
        if self._chunk is None or not self._chunk_first <= index < self._chunk_first + self.chunk:
            self._chunk_first, self._chunk = index, self._made_together(index)
        rows = slice((index - self._chunk_first) * self.batch_size, (index - self._chunk_first + 1) * self.batch_size)
        if self.stepless:
            return {key: v[rows] for key, v in self._chunk.items()}
        return self.make_batch(self._chunk.select(rows), index)

    def _made_together(self, first: int) -> Any:
        """The batches first .. first+chunk-1 as one (stepless), or their examples."""
        ex = self.examples(first, self.chunk)
        return self.make_batch(ex, first) if self.stepless else ex


def read_icot_file(path: str | Path) -> Examples:
    """Read a public implicit-CoT file (`a_digits * b_digits||cot #### c_digits`, LSD first)."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read multiplication file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file in the implicit-CoT format") from None
    if not lines:
        raise DataError(f"{path} holds no examples")
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for number, line in enumerate(lines, 1):
        try:
            question, _, answer = line.partition("####")
            operands = question.split("||")[0].split("*")
            if len(operands) != 2 or not answer.strip():
                raise ValueError
            a, b = ([int(t) for t in op.split()] for op in operands)
            c = [int(t) for t in answer.split()]
            if not a or not b or not all(0 <= d <= 9 for d in a + b + c):
                raise ValueError
        except ValueError:
            raise DataError(f"{path} line {number} is not 'a digits * b digits||chain #### answer digits': "
                            f"{line[:60]!r}") from None
        rows.append((a, b, c))
    width_a = max(len(r[0]) for r in rows)
    width_b = max(len(r[1]) for r in rows)
    if max(width_a, width_b) > MAX_OPERAND_DIGITS:
        raise DataError(f"{path}: operands longer than {MAX_OPERAND_DIGITS} digits are not supported")

    def pad(digits: list[int], width: int) -> list[int]:
        return digits + [0] * (width - len(digits))

    a = torch.tensor([pad(r[0], width_a) for r in rows])
    b = torch.tensor([pad(r[1], width_b) for r in rows])
    ex = Examples.from_digits(a, b)
    stated = torch.tensor([pad(r[2], width_a + width_b)[: width_a + width_b] for r in rows])
    wrong = (stated != ex.c).any(dim=1).nonzero()
    if len(wrong):
        n = int(wrong[0]) + 1
        raise DataError(f"{path} line {n}: the stated answer is not the product of its operands")
    return ex
