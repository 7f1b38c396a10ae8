"""A key-value cache for decoding: each layer's keys and values for all max_len positions, allocated once.

Generation feeds the prompt once, then one token per step; each step writes its keys and values after
those already cached and attends to all of them, so a step costs one token's work instead of the whole
sequence's.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values (B, n_kv_heads, max_len, head_dim) per layer; `length` positions are filled."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        # Allocated at a layer's first write, in the dtype the layer computes in (bf16 under autocast).
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's keys and values (B, H, T, D) after the cached ones; returns all of them so far."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more positions filled (after every layer has written them)."""
        self.length += n
