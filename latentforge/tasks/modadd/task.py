"""The `modadd` task: a small transformer learns (a + b) mod p from a fraction of all p² pairs and is
tested on the rest, the classic grokking setup (Power et al. 2022): with strong weight decay, train
accuracy reaches 100% long before test accuracy leaves chance, then test accuracy jumps.

`task.loss=stablemax` and `optim.orthograd=true` are the two fixes of Prieto et al. 2025 ("Grokking
at the edge of numerical stability"), with which the model groks without weight decay.

The `acc_curve` figure draws train and test accuracy over steps (log scale), from the evaluations of
this run; its history travels in the batch stream's state, so a resumed run's figure starts at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from latentforge.config import Config, TaskConfig, require, require_evaluated_metric
from latentforge.data.epochs import EpochSampler
from latentforge.data.stream import IndexedStream
from latentforge.engine.task import Task
from latentforge.nn.losses import LOSSES
from latentforge.nn.transformer import Transformer, TransformerConfig

SPLITS = ("test", "train")


@dataclass
class ModAddTaskConfig(TaskConfig):
    # softmax: plain cross-entropy; stablemax: StableMax cross-entropy (nn/losses.py).
    loss: Literal["softmax", "stablemax"] = "softmax"


@dataclass
class ModAddDataConfig:
    p: int = 97
    # The fraction of the p² pairs that is trained on; the rest is the test split.
    train_frac: float = 0.3
    # Seed of the train/test split and of the mini-batch order.
    seed: int = 0
    # Every step sees the whole training split (train.batch_size is then unused).
    full_batch: bool = True
    # Splits evaluated every train.eval_every steps.
    eval_splits: list[str] = field(default_factory=lambda: list(SPLITS))

    def validate(self) -> None:
        require(2 <= self.p <= 10_000, "p", f"must be in [2, 10000] (got {self.p})")
        require(0 < self.train_frac < 1, "train_frac", f"must be in (0, 1) (got {self.train_frac})")
        require(0 <= self.seed < 2**31, "seed", f"must be in [0, 2**31) (got {self.seed})")
        require(bool(self.eval_splits), "eval_splits", "must name at least one split")
        for split in self.eval_splits:
            require(split in SPLITS, "eval_splits", f"items must be test or train (got {split!r})")


def split_pairs(p: int, train_frac: float, seed: int) -> dict[str, torch.Tensor]:
    """All p² pairs (a, b), shuffled by `seed`: the first train_frac of them train, the rest test."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], 1)
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = max(1, min(p * p - 1, round(train_frac * p * p)))
    return {"train": pairs[order[:n_train]], "test": pairs[order[n_train:]]}


class ModAddModel(nn.Module):
    """Reads `a b =` and predicts c = (a + b) mod p at the `=` position."""

    def __init__(self, cfg: TransformerConfig, p: int):
        super().__init__()
        self.p = p
        # Tokens 0..p-1 are the numbers, p is `=`.
        self.transformer = Transformer(cfg.shape(vocab_size=p + 1, max_len=3))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        equals = torch.full_like(pairs[:, :1], self.p)
        return self.transformer(torch.cat([pairs, equals], 1))[:, -1, : self.p]


class ModAddBatches(IndexedStream):
    """The whole training split every step, or mini-batches of it epoch after epoch (batch i is a
    pure function of (seed, i)). `curve` holds the accuracies of the evaluations so far."""

    def __init__(self, pairs: torch.Tensor, p: int, batch_size: int, full_batch: bool, seed: int):
        self.pairs, self.targets = pairs, pairs.sum(1) % p
        self.full_batch = full_batch
        self.sampler = EpochSampler(len(pairs), batch_size, seed, pairs.device)
        self.curve: dict[str, dict[int, float]] = {split: {} for split in SPLITS}

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        if self.full_batch:
            return {"pairs": self.pairs, "targets": self.targets}
        rows = self.sampler.rows(index)
        return {"pairs": self.pairs[rows], "targets": self.targets[rows]}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "curve": {k: dict(v) for k, v in self.curve.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.curve = {split: {int(k): float(v) for k, v in state["curve"].get(split, {}).items()}
                      for split in SPLITS}


class ModAdd(Task):
    name = "modadd"
    TaskConfig = ModAddTaskConfig
    ModelConfig = TransformerConfig
    DataConfig = ModAddDataConfig

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        d = cfg.data
        self.pairs = {k: v.to(device) for k, v in split_pairs(d.p, d.train_frac, d.seed).items()}
        self.loss_fn = LOSSES[cfg.task.loss]
        self.stream: ModAddBatches | None = None

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        require_evaluated_metric(cfg.checkpoint.metric, cfg.data.eval_splits, "test/accuracy")

    def build_model(self) -> nn.Module:
        return ModAddModel(self.cfg.model, self.cfg.data.p)

    def train_batches(self) -> ModAddBatches:
        d = self.cfg.data
        self.stream = ModAddBatches(self.pairs["train"], d.p, self.cfg.train.batch_size, d.full_batch, d.seed)
        return self.stream

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        logits = model(batch["pairs"])
        accuracy = (logits.argmax(-1) == batch["targets"]).float().mean()
        return self.loss_fn(logits, batch["targets"]), {"batch_accuracy": accuracy}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["pairs"])

    def eval_splits(self) -> list[str]:
        return list(SPLITS)

    def training_eval_splits(self) -> list[str]:
        return list(self.cfg.data.eval_splits)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        pairs = self.pairs[split]
        targets = pairs.sum(1) % self.cfg.data.p
        logits = torch.cat([model(chunk) for chunk in pairs.split(8192)])
        accuracy = float((logits.argmax(-1) == targets).float().mean())
        if self.stream is not None:  # training: remember the point for the figure
            self.stream.curve[split][self.stream.index // self.cfg.train.grad_accum] = accuracy
        return {f"{split}/accuracy": accuracy, f"{split}/loss": float(self.loss_fn(logits, targets))}

    def figures(self, model: nn.Module) -> dict[str, Any]:
        if self.stream is None or not any(self.stream.curve.values()):
            return {}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = self.cfg.data
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, points in self.stream.curve.items():
            if points:
                steps = sorted(points)
                ax.plot(steps, [100 * points[s] for s in steps], marker="o", markersize=2, label=split)
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"(a + b) mod {d.p}, {d.train_frac:.0%} of pairs trained on, {self.cfg.task.loss} loss, "
                     f"weight decay {self.cfg.optim.weight_decay:g}" + (", ⊥Grad" if self.cfg.optim.orthograd else ""),
                     fontsize=8)
        fig.tight_layout()
        return {"acc_curve": fig}


TASK = ModAdd
