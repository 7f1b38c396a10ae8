"""Vectorized sampling of GSSM sequences on any device.

Sequence i of a stream is a pure function of (stream key, i): its random numbers come from a
counter-based hash of (key, i, t, node), the same on the CPU and the GPU and whatever the batch,
so exact resume, sharding and on-device generation need nothing but the index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latentforge.tasks.gssm.graph import Graph

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_KEY = 0x632BE59BD9B4E019


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (multiplications wrap modulo 2**64)."""
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def uniforms(key: int, first: int, n: int, steps: int, nodes: int, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float64 numbers (n, steps, nodes) for sequences first .. first+n-1 of stream `key`."""
    offset = (key * _KEY + first * steps * nodes) % 2**64
    counter = torch.arange(n * steps * nodes, dtype=torch.int64, device=device) + (offset - (offset >> 63 << 64))
    bits = _shift_right(_splitmix64(counter), 11)
    return (bits.double() * 2.0**-53).view(n, steps, nodes)


@dataclass
class Sequences:
    """Sampled sequences: tokens (n, T), hidden states (n, T, hidden nodes) in the graph's order,
    and, for context-mode nodes, each sequence's own tables (n, rows, states)."""

    tokens: torch.Tensor
    states: torch.Tensor
    context_tables: dict[str, torch.Tensor]


def context_tables(graph: Graph, key: int, first: int, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Each sequence's own tables for the context-mode nodes, drawn from (key, sequence index)."""
    if not graph.context_nodes:
        return {}
    drawn = [graph.draw_context_tables(np.random.default_rng([key, first + i]), 1) for i in range(n)]
    return {name: torch.from_numpy(np.concatenate([d[name] for d in drawn])).to(device)
            for name in drawn[0]}


def sample(graph: Graph, key: int, first: int, n: int, length: int, device: torch.device) -> Sequences:
    """Sequences first .. first+n-1 of stream `key`. Every node starts in state 0 (so token 0 is 0,
    a known start); at each later step every node draws its new state, parents first."""
    u = uniforms(key, first, n, length, len(graph.nodes), device)
    per_sequence = context_tables(graph, key, first, n, device)
    shared = {name: torch.from_numpy(table).to(device) for name, table in graph.tables.items()}
    cdfs = {name: t.cumsum(-1) for name, t in {**shared, **per_sequence}.items()}
    rows_of = torch.arange(n, device=device)
    previous = {node.name: torch.zeros(n, dtype=torch.int64, device=device) for node in graph.nodes}
    history = {node.name: [previous[node.name]] for node in graph.nodes}
    for t in range(1, length):
        current: dict[str, torch.Tensor] = {}
        for k, node in enumerate(graph.nodes):
            row = torch.zeros(n, dtype=torch.int64, device=device)
            for name in node.inputs:
                state = previous[name] if name == node.name else current[name]
                row = row * graph.dims[name] + state
            cdf = cdfs[node.name]
            cdf = cdf[rows_of, row] if node.name in per_sequence else cdf[row]
            # Inverse-CDF sampling; scaling by the last entry keeps the draw inside the row.
            draw = torch.searchsorted(cdf, (u[:, t, k] * cdf[:, -1]).unsqueeze(1), side="right").squeeze(1)
            current[node.name] = draw.clamp(max=node.state_dim - 1)
            history[node.name].append(current[node.name])
        previous = current
    tokens = torch.stack(history[graph.observed.name], 1)
    states = torch.stack([torch.stack(history[node.name], 1) for node in graph.hidden], 2)
    return Sequences(tokens, states, per_sequence)
