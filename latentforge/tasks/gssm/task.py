"""The `gssm` task: a transformer learns sequences of a graph-structured hidden Markov process, and
every loss is measured against the process's exact Bayes-optimal loss.

Logged beside the loss: `optimal_loss` (the entropy rate of the same sequences, by forward
filtering), `gap` (their difference) and `relative_gap` (gap / optimal loss). `latentforge probe
RUN` reads every layer's residual stream with linear probes for each hidden node's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentforge.config import Config, TaskConfig, require, require_evaluated_metric
from latentforge.engine.task import Task
from latentforge.errors import ConfigError, DataError, TrainingStopped
from latentforge.nn.losses import cross_entropy
from latentforge.nn.probe import ProbeMethod, probe_accuracy
from latentforge.nn.transformer import Transformer, TransformerConfig
from latentforge.tasks.gssm.data import GSSMBatches, SequenceSet, generate, read_dataset, stream_key, write_dataset
from latentforge.tasks.gssm.graph import Graph, NodeConfig, check_graph
from latentforge.tasks.gssm.optimum import MAX_JOINT_STATES, forward_filter
from latentforge.track.files import write_csv
from latentforge.track.plots import save_heatmap

# A held-out loss this many standard errors below the optimum means the evaluation is broken.
SANITY_SIGMAS = 3.0


def sparse_graph() -> list[NodeConfig]:
    """Four independent 4-state nodes Z1..Z4 driving X (32 tokens): the `gssm/sparse` preset."""
    hidden = [NodeConfig(name=f"Z{i}", state_dim=4, alpha=1.0) for i in range(1, 5)]
    return hidden + [NodeConfig(name="X", state_dim=32, alpha=0.01, parents=[n.name for n in hidden])]


@dataclass
class GSSMDataConfig:
    # The process: hidden nodes and the observed node X (see graph.NodeConfig).
    nodes: list[NodeConfig] = field(default_factory=sparse_graph)
    # Seed of the transition tables (the process); `seed` is that of the sequences.
    graph_seed: int = 0
    seed: int = 42
    seq_len: int = 256
    # 0: every training sequence is fresh (an endless stream); N: N sequences, repeated over epochs.
    train_sequences: int = 0
    test_sequences: int = 1000
    # The `train` split evaluates this many of the training sequences.
    train_eval_sequences: int = 1000
    eval_splits: list[str] = field(default_factory=lambda: ["test"])
    eval_batch_size: int = 128
    # Compute the Bayes-optimal loss (needs a joint hidden state of at most 4096 states).
    optimum: bool = True
    # A dataset written by `latentforge data generate`: train and test are read from it.
    path: str = ""
    # The endless stream generates this many sequences at once (the per-step loop is amortized).
    chunk_sequences: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.path, str) and self.path:
            self.path = str(Path(self.path).expanduser().resolve())

    def validate(self) -> None:
        require(bool(self.nodes), "nodes", "must list at least the observed node X and one hidden node")
        for key in ("seed", "graph_seed"):
            require(0 <= getattr(self, key) < 2**31, key, f"must be in [0, 2**31) (got {getattr(self, key)})")
        require(self.seq_len >= 3, "seq_len", f"must be >= 3 (got {self.seq_len})")
        require(self.train_sequences >= 0, "train_sequences", f"must be >= 0 (got {self.train_sequences})")
        for key in ("test_sequences", "train_eval_sequences", "eval_batch_size", "chunk_sequences"):
            require(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        for split in self.eval_splits:
            require(split in ("test", "train"), "eval_splits", f"items must be test or train (got {split!r})")


class GSSM(Task):
    name = "gssm"
    TaskConfig = TaskConfig
    ModelConfig = TransformerConfig
    DataConfig = GSSMDataConfig

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        d = cfg.data
        self.graph = Graph(d.nodes, d.graph_seed)
        self.optimum = d.optimum
        self._sets: dict[str, SequenceSet] = {}
        self.train_set: SequenceSet | None = None
        if d.path:
            self._read_file(d.path)
        elif d.train_sequences:
            self.train_set = self._generate("train", d.train_sequences)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        d = cfg.data
        graph = check_graph(d.nodes)
        joint = math.prod(n.state_dim for n in graph if n.name != "X")
        if d.optimum and joint > MAX_JOINT_STATES:
            raise ConfigError(f"data.optimum: the joint hidden state has {joint} states (> {MAX_JOINT_STATES}); "
                              f"the exact optimum is out of reach: set data.optimum=false")
        require_evaluated_metric(cfg.checkpoint.metric, d.eval_splits, "test/gap")

    # ------------------------------------------------------------------ data
    def _generate(self, split: str, n: int) -> SequenceSet:
        d = self.cfg.data
        return generate(self.graph, stream_key(d.seed, split), 0, n, d.seq_len, self.device, self.optimum,
                        d.chunk_sequences)

    def _read_file(self, path: str) -> None:
        """Train and test from a dataset file, which must hold this config's process."""
        d = self.cfg.data
        meta, splits = read_dataset(path)
        for key in ("nodes", "graph_seed", "seq_len"):
            ours = self.cfg.to_dict()["data"][key]
            if meta.get(key) != ours:
                raise DataError(f"{path} was generated with data.{key}={meta.get(key)!r}, this run has {ours!r}")
        for split, wanted in (("train", d.train_sequences), ("test", d.test_sequences)):
            have = len(splits[split])
            if wanted > have:
                raise DataError(f"data.{split}_sequences={wanted} but {path} holds {have} {split} sequences")
            if self.optimum and bool(splits[split].optimal.isnan().any()):
                raise DataError(f"{path} was written without optimal losses; set data.optimum=false")
            self._sets[split] = splits[split].select(slice(0, wanted or have)).to(self.device)
        self.train_set = self._sets["train"]

    def eval_set(self, split: str) -> SequenceSet:
        d = self.cfg.data
        if split == "train" and split not in self._sets:
            n = d.train_eval_sequences
            self._sets[split] = self.train_set.select(slice(0, n)) if self.train_set is not None \
                else self._generate("train", n)
        if split == "test" and split not in self._sets:
            self._sets[split] = self._generate("test", d.test_sequences)
        return self._sets[split]

    def train_batches(self) -> GSSMBatches:
        d = self.cfg.data
        return GSSMBatches(self.graph, d.seed, d.seq_len, self.cfg.train.batch_size, self.device, self.optimum,
                           self.train_set, d.chunk_sequences)

    def write_data(self, path: Path) -> dict[str, str]:
        d = self.cfg.data
        if not d.train_sequences:
            raise ConfigError("data.train_sequences must be > 0 to write a dataset (0 means an endless stream)")
        if d.path:
            raise ConfigError("data.path is set: this config reads a dataset file, it does not generate one")
        splits = {"train": self.train_set, "test": self.eval_set("test")}
        meta = {key: self.cfg.to_dict()["data"][key] for key in ("nodes", "graph_seed", "seed", "seq_len")}
        write_dataset(path, splits, meta)
        lines = {split: f"{len(s)} sequences x {d.seq_len} tokens" for split, s in splits.items()}
        if self.optimum:
            lines["optimal loss"] = ", ".join(f"{split} {float(s.optimal.mean()):.4f}" for split, s in splits.items())
        return lines

    # ------------------------------------------------------------------ model and loss
    def build_model(self) -> nn.Module:
        return Transformer(self.cfg.model.shape(self.graph.vocab_size, self.cfg.data.seq_len))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        logits = model(batch["inputs"])
        loss = cross_entropy(logits, batch["targets"])
        metrics = {}
        if self.optimum:
            optimal = batch["optimal"].mean().float()
            metrics = {"optimal_loss": optimal, "gap": loss.detach() - optimal}
        return loss, metrics

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["inputs"].numel()

    # ------------------------------------------------------------------ evaluation
    def eval_splits(self) -> list[str]:
        return ["test", "train"]

    def training_eval_splits(self) -> list[str]:
        return list(self.cfg.data.eval_splits)

    def sequence_losses(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Each sequence's mean next-token loss (n,), float64."""
        out = []
        for chunk in tokens.long().split(self.cfg.data.eval_batch_size):
            nll = cross_entropy(model(chunk[:, :-1]), chunk[:, 1:], reduction="none")
            out.append(nll.double().mean(1))
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        seqs = self.eval_set(split)
        losses = self.sequence_losses(model, seqs.tokens)
        n = len(losses)
        metrics = {f"{split}/loss": float(losses.mean())}
        if self.optimum:
            gaps = losses - seqs.optimal
            optimal, gap = float(seqs.optimal.mean()), float(gaps.mean())
            gap_se = float(gaps.std()) / math.sqrt(n) if n > 1 else 0.0
            metrics.update({
                f"{split}/optimal_loss": optimal,
                # Sequences are independent: the standard error of the optimum's estimate of the entropy
                # rate (for context mode, a Monte Carlo estimate over the sequences' sampled tables).
                f"{split}/optimal_loss_se": float(seqs.optimal.std()) / math.sqrt(n) if n > 1 else 0.0,
                f"{split}/gap": gap,
                f"{split}/gap_se": gap_se,
                f"{split}/relative_gap": gap / optimal,
            })
            if split == "test" and gap < -SANITY_SIGMAS * gap_se - 1e-9:
                raise TrainingStopped(
                    f"sanity check failed: the held-out loss {float(losses.mean()):.4f} is below the Bayes-optimal "
                    f"loss {optimal:.4f} by {-gap / max(gap_se, 1e-12):.1f} standard errors; no model can do that, "
                    f"so the evaluation or the optimum is wrong")
        metrics[f"{split}/examples"] = float(n)
        return metrics

    # ------------------------------------------------------------------ probing
    @torch.no_grad()
    def probe(self, model: nn.Module, out: Path, split: str = "test", method: ProbeMethod = "logistic",
              examples: int = 500) -> list[dict[str, Any]]:
        """Linear probes on every layer's residual stream (0 = embeddings) for each hidden node's
        current state, beside the Bayes ceiling (the filtered posterior's argmax). Positions 1..T-2
        of the first `examples` sequences; probes fit on 80% of the sequences, scored on the rest."""
        if split not in self.eval_splits():
            raise ConfigError(f"unknown split {split!r} (splits: {', '.join(self.eval_splits())})")
        seqs = self.eval_set(split).select(slice(0, examples))
        n = len(seqs)
        if n < 5:
            raise ConfigError(f"probing needs at least 5 sequences (the {split} split has {n})")
        tokens = seqs.tokens.long()
        _, posterior = forward_filter(self.graph, tokens, seqs.context_tables, marginals=True)
        layers = self.cfg.model.n_layer
        streams = []
        for chunk in tokens[:, :-1].split(self.cfg.data.eval_batch_size):
            _, kept = model.hidden(model.embed(chunk), keep=tuple(range(layers + 1)))
            streams.append(torch.stack([kept[k] for k in range(layers + 1)]).float())
        hidden = torch.cat(streams, 1)[:, :, 1:]  # (layers + 1, n, T - 2, d): positions 1..T-2
        n_fit = max(1, int(0.8 * n))
        rows = []
        offset = 0
        for k, node in enumerate(self.graph.hidden):
            truth = seqs.states[:, 1:-1, k].long()
            ceiling_guess = posterior[:, 1:-1, offset: offset + node.state_dim].argmax(-1)
            offset += node.state_dim
            ceiling = float((ceiling_guess[n_fit:] == truth[n_fit:]).float().mean())
            row: dict[str, Any] = {"node": node.name, "states": node.state_dim, "ceiling": ceiling}
            for layer in range(layers + 1):
                feats = hidden[layer]
                acc = probe_accuracy(feats[:n_fit].flatten(0, 1), truth[:n_fit].flatten(),
                                     feats[n_fit:].flatten(0, 1), truth[n_fit:].flatten(), node.state_dim, method)
                row[f"layer{layer}"] = acc
            row["best_layer"] = max(range(layers + 1), key=lambda i: row[f"layer{i}"])
            row["best_of_ceiling"] = row[f"layer{row['best_layer']}"] / max(ceiling, 1e-12)
            rows.append(row)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / "probe.csv")
        save_heatmap(
            [[row[f"layer{i}"] / max(row["ceiling"], 1e-12) for i in range(layers + 1)] for row in rows],
            [f"{r['node']} (ceiling {r['ceiling']:.2f})" for r in rows], [f"layer {i}" for i in range(layers + 1)],
            [[f"{row[f'layer{i}']:.2f}" for i in range(layers + 1)] for row in rows],
            f"probe accuracy / Bayes ceiling ({split}, {method}, {n} sequences)", out / "probe.png")
        return rows


TASK = GSSM
