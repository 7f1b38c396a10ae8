"""Rotary position embeddings: the 1-D tables are unchanged by the move to rope.py, and 2-D RoPE is relative."""

import math

import pytest
import torch

from latentforge.nn import transformer
from latentforge.nn.rope import apply_rope, grid_positions, rope_2d_tables, rope_tables


def test_1d_tables_are_the_formula():
    """rope_tables(3, 4, 1e4): frequencies 1 and 1e4 ** -0.5 = 0.01, angles position * frequency."""
    cos, sin = rope_tables(3, 4, 10000.0)
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.01], [2.0, 0.02]])
    assert cos.dtype == torch.float32 and cos.shape == (3, 2)
    assert torch.allclose(cos, angles.cos(), atol=1e-7) and torch.allclose(sin, angles.sin(), atol=1e-7)
    # The transformer uses the very same functions.
    assert transformer.rope_tables is rope_tables and transformer.apply_rope is apply_rope


def test_apply_rope_rotates_channel_pairs():
    """Channel i pairs with channel i + D/2 and turns by position * frequency i."""
    cos, sin = rope_tables(2, 4, 10000.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 2, 4)
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[0, 0, 0], x[0, 0, 0])  # position 0 is not rotated
    a, b = 1.0, 0.01
    expected = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                1 * math.sin(a) + 3 * math.cos(a), 2 * math.sin(b) + 4 * math.cos(b)]
    assert torch.allclose(out[0, 0, 1], torch.tensor(expected), atol=1e-6)
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_grid_positions_are_row_major():
    rows, cols = grid_positions(2, 3, "cpu")
    assert rows.tolist() == [0, 0, 0, 1, 1, 1] and cols.tolist() == [0, 1, 2, 0, 1, 2]
    assert rows.dtype == cols.dtype == torch.int64


def test_2d_tables_split_the_pairs_between_rows_and_columns():
    rows, cols = grid_positions(4, 5)
    cos, sin = rope_2d_tables(rows, cols, 16, 100.0, 1000.0)
    assert cos.shape == sin.shape == (20, 8) and cos.dtype == torch.float32
    row_cos, row_sin = rope_tables(4, 8, 100.0)
    col_cos, col_sin = rope_tables(5, 8, 1000.0)
    assert torch.allclose(cos[:, :4], row_cos[rows]) and torch.allclose(sin[:, :4], row_sin[rows])
    assert torch.allclose(cos[:, 4:], col_cos[cols]) and torch.allclose(sin[:, 4:], col_sin[cols])
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_tables(rows, cols, 6, 100.0, 100.0)


def _score(q, k, at_q, at_k, head_dim=16):
    """<rope(q at at_q), rope(k at at_k)> in float64 (apply_rope computes in float64 with float64 tables)."""
    rows = torch.tensor([at_q[0], at_k[0]])
    cols = torch.tensor([at_q[1], at_k[1]])
    cos, sin = rope_2d_tables(rows, cols, head_dim, 10.0, 50.0, dtype=torch.float64)
    x = torch.stack((q, k)).view(1, 1, 2, head_dim)
    rotated = apply_rope(x, cos, sin)
    assert rotated.dtype == torch.float64
    return (rotated[0, 0, 0] * rotated[0, 0, 1]).sum().item()


def test_2d_rope_is_relative():
    """Shifting both positions by one (dr, dc) leaves every score unchanged; shifting one of them changes it."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        # float32-representable values: apply_rope reads x in float32, so these go through exactly.
        q, k = torch.randn(2, 16, generator=gen).double()
        r1, c1, r2, c2 = torch.randint(0, 32, (4,), generator=gen).tolist()
        dr, dc = torch.randint(-20, 20, (2,), generator=gen).tolist()
        base = _score(q, k, (r1, c1), (r2, c2))
        assert _score(q, k, (r1 + dr, c1 + dc), (r2 + dr, c2 + dc)) == pytest.approx(base, abs=1e-10)
        assert _score(q, k, (r1 + 3, c1), (r2, c2)) != pytest.approx(base, abs=1e-3)
        assert _score(q, k, (r1, c1), (r2, c2 + 3)) != pytest.approx(base, abs=1e-3)
