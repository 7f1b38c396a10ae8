"""A decoder-only transformer: pre-norm blocks, rotary (or GPT-2's learned) positions, SDPA attention, optional
tying."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.config import ModelBase, require
from latentforge.nn.rope import apply_rope, rope_tables


@dataclass
class TransformerShape:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_len: int = 256
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    vocab_multiple: int = 1
    positions: Literal["rope", "learned"] = "rope"
    residual: Literal["fp32", "autocast"] = "fp32"

    @property
    def padded_vocab(self) -> int:
        return padded_vocab(self.vocab_size, self.vocab_multiple)


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """Rows of an embedding and output head: vocab_size rounded up to a multiple of `multiple` (a matmul of
    that width runs faster); the logits of the rows past vocab_size are sliced off."""
    return math.ceil(vocab_size / multiple) * multiple


def vocab_logits(logits: torch.Tensor, vocab_size: int, padded: bool = False) -> torch.Tensor:
    """The head's output over its padded rows (..., R) -> logits a softmax may see. padded=False slices the
    padded rows off: (..., vocab_size). padded=True keeps all R and sets the padded ones to -inf: the same
    softmax and loss, on rows a compiled loss reads whole (GPT-2's head and loss, forward and backward:
    7.9 ms against 9.2 sliced on an H200, `python -m bench.lm_head_loss`)."""
    if logits.shape[-1] == vocab_size:
        return logits
    if not padded:
        return logits[..., :vocab_size]
    beyond = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    return logits.masked_fill(beyond, float("-inf"))


def residual_stream(x: torch.Tensor, residual: str) -> torch.Tensor:
    """The residual stream's input as the model's `residual` option carries it: unchanged (fp32), or cast to
    the autocast dtype where autocast is on (autocast), so that every block's residual add stays in it."""
    if residual == "autocast" and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def check_width(d_model: int, n_head: int, mlp_ratio: float, dropout: float, rope_axes: int = 1) -> None:
    """The checks every attention model's config needs (ConfigError naming the key): RoPE rotates
    pairs of channels per axis, so the head size must divide by 2 * rope_axes."""
    for key, value in (("n_head", n_head), ("d_model", d_model)):
        require(value >= 1, key, f"must be >= 1 (got {value})")
    require(d_model % n_head == 0, "d_model", f"must be divisible by model.n_head={n_head} (got {d_model})")
    if rope_axes == 1:
        require((d_model // n_head) % 2 == 0, "n_head", "must leave an even head size for RoPE")
    else:
        require((d_model // n_head) % (2 * rope_axes) == 0, "n_head",
                f"must leave a head size divisible by {2 * rope_axes} ({rope_axes}-D RoPE rotates pairs per axis)")
    require(mlp_ratio > 0, "mlp_ratio", f"must be > 0 (got {mlp_ratio})")
    require(0 <= dropout < 1, "dropout", f"must be in [0, 1) (got {dropout})")


@dataclass
class TransformerConfig(ModelBase):
    """The `model` section of tasks built on this transformer (tasks subclass it to add options)."""

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    # Pad the embedding and head rows to a multiple of this (64: a faster head matmul for a vocabulary
    # like GPT-2's 50,257); the logits are sliced back to the vocabulary, so the padded ids never score.
    vocab_multiple: int = 1
    # rope: rotary positions in every attention layer. learned: one embedding per position added to the input,
    # as GPT-2 has it (the benchmarks' GPT-2 shape uses it, to train the architecture the peers train).
    positions: Literal["rope", "learned"] = "rope"
    # fp32: the residual stream stays in fp32 under autocast (HF's and nanoGPT's mixed precision). autocast: it
    # is carried in the autocast dtype (bf16; fp16 with train.precision=fp16, where the stream can overflow), as
    # torchtitan's bf16 compute carries it: half the memory traffic of every norm, residual add and their
    # gradients, at bf16's rounding of the stream. Without autocast (fp32) it changes nothing.
    residual: Literal["fp32", "autocast"] = "fp32"

    def validate(self) -> None:
        require(self.n_layer >= 1, "n_layer", f"must be >= 1 (got {self.n_layer})")
        require(self.vocab_multiple >= 1, "vocab_multiple", f"must be >= 1 (got {self.vocab_multiple})")
        check_width(self.d_model, self.n_head, self.mlp_ratio, self.dropout)

    def shape(self, vocab_size: int, max_len: int) -> TransformerShape:
        return TransformerShape(vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                                d_model=self.d_model, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                                max_len=max_len, tie_embeddings=self.tie_embeddings,
                                vocab_multiple=self.vocab_multiple, positions=self.positions,
                                residual=self.residual)


class SelfAttention(nn.Module):
    def __init__(self, shape: TransformerShape, causal: bool = True):
        super().__init__()
        self.causal = causal
        assert shape.d_model % shape.n_head == 0, "d_model must be divisible by n_head"
        self.n_head = shape.n_head
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model, bias=False)
        self.proj = nn.Linear(shape.d_model, shape.d_model, bias=False)
        self.dropout = shape.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        """cos and sin are the RoPE tables, or None where the positions are in the input (learned)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        hidden = int(shape.mlp_ratio * shape.d_model)
        self.up = nn.Linear(shape.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, shape.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.norm1 = nn.LayerNorm(shape.d_model)
        self.attn = SelfAttention(shape)
        self.norm2 = nn.LayerNorm(shape.d_model)
        self.mlp = MLP(shape)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size); the embedding and head have
    shape.padded_vocab rows, and the padded rows' logits are sliced off in `logits`."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.padded_vocab, shape.d_model)
        self.drop = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.norm = nn.LayerNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, shape.padded_vocab, bias=False)
        if shape.tie_embeddings:
            self.head.weight = self.embed.weight
        self.pos_embed = nn.Embedding(shape.max_len, shape.d_model) if shape.positions == "learned" else None
        cos, sin = (None, None) if self.pos_embed is not None else rope_tables(
            shape.max_len, shape.d_model // shape.n_head, shape.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Scaled init of the residual projections (GPT-2): keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / (2 * shape.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def hidden(self, x: torch.Tensor, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Input embeddings (B, T, C) -> the final normed hidden states, and the residual stream
        after each block listed in `keep` (1 = after the first block; 0 = the first block's input, learned
        positions included)."""
        T = x.shape[1]
        if T > self.shape.max_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.max_len={self.shape.max_len}")
        kept = {}
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[:T]
        x = self.drop(residual_stream(x, self.shape.residual))
        if 0 in keep:
            kept[0] = x
        for layer, block in enumerate(self.blocks, 1):
            x = block(x, self.rope_cos, self.rope_sin)
            if layer in keep:
                kept[layer] = x
        return self.norm(x), kept

    def logits(self, h: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., vocab_size): the head, without the padded rows, so that
        no softmax ever sees them (padded=True, for losses: every row, the padded ones at -inf; see
        vocab_logits)."""
        return vocab_logits(self.head(h), self.shape.vocab_size, padded)

    def forward(self, tokens: torch.Tensor, padded: bool = False, hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size); padded=True: over every head row (see logits); hidden=True: the final
        normed hidden states (B, T, C) instead, for a loss that applies the head itself (nn.fused_ce)."""
        h = self.hidden(self.embed(tokens))[0]
        return h if hidden else self.logits(h, padded)
