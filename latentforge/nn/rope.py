"""Rotary position embeddings (Su et al. 2021): 1-D over a sequence and 2-D over a grid.

Both kinds of tables are (positions, head_dim // 2) cos/sin pairs read by the same `apply_rope`, so a model
switches from sequences to grids by swapping the tables, not the attention.
"""

from __future__ import annotations

import torch


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x (B, H, T, D) by position-dependent angles.

    cos/sin are a (positions, D/2) table read from position 0, or already gathered per token and
    broadcastable to (B, H, T, D/2) (packed documents, where positions restart at each document)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


def rope_2d_tables(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base_row: float, base_col: float,
                   *, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (P, head_dim // 2) for P cells at integer (rows[p], cols[p]).

    The first half of the rotated pairs turn with the row, the second half with the column, each axis with its
    own frequencies (head_dim // 4 of them, from its own base): a query-key score then depends on the row offset
    and the column offset only. `dtype` float64 is for exact checks; models use float32.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head size divisible by 4 (got {head_dim})")
    if rows.shape != cols.shape or rows.dim() != 1:
        raise ValueError(f"rows and cols must be 1-D and of one length (got {tuple(rows.shape)}, {tuple(cols.shape)})")
    axis_dim = head_dim // 2

    def angles(positions: torch.Tensor, base: float) -> torch.Tensor:
        exponents = torch.arange(0, axis_dim, 2, dtype=dtype, device=positions.device) / axis_dim
        return torch.outer(positions.to(dtype), 1.0 / (base**exponents))

    theta = torch.cat((angles(rows, base_row), angles(cols, base_col)), dim=-1)
    return theta.cos(), theta.sin()


def grid_positions(height: int, width: int,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), each (height * width,) int64, of a grid flattened row by row (cell p = row * width + col)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return rows, cols
