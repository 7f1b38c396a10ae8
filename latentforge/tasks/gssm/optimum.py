"""The Bayes-optimal next-token loss of GSSM sequences: forward filtering over the joint hidden state.

The hidden nodes together form one hidden Markov chain over their joint state (the product of
their state counts); X is its emission, which may also read the previous token. The filter keeps
log p(z_t | x_0..x_t) and scores each token by -log p(x_t | x_0..x_t-1): the loss of a predictor
that knows the process exactly, which no model can beat on average (its entropy rate).
"""

from __future__ import annotations

import math

import torch

from latentforge.errors import ConfigError
from latentforge.tasks.gssm.graph import Graph

# The filter multiplies (joint x joint) matrices at every step; beyond this it is not worth it.
MAX_JOINT_STATES = 4096


def joint_digits(graph: Graph, device: torch.device) -> dict[str, torch.Tensor]:
    """Each hidden node's state in every joint state (first hidden node most significant)."""
    index = torch.arange(graph.joint_size, device=device)
    digits = {}
    for node in reversed(graph.hidden):
        digits[node.name] = index % node.state_dim
        index = index // node.state_dim
    return {node.name: digits[node.name] for node in graph.hidden}


def hmm_tables(graph: Graph, per_sequence: dict[str, torch.Tensor], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log transition (B|1, S, S) over joint states z' -> z, and log emission (B|1, P, V, S):
    log p(x | previous token p, joint state z). B when some node's tables are per sequence."""
    tables = {name: torch.from_numpy(t).to(device)[None] for name, t in graph.tables.items()}
    tables.update(per_sequence)
    digits = joint_digits(graph, device)
    S = graph.joint_size
    log_transition = torch.zeros(1, S, S, dtype=torch.float64, device=device)
    for node in graph.hidden:
        row = torch.zeros(S, S, dtype=torch.int64, device=device)
        for name in node.inputs:
            # Own previous state from z' (rows), parents' current states from z (columns).
            state = digits[name][:, None] if name == node.name else digits[name][None, :]
            row = row * graph.dims[name] + state
        table = tables[node.name]
        column = digits[node.name][None, :].expand(S, S)
        log_transition = log_transition + table[:, row, column].log()
    x = graph.observed
    previous_tokens = x.state_dim if x.self_edge else 1
    row = torch.arange(previous_tokens, device=device)[:, None].expand(previous_tokens, S)
    for name in x.parents:
        row = row * graph.dims[name] + digits[name][None, :]
    log_emission = tables[x.name][:, row].log()  # (B|1, P, S, V)
    return log_transition, log_emission.transpose(-1, -2).contiguous()


def forward_filter(graph: Graph, tokens: torch.Tensor, per_sequence: dict[str, torch.Tensor] | None = None,
                   marginals: bool = False, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token optimal loss (n, T-1) for tokens 1..T-1 of each sequence (token 0 is the known
    start), and, if asked, the filtered marginals p(node = s | x_0..x_t) (n, T, sum of hidden
    state counts), nodes in the graph's order."""
    if graph.joint_size > MAX_JOINT_STATES:
        raise ConfigError(f"the joint hidden state has {graph.joint_size} states (> {MAX_JOINT_STATES}); "
                          f"the exact optimum is out of reach: set data.optimum=false")
    per_sequence = per_sequence or {}
    losses, posteriors = [], []
    for start in range(0, len(tokens), chunk):
        part = {name: t[start:start + chunk] for name, t in per_sequence.items()}
        loss, post = _filter(graph, tokens[start:start + chunk], part, marginals)
        losses.append(loss)
        posteriors.append(post)
    return torch.cat(losses), torch.cat(posteriors) if marginals else None


def _filter(graph: Graph, tokens: torch.Tensor, per_sequence: dict[str, torch.Tensor], marginals: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = tokens.device
    n, T = tokens.shape
    log_transition, log_emission = hmm_tables(graph, per_sequence, device)
    transition = log_transition.exp()
    batch = torch.arange(n, device=device) if log_emission.shape[0] > 1 else torch.zeros(n, dtype=torch.int64,
                                                                                         device=device)
    S = graph.joint_size
    log_post = torch.full((n, S), -math.inf, dtype=torch.float64, device=device)
    log_post[:, 0] = 0.0  # every node starts in state 0
    one_hot = None
    if marginals:
        digits = joint_digits(graph, device)
        one_hot = torch.cat([torch.nn.functional.one_hot(digits[node.name], node.state_dim)
                             for node in graph.hidden], 1).double()
        posts = [log_post.exp() @ one_hot]
    loss = torch.empty(n, T - 1, dtype=torch.float64, device=device)
    self_edge = graph.observed.self_edge
    for t in range(1, T):
        # log p(z_t | x_<t) = log sum_z' p(z_t-1 = z' | x_<t) M[z', z_t], shifted by the max for stability.
        top = log_post.amax(-1, keepdim=True)
        prior = torch.matmul((log_post - top).exp().unsqueeze(1), transition).squeeze(1)
        previous = tokens[:, t - 1] if self_edge else torch.zeros_like(tokens[:, t - 1])
        joint = prior.log() + top + log_emission[batch, previous, tokens[:, t]]
        evidence = torch.logsumexp(joint, -1)
        loss[:, t - 1] = -evidence
        log_post = joint - evidence[:, None]
        if marginals:
            posts.append(log_post.exp() @ one_hot)
    return loss, torch.stack(posts, 1).float() if marginals else None
