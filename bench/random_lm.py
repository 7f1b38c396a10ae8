"""Next-token prediction on random tokens: the benchmarks' GPT-2-shaped workload.

A task outside latentforge (`task.name: bench.random_lm:RandomLM`, see bench/configs/): the model is
latentforge's Transformer and batch i is a pure function of (seed, i), made on the device, so the
measured time is the model's and the optimizer's, and resume and multi-process sharding are exact.
The loss floor is ln(vocab): random tokens carry nothing to learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.config import Config, TaskConfig, require
from latentforge.data.stream import IndexedStream
from latentforge.engine.fused_loss import check_fused_config, check_fused_device, unwrapped
from latentforge.engine.task import Task
from latentforge.nn.fused_ce import linear_cross_entropy
from latentforge.nn.transformer import Transformer, TransformerConfig

IGNORE = -100


@dataclass
class RandomLMTaskConfig(TaskConfig):
    # The loss through nn.fused_ce (Triton, CUDA): the gradient made in the same pass over the logits as the
    # log-sum-exp; one process or DDP.
    fused_loss: bool = False


@dataclass
class RandomLMModelConfig(TransformerConfig):
    vocab_size: int = 50257

    def validate(self) -> None:
        super().validate()
        require(self.vocab_size >= 2, "vocab_size", f"must be >= 2 (got {self.vocab_size})")


@dataclass
class RandomLMDataConfig:
    seq_len: int = 1024
    seed: int = 0
    # Rows of the fixed held-out batch that `valid/loss` is measured on.
    eval_rows: int = 16

    def validate(self) -> None:
        require(self.seq_len >= 2, "seq_len", f"must be >= 2 (got {self.seq_len})")
        require(self.eval_rows >= 1, "eval_rows", f"must be >= 1 (got {self.eval_rows})")


class RandomTokenBatches(IndexedStream):
    """Rows of uniformly random tokens; batch i is drawn from a generator seeded by (seed, i)."""

    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int, device: torch.device):
        self.rows, self.seq_len, self.vocab, self.seed, self.device = rows, seq_len, vocab, seed, device
        self.generator = torch.Generator(device=device)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        self.generator.manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(0, self.vocab, (self.rows, self.seq_len + 1), device=self.device,
                               generator=self.generator)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32, whatever the autocast dtype of the logits."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


class RandomLM(Task):
    name = "random_lm"
    TaskConfig = RandomLMTaskConfig
    ModelConfig = RandomLMModelConfig
    DataConfig = RandomLMDataConfig

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        check_fused_device(cfg, device)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        check_fused_config(cfg)

    def build_model(self) -> nn.Module:
        m, d = self.cfg.model, self.cfg.data
        return Transformer(m.shape(m.vocab_size, d.seq_len))

    def train_batches(self) -> RandomTokenBatches:
        m, d = self.cfg.model, self.cfg.data
        return RandomTokenBatches(self.cfg.train.batch_size, d.seq_len, m.vocab_size, d.seed, self.device)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cfg.task.fused_loss:
            loss, _ = linear_cross_entropy(model(batch["inputs"], hidden=True), unwrapped(model).head.weight,
                                           batch["targets"], self.cfg.model.vocab_size)
            return loss, {}
        return lm_loss(model(batch["inputs"], padded=True), batch["targets"]), {}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["inputs"].numel()

    def eval_splits(self) -> list[str]:
        return ["valid"]

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        m, d = self.cfg.model, self.cfg.data
        # Another seed than training's: the held-out rows are never trained on.
        batch = RandomTokenBatches(d.eval_rows, d.seq_len, m.vocab_size, d.seed + 1, self.device).batch(0)
        loss = float(lm_loss(model(batch["inputs"]), batch["targets"]))
        return {"valid/loss": loss, "valid/loss_above_floor": loss - math.log(m.vocab_size)}

    def flops_per_example(self, model: nn.Module) -> float:
        """Forward FLOPs of one row: 2 per weight per token plus causal attention counted in full. Model
        FLOPs: the padded vocabulary rows (model.vocab_multiple) are not counted, nor learned positions (a
        lookup, no matmul)."""
        m, d = self.cfg.model, self.cfg.data
        padding = (m.shape(m.vocab_size, d.seq_len).padded_vocab - m.vocab_size) * m.d_model
        positions = model.pos_embed.weight.numel() if model.pos_embed is not None else 0
        weights = sum(p.numel() for p in model.parameters()) - padding * (1 if m.tie_embeddings else 2) - positions
        return float(d.seq_len * (2 * weights + 4 * m.n_layer * m.d_model * d.seq_len))
