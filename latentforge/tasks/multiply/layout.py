"""Token layouts of the multiply variants, all built from the same examples.

    a * b = c <end>                       answer only (nocot, aux-probe)
    a * b = chain # c <end>                explicit chain of thought (cot)
    a * b = chain[r:] # c <end>            the chain with its first r tokens removed (icot-si);
                                           with the whole chain removed, `#` goes too
    a * b = <t> ... <t> c <end>            k thought tokens (pause), part of the prompt

The chain is the public implicit-CoT format: the partial products a x b_i (shifted by i
zeros) with the running sums in parentheses, every number least-significant digit first.
Everything after the prompt (the question, and the thoughts of `pause`) is generated at
inference and scored in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentforge.tasks.multiply.data import Examples, multiply_digits

# Digits are tokens 0-9; padding has its own id, never shared with a digit.
STAR, EQUALS, END, PAD, PLUS, OPEN, CLOSE, ANSWER, THOUGHT = range(10, 19)
VOCAB_SIZE = 19
IGNORE = -100
SYMBOLS = {STAR: "*", EQUALS: "=", END: "<end>", PAD: "", PLUS: "+", OPEN: "(", CLOSE: ")", ANSWER: "####",
           THOUGHT: "<t>"}


def chain_length(len_a: int, len_b: int) -> int:
    """Tokens in the chain of an len_a-digit by len_b-digit product (without the `#`)."""
    partials = sum(len_a + 1 + i for i in range(len_b))
    sums = sum(len_a + 1 + i + 2 for i in range(1, len_b - 1))
    return partials + (len_b - 1) + sums


def sequence_length(width_a: int, width_b: int, chain: bool = False, thoughts: int = 0) -> int:
    """Tokens of the longest sequence (question, thoughts or chain, answer, <end>)."""
    extra = thoughts + (chain_length(width_a, width_b) + 1 if chain else 0)
    return width_a + width_b + 2 + extra + (width_a + width_b) + 1


def digit_tokens(digits: torch.Tensor, reverse: bool) -> torch.Tensor:
    """LSD-first digit rows (B, W), all W digits significant, in the token order of the layout."""
    return digits if reverse else digits.flip(1)


def _row_tokens(digits: torch.Tensor, length: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Each row's first `length` LSD-first digits in layout order, left-aligned (B, W)."""
    if reverse:
        return digits
    W = digits.shape[1]
    k = (length[:, None] - 1 - torch.arange(W, device=digits.device)[None]).clamp(min=0)
    return digits.gather(1, k)


