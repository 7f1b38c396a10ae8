"""Attention blocks shared by encoder-decoder models: bidirectional self-attention with a key mask,
cross-attention to a memory, and the encoder, latent (learned queries reading a context) and
decoder blocks built from them."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.nn.rope import apply_rope
from latentforge.nn.transformer import MLP, SelfAttention, TransformerShape


class PaddedSelfAttention(SelfAttention):
    """Bidirectional self-attention with RoPE that ignores padded keys (SelfAttention itself takes no mask)."""

    def __init__(self, shape: TransformerShape):
        super().__init__(shape, causal=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, keep: Tensor | None = None) -> Tensor:
        """keep (B, 1, 1, T): True for the keys to attend to (None: all)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    """Queries from the stream, keys and values from a memory. No RoPE: memory and stream share no positions."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        assert shape.d_model % shape.n_head == 0, "d_model must be divisible by n_head"
        self.n_head = shape.n_head
        self.q = nn.Linear(shape.d_model, shape.d_model, bias=False)
        self.kv = nn.Linear(shape.d_model, 2 * shape.d_model, bias=False)
        self.proj = nn.Linear(shape.d_model, shape.d_model, bias=False)
        self.dropout = shape.dropout

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None = None) -> Tensor:
        """mask broadcasts to (B, H, T, S): bool (True = attend) or an additive float bias."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k, v = self.kv(memory).view(B, memory.shape[1], 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # CUDA's fused SDPA kernels take a float bias only in the query's dtype
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderBlock(nn.Module):
    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.norm1 = nn.LayerNorm(shape.d_model)
        self.attn = PaddedSelfAttention(shape)
        self.norm2 = nn.LayerNorm(shape.d_model)
        self.mlp = MLP(shape)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, keep: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, keep))
        return x + self.drop(self.mlp(self.norm2(x)))


class LatentBlock(nn.Module):
    """Latents attend to each other, then read the question, then think (MLP)."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.norm1 = nn.LayerNorm(shape.d_model)
        # Self-attention over an unordered set is cross-attention of the set to itself: the latents are
        # distinct learned vectors already, so a RoPE order over their index would only add a fake ordering.
        self.attn = CrossAttention(shape)
        self.norm2 = nn.LayerNorm(shape.d_model)
        self.cross = CrossAttention(shape)
        self.norm3 = nn.LayerNorm(shape.d_model)
        self.mlp = MLP(shape)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, z: Tensor, context: Tensor, keep: Tensor | None = None) -> Tensor:
        h = self.norm1(z)
        z = z + self.drop(self.attn(h, h))
        z = z + self.drop(self.cross(self.norm2(z), context, keep))
        return z + self.drop(self.mlp(self.norm3(z)))


class DecoderBlock(nn.Module):
    """Self-attention with RoPE (causal, or over the whole grid), then cross-attention to a memory, then MLP."""

    def __init__(self, shape: TransformerShape, causal: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(shape.d_model)
        self.attn = SelfAttention(shape, causal=causal)
        self.norm2 = nn.LayerNorm(shape.d_model)
        self.cross = CrossAttention(shape)
        self.norm3 = nn.LayerNorm(shape.d_model)
        self.mlp = MLP(shape)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, memory: Tensor, bias: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin))
        x = x + self.drop(self.cross(self.norm2(x), memory, bias))
        return x + self.drop(self.mlp(self.norm3(x)))
