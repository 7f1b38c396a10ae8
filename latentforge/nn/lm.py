"""A decoder-only language model in one file: Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention) by
default, and GPT-2 (LayerNorm, GELU MLP, learned absolute positions, biases) by four switches, so that both
families' checkpoints load into one module (latentforge/interop/hf.py).

Attention is causal, and optionally block-diagonal over `doc_ids` (packed documents never attend to each
other; positions restart per document) and bidirectional over a prefix (prefix-LM). With none of these,
SDPA runs its fused causal kernel; otherwise it takes one boolean mask shared by all heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.config import ModelBase, require
from latentforge.nn.kv_cache import KVCache
from latentforge.nn.rope import apply_rope, rope_tables
from latentforge.nn.transformer import padded_vocab, residual_stream, vocab_logits


@dataclass
class LMConfig(ModelBase):
    """The decoder's shape and family switches (usable as a task's `model` config section)."""

    # 0: the task sets it from its tokenizer.
    vocab_size: int = 0
    # The embedding and output rows are padded to a multiple of this (a faster head matmul: GPT-2's 50,257
    # becomes 50,304); the logits are sliced back to vocab_size, so the padded ids never score.
    vocab_multiple: int = 64
    n_layer: int = 4
    n_head: int = 4
    # Key/value heads: 0 means n_head (multi-head attention); fewer gives grouped-query attention.
    n_kv_heads: int = 0
    d_model: int = 256
    # MLP width; 0: 8/3 d_model rounded up to a multiple of 64 for SwiGLU (Llama), 4 d_model for GELU.
    ffn_hidden: int = 0
    max_len: int = 512
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    # Biases on every linear layer and LayerNorm (GPT-2 has them, Llama not).
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    # fp32 or autocast: the residual stream's dtype under autocast (nn.transformer.TransformerConfig.residual).
    residual: Literal["fp32", "autocast"] = "fp32"

    # Runs saved before vocab_multiple existed had unpadded embeddings.
    old_run_values: ClassVar[dict[str, Any]] = {"vocab_multiple": 1}

    @classmethod
    def gpt2(cls, **kwargs) -> LMConfig:
        """The GPT-2 family: LayerNorm, GELU MLP, learned positions, biases."""
        return cls(**{"norm": "layernorm", "mlp": "gelu", "positions": "learned", "bias": True, **kwargs})

    def validate(self) -> None:
        require(self.vocab_size >= 0, "vocab_size", f"must be >= 0 (got {self.vocab_size})")
        require(self.vocab_multiple >= 1, "vocab_multiple", f"must be >= 1 (got {self.vocab_multiple})")
        for key in ("n_layer", "n_head", "d_model", "max_len"):
            require(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        require(self.d_model % self.n_head == 0, "d_model", f"must be divisible by n_head={self.n_head} "
                f"(got {self.d_model})")
        require(self.positions != "rope" or self.head_dim % 2 == 0, "n_head", "must leave an even head size for RoPE")
        require(0 <= self.n_kv_heads <= self.n_head and (self.n_kv_heads == 0 or self.n_head % self.n_kv_heads == 0),
                "n_kv_heads", f"must divide n_head={self.n_head} (or be 0: n_head) (got {self.n_kv_heads})")
        require(self.ffn_hidden >= 0, "ffn_hidden", f"must be >= 0 (got {self.ffn_hidden})")
        require(self.norm_eps > 0, "norm_eps", f"must be > 0 (got {self.norm_eps})")
        require(self.rope_theta > 0, "rope_theta", f"must be > 0 (got {self.rope_theta})")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1) (got {self.dropout})")

    @property
    def padded_vocab(self) -> int:
        return padded_vocab(self.vocab_size, self.vocab_multiple)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


def forward_flops(cfg: LMConfig, seq_len: int) -> float:
    """Forward FLOPs over one sequence of seq_len tokens: 2 per weight of every matrix product (the output
    head included, embedding lookups not) per token, plus the attention scores and their weighted sum over
    the full seq_len x seq_len square (as PaLM counts it). Training costs 3x: 6N + 12 L d T per token.
    The head counts vocab_size rows, not the padded ones the matmul also computes: MFU counts model FLOPs
    by convention, so padding shows as a faster step, not as more FLOPs."""
    d, attn = cfg.d_model, cfg.n_head * cfg.head_dim
    per_layer = d * attn + 2 * d * cfg.kv_heads * cfg.head_dim + attn * d
    per_layer += (3 if cfg.mlp == "swiglu" else 2) * d * cfg.hidden
    weights = cfg.n_layer * per_layer + d * cfg.vocab_size
    return float(seq_len * (2 * weights + 4 * cfg.n_layer * seq_len * attn))


def make_norm(cfg: LMConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def attention_mask(T: int, start: int, doc_ids: torch.Tensor | None, prefix_len: torch.Tensor | int | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, start + T) mask, True where query i may read key j; None for plain causal
    attention over a sequence that starts at 0 (SDPA's fused kernel)."""
    if doc_ids is None and prefix_len is None and start == 0:
        return None
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None, :]
    mask = k <= q
    if prefix_len is not None:
        prefix = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1)
        mask = mask | (k < prefix)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return mask.reshape(-1, 1, T, start + T)


class Attention(nn.Module):
    """Multi-head or grouped-query self-attention: n_head query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.n_kv != self.n_head:
            # Query head h reads key/value head h // (n_head / n_kv), as in Llama's repeat_kv.
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or GELU (tanh approximation, GPT-2): w2(gelu(w1 x))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(cfg.d_model, cfg.hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.hidden, cfg.d_model, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.hidden, bias=cfg.bias) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attention(self.attention_norm(x), rope, mask, cache, layer))
        return x + self.drop(self.feed_forward(self.ffn_norm(x)))


class LM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size); the embedding and output have
    cfg.padded_vocab rows, and the padded rows' logits are sliced off."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("LMConfig.vocab_size must be set (>= 1) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.max_len, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Scaled init of the residual projections (GPT-2): keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer, self.cfg.max_len)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, prefix_len: torch.Tensor | int | None = None,
                cache: KVCache | None = None, padded: bool = False, hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T); doc_ids (B, T): attention stays within equal ids; positions (B, T): each token's
        position (default: its index, after the cached ones); prefix_len (B,) or int: bidirectional attention
        over the first prefix_len tokens; cache: keys and values of the tokens before these (generation).
        Logits (B, T, vocab_size); padded=True (for losses): every head row, the padded ones at -inf;
        hidden=True: the final normed hidden states (B, T, C) instead, for a loss that applies the head itself."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_len:
            raise ValueError(f"{start + T} positions are longer than model.max_len={self.cfg.max_len}")
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids do not go with a KV cache: generation decodes one document per row")
        x = self.tok_embeddings(input_ids)
        rope = None
        if self.cfg.positions == "rope":
            if positions is None:
                rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
            else:
                rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        else:
            if positions is None:
                positions = torch.arange(start, start + T, device=input_ids.device)
            x = x + self.pos_embeddings(positions)
        mask = attention_mask(T, start, doc_ids, prefix_len, input_ids.device)
        x = self.drop(residual_stream(x, self.cfg.residual))
        for layer, block in enumerate(self.layers):
            x = block(x, rope, mask, cache, layer)
        if cache is not None:
            cache.advance(T)
        h = self.norm(x)
        return h if hidden else vocab_logits(self.output(h), self.cfg.vocab_size, padded)