def _group_chain(a: torch.Tensor, b: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The chain of rows whose operands all have a.shape[1] and b.shape[1] digits."""
    B, La = a.shape
    Lb = b.shape[1]
    parts: list[torch.Tensor] = []

    def symbol(token: int) -> torch.Tensor:
        return torch.full((B, 1), token, dtype=torch.int64, device=a.device)

    def number(digits: torch.Tensor) -> torch.Tensor:
        return digit_tokens(digits, reverse)

    for i in range(Lb):
        if i > 0:
            parts.append(symbol(PLUS))
        zeros = torch.zeros(B, i, dtype=torch.int64, device=a.device)
        parts.append(number(torch.cat([zeros, multiply_digits(a, b[:, i: i + 1])], dim=1)))
        if 0 < i < Lb - 1:
            parts += [symbol(OPEN), number(multiply_digits(a, b[:, : i + 1])), symbol(CLOSE)]
    return torch.cat(parts, dim=1)


def chain_tokens(ex: Examples, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The chains of thought of every example: tokens (B, longest) padded with PAD, and lengths."""
    groups = torch.unique(torch.stack([ex.len_a, ex.len_b], 1), dim=0).tolist()
    longest = max(chain_length(la, lb) for la, lb in groups)
    out = torch.full((len(ex), longest), PAD, dtype=torch.int64, device=ex.a.device)
    lengths = torch.zeros(len(ex), dtype=torch.int64, device=ex.a.device)
    # Rows whose operands have the same lengths share one chain template.
    for la, lb in groups:
        rows = ((ex.len_a == la) & (ex.len_b == lb)).nonzero().squeeze(1)
        chain = _group_chain(ex.a[rows, :la], ex.b[rows, :lb], reverse)
        out[rows, : chain.shape[1]] = chain
        lengths[rows] = chain.shape[1]
    return out, lengths


@dataclass
class Sequences:
    """Token rows (B, L) padded with PAD; the prompt (given at inference) and full lengths."""

    tokens: torch.Tensor
    prompt_len: torch.Tensor
    length: torch.Tensor

    def training_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for next-token training; only the tokens after the prompt are scored."""
        inputs, targets = self.tokens[:, :-1], self.tokens[:, 1:].clone()
        p = torch.arange(1, self.tokens.shape[1], device=self.tokens.device)[None]
        scored = (p >= self.prompt_len[:, None]) & (p < self.length[:, None])
        targets[~scored] = IGNORE
        return inputs, targets


def _concat(segments: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Concatenate per-row segments (tokens (B, w), how many of them count (B,)) into (B, length)
    rows padded with PAD; also returns where each segment starts."""
    tokens0 = segments[0][0]
    B, device = tokens0.shape[0], tokens0.device
    out = torch.full((B, length + 1), PAD, dtype=torch.int64, device=device)
    start = torch.zeros(B, dtype=torch.int64, device=device)
    starts = []
    for tokens, n in segments:
        j = torch.arange(tokens.shape[1], device=device)[None]
        # Tokens beyond a row's count land in a spare last column, dropped below.
        index = torch.where(j < n[:, None], start[:, None] + j, length)
        out.scatter_(1, index.clamp(max=length), tokens)
        starts.append(start)
        start = start + n
    return out[:, :length], starts + [start]


def build_sequences(ex: Examples, reverse: bool, length: int, chain: tuple[torch.Tensor, torch.Tensor] | None = None,
                    removed: torch.Tensor | None = None, thoughts: int = 0) -> Sequences:
    """The rows of one layout (see the module docstring); `removed` counts chain tokens dropped
    from the left of each row."""
    B, device = len(ex), ex.a.device
    ones = torch.ones(B, dtype=torch.int64, device=device)

    def symbol(token: int, count: torch.Tensor = ones) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(int(count.max()), 1) if count is not ones else 1
        return torch.full((B, width), token, dtype=torch.int64, device=device), count

    segments = [
        (_row_tokens(ex.a, ex.len_a, reverse), ex.len_a), symbol(STAR),
        (_row_tokens(ex.b, ex.len_b, reverse), ex.len_b), symbol(EQUALS),
    ]
    prompt_len = ex.len_a + ex.len_b + 2
    if thoughts:
        segments.append(symbol(THOUGHT, ones * thoughts))
        prompt_len = prompt_len + thoughts
    if chain is not None:
        tokens, n = chain
        r = torch.zeros_like(n) if removed is None else removed.clamp(0, None)
        left = (n - r).clamp(min=0)
        shift = (torch.arange(tokens.shape[1], device=device)[None] + r[:, None]).clamp(max=tokens.shape[1] - 1)
        segments += [(tokens.gather(1, shift), left), symbol(ANSWER, (left > 0).long())]
    segments += [(_row_tokens(ex.c, ex.len_c, reverse), ex.len_c), symbol(END)]
    tokens, starts = _concat(segments, length)
    # Cut the padding no row uses (an internalized chain leaves a shorter sequence to train on).
    return Sequences(tokens[:, : int(starts[-1].max())], prompt_len, starts[-1])


def answer_tokens(ex: Examples, reverse: bool) -> torch.Tensor:
    """The expected answer `c <end>` of each row, padded with PAD to (B, widest + 1)."""
    B = len(ex)
    end = torch.full((B, 1), END, dtype=torch.int64, device=ex.a.device)
    tokens, _ = _concat([(_row_tokens(ex.c, ex.len_c, reverse), ex.len_c), (end, torch.ones_like(ex.len_c))],
                        ex.c.shape[1] + 1)
    return tokens


def extract_answer(generated: torch.Tensor, width: int) -> torch.Tensor:
    """The answer part of generated rows: what follows the first `#` (or everything when the row
    has none), `width` tokens, with everything after the first <end> replaced by PAD."""
    B, T = generated.shape
    device = generated.device
    has_mark = (generated == ANSWER).any(1)
    start = torch.where(has_mark, (generated == ANSWER).int().argmax(1) + 1, 0)
    index = start[:, None] + torch.arange(width, device=device)[None]
    padded = torch.cat([generated, torch.full((B, width), PAD, dtype=generated.dtype, device=device)], 1)
    answer = padded.gather(1, index)
    is_end = (answer == END).int()
    after_end = is_end.cumsum(1) - is_end > 0
    return answer.masked_fill(after_end, PAD)


def render(tokens: list[int]) -> str:
    """Tokens as the text of the public files (digits and symbols separated by spaces)."""
    return " ".join(str(t) if t < 10 else SYMBOLS.get(t, f"<{t}>") for t in tokens if t != PAD)
