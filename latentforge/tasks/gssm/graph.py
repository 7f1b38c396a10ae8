"""A graph-structured sequential model (GSSM): a dynamic Bayesian network of discrete hidden nodes
and one observed node `X` whose states are the tokens.

Each node has a conditional table: one row per joint value of its inputs (its own previous state
when `self_edge`, then its parents' current states, in that order, most significant first), one
column per new state. The tables are drawn once from Dirichlet(alpha) with the graph seed, except
in `context` mode, where they are drawn again for every sequence (see data.py).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from latentforge.config import require
from latentforge.errors import ConfigError

OBSERVED = "X"
# Every transition keeps at least this probability, so every log-probability is finite.
FLOOR = 1e-10


@dataclass
class NodeConfig:
    """One node. `mode`: default; slow (each row's largest entry moved onto the node's own previous
    state: it tends to stay); dead (largest entry moved onto state 0); context (tables redrawn for
    every sequence). `kernel`: fullrank (one table over all inputs jointly) or product
    (p proportional to the product of one table per input)."""

    name: str = ""
    state_dim: int = 2
    alpha: float = 1.0
    parents: list[str] = field(default_factory=list)
    mode: Literal["default", "slow", "dead", "context"] = "default"
    kernel: Literal["fullrank", "product"] = "fullrank"
    # Whether the node also reads its own previous state (for X: the previous token).
    self_edge: bool = True

    def validate(self) -> None:
        require(bool(self.name), "name", "must be set")
        require(self.state_dim >= 2, "state_dim", f"must be >= 2 (got {self.state_dim})")
        require(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")
        require(self.mode != "slow" or self.self_edge, "mode",
                "slow needs self_edge: true (it moves mass onto the node's own previous state)")

    @property
    def inputs(self) -> list[str]:
        return ([self.name] if self.self_edge else []) + list(self.parents)


def check_graph(nodes: list[NodeConfig]) -> list[NodeConfig]:
    """The nodes in generation order (parents first, X last); ConfigError for a graph that cannot run."""
    names = [n.name for n in nodes]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"data.nodes: two nodes are named {name!r}")
    if OBSERVED not in names:
        raise ConfigError(f"data.nodes: no node named {OBSERVED!r} (the observed node whose states are the tokens)")
    by_name = {n.name: n for n in nodes}
    for node in nodes:
        for parent in node.parents:
            if parent not in by_name:
                raise ConfigError(f"data.nodes: {node.name} has parent {parent!r}, which is not a node "
                                  f"(nodes: {', '.join(names)})")
            if parent == node.name:
                raise ConfigError(f"data.nodes: {node.name} lists itself as a parent; its own previous state "
                                  f"is read through self_edge")
            if parent == OBSERVED:
                raise ConfigError(f"data.nodes: {node.name} has parent X; X is the observed leaf and cannot be "
                                  f"a parent")
    if not by_name[OBSERVED].parents:
        raise ConfigError("data.nodes: X has no parents; the tokens would not depend on any hidden node")
    order: list[NodeConfig] = []
    state = {name: "new" for name in names}

    def visit(name: str, path: list[str]) -> None:
        if state[name] == "done":
            return
        if state[name] == "visiting":
            cycle = path[path.index(name):] + [name]
            raise ConfigError(f"data.nodes: the parents form a cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for parent in by_name[name].parents:
            visit(parent, path + [name])
        state[name] = "done"
        order.append(by_name[name])

    for name in names:
        if name != OBSERVED:
            visit(name, [])
    visit(OBSERVED, [])
    return order


def _row_dims(node: NodeConfig, dims: dict[str, int]) -> list[int]:
    return [dims[name] for name in node.inputs]


def draw_table(node: NodeConfig, input_dims: list[int], rng: np.random.Generator, size: tuple[int, ...] = ()
               ) -> np.ndarray:
    """A conditional table (*size, rows, state_dim) for `node`, its mode applied, floored and normalized."""
    alpha = np.full(node.state_dim, node.alpha)
    if node.kernel == "fullrank" or len(input_dims) <= 1:
        table = rng.dirichlet(alpha, size=(*size, math.prod(input_dims)))
    else:
        # One table per input; p(y | inputs) proportional to the product of their rows.
        table = np.ones((*size, *([1] * len(input_dims)), node.state_dim))
        for axis, dim in enumerate(input_dims):
            factor = rng.dirichlet(alpha, size=(*size, dim))
            shape = [1] * len(input_dims)
            shape[axis] = dim
            table = table * factor.reshape(*size, *shape, node.state_dim)
        table = table.reshape(*size, math.prod(input_dims), node.state_dim)
        table /= table.sum(-1, keepdims=True)
    if node.mode in ("slow", "dead"):
        rows = table.shape[-2]
        # slow: the node's own previous state is the leading input of the row index.
        target = np.arange(rows) // (rows // node.state_dim) if node.mode == "slow" else np.zeros(rows, dtype=int)
        target = np.broadcast_to(target, table.shape[:-1])
        largest = table.argmax(-1)
        top = np.take_along_axis(table, largest[..., None], -1)
        at_target = np.take_along_axis(table, target[..., None], -1)
        np.put_along_axis(table, largest[..., None], at_target, -1)
        np.put_along_axis(table, target[..., None], top, -1)
    table = np.maximum(table, FLOOR)
    return table / table.sum(-1, keepdims=True)


def node_seed(seed: int, name: str) -> list[int]:
    """A node's table stream: adding or reordering nodes leaves the others' tables unchanged."""
    return [seed, zlib.crc32(name.encode())]


class Graph:
    """The nodes in generation order with their conditional tables (float64, rows x states)."""

    def __init__(self, nodes: list[NodeConfig], seed: int):
        self.nodes = check_graph(nodes)
        self.seed = seed
        self.dims = {n.name: n.state_dim for n in self.nodes}
        self.hidden = [n for n in self.nodes if n.name != OBSERVED]
        self.observed = self.nodes[-1]
        self.input_dims = {n.name: _row_dims(n, self.dims) for n in self.nodes}
        self.tables = {
            n.name: draw_table(n, self.input_dims[n.name], np.random.default_rng(node_seed(seed, n.name)))
            for n in self.nodes if n.mode != "context"
        }

    @property
    def vocab_size(self) -> int:
        return self.observed.state_dim

    @property
    def context_nodes(self) -> list[NodeConfig]:
        return [n for n in self.nodes if n.mode == "context"]

    @property
    def joint_size(self) -> int:
        """States of the joint hidden variable the forward filter runs over."""
        return math.prod(n.state_dim for n in self.hidden)

    def draw_context_tables(self, rng: np.random.Generator, sequences: int) -> dict[str, np.ndarray]:
        """Per-sequence tables (sequences, rows, states) of the context-mode nodes."""
        return {n.name: draw_table(n, self.input_dims[n.name], rng, (sequences,)) for n in self.context_nodes}

    def describe(self) -> str:
        parts = []
        for n in self.nodes:
            inputs = ", ".join(n.inputs) or "nothing"
            parts.append(f"{n.name}[{n.state_dim}] <- {inputs} ({n.kernel}, {n.mode}, alpha {n.alpha:g})")
        return "; ".join(parts)
