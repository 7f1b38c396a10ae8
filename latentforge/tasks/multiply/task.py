"""The `multiply` task: a decoder-only transformer learns a x b = c with no chain of thought."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.config import Config, TaskConfig, require
from latentforge.engine.task import Task
from latentforge.errors import ConfigError
from latentforge.nn.transformer import Transformer, TransformerShape
from latentforge.tasks.multiply.data import (
    END,
    IGNORE,
    MAX_OPERAND_DIGITS,
    PAD,
    VOCAB_SIZE,
    Examples,
    MultiplyBatches,
    MultiplyData,
    OperandSpace,
    encode,
    read_icot_file,
    sequence_length,
)


@dataclass
class MultiplyModelConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    max_len: int = 64

    def validate(self) -> None:
        for key in ("n_layer", "n_head", "d_model", "max_len"):
            require(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        require(self.d_model % self.n_head == 0, "d_model",
                f"must be divisible by model.n_head={self.n_head} (got {self.d_model})")
        require((self.d_model // self.n_head) % 2 == 0, "n_head", "must leave an even head size for RoPE")
        require(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0 (got {self.mlp_ratio})")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1) (got {self.dropout})")


@dataclass
class MultiplyDataConfig:
    # Inclusive [min, max] digit counts of each operand.
    digits_a: tuple[int, int] = (1, 2)
    digits_b: tuple[int, int] = (1, 2)
    # Held-out pairs, never trained on (with holdout_commuted, b*a is held out with a*b).
    test_size: int = 1000
    holdout_commuted: bool = True
    # Least-significant digit first, as in the implicit-CoT papers.
    reverse: bool = True
    # Zero-pad operands to their widest and the answer to the sum of the widths (the
    # implicit-CoT layout): every example aligns, which small models learn far faster.
    fixed_width: bool = True
    # Splits evaluated during training; `train` is a sample of the training pairs.
    eval_splits: list[str] = field(default_factory=lambda: ["test"])
    train_eval_size: int = 1000
    # Extra evaluation sets from implicit-CoT files: {split name: path}.
    eval_files: dict[str, str] = field(default_factory=dict)
    eval_batch_size: int = 1000
    seed: int = 1234

    def __post_init__(self) -> None:
        # Absolute paths, so the saved config evaluates and reruns from any directory.
        if isinstance(self.eval_files, dict):
            self.eval_files = {k: str(Path(v).expanduser().resolve()) if isinstance(v, str) else v
                               for k, v in self.eval_files.items()}

    def validate(self) -> None:
        for key in ("digits_a", "digits_b"):
            low, high = getattr(self, key)
            require(1 <= low <= high <= MAX_OPERAND_DIGITS, key,
                    f"must be [min, max] with 1 <= min <= max <= {MAX_OPERAND_DIGITS} (got {[low, high]})")
        require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (got {self.seed})")
        require(self.test_size >= 1, "test_size", f"must be >= 1 (got {self.test_size})")
        require(self.train_eval_size >= 1, "train_eval_size", f"must be >= 1 (got {self.train_eval_size})")
        require(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1 (got {self.eval_batch_size})")
        size = OperandSpace(self.digits_a, self.digits_b).size
        require(self.test_size <= size // 2, "test_size",
                f"must be at most half of the {size} possible pairs (got {self.test_size})")
        for name in self.eval_files:
            require(name not in ("test", "train") and "/" not in name, "eval_files",
                    f"split name {name!r} must not be 'test', 'train' or contain '/'")


class Multiply(Task):
    name = "multiply"
    TaskConfig = TaskConfig
    ModelConfig = MultiplyModelConfig
    DataConfig = MultiplyDataConfig

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        d = cfg.data
        self.data = MultiplyData(d.digits_a, d.digits_b, d.test_size, d.holdout_commuted, d.seed)
        self.length = sequence_length(d.digits_a[1], d.digits_b[1])
        self._eval_sets: dict[str, Examples] = {}
        # Read the evaluation files now, so a bad file stops the run before any training.
        for split in d.eval_files:
            self.eval_examples(split)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        d, m = cfg.data, cfg.model
        length = sequence_length(d.digits_a[1], d.digits_b[1])
        require(length <= m.max_len, "model.max_len",
                f"must be >= {length}, the longest sequence of data.digits_a/digits_b (got {m.max_len})")
        splits = ["test", "train", *d.eval_files]
        for split in d.eval_splits:
            if split not in splits:
                raise ConfigError(f"data.eval_splits: unknown split {split!r} (splits: {', '.join(splits)})")
        if cfg.checkpoint.metric:
            split = cfg.checkpoint.metric.split("/")[0]
            require(split in d.eval_splits, "checkpoint.metric",
                    f"must be a metric of an evaluated split {d.eval_splits}, e.g. test/exact_match "
                    f"(got {cfg.checkpoint.metric!r})")

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return Transformer(TransformerShape(
            vocab_size=VOCAB_SIZE, n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model,
            mlp_ratio=m.mlp_ratio, dropout=m.dropout, max_len=m.max_len, tie_embeddings=m.tie_embeddings,
        ))

    def train_batches(self) -> MultiplyBatches:
        t = self.cfg.train
        d = self.cfg.data
        return MultiplyBatches(self.data, t.batch_size, d.reverse, d.fixed_width, self.length, self.device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        inputs, targets = batch
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        scored = targets != IGNORE
        token_acc = ((logits.argmax(-1) == targets) & scored).sum() / scored.sum()
        return loss, {"answer_token_acc": token_acc}

    def loss_weight(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (batch[1] != IGNORE).sum()

    def tokens_in(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()

    def eval_splits(self) -> list[str]:
        return ["test", "train", *self.cfg.data.eval_files]

    def training_eval_splits(self) -> list[str]:
        return list(self.cfg.data.eval_splits)

    def eval_examples(self, split: str) -> Examples:
        if split not in self._eval_sets:
            if split == "test":
                ex = self.data.examples(*self.data.test, self.device)
            elif split == "train":
                d = self.cfg.data
                batches = MultiplyBatches(self.data, d.train_eval_size, d.reverse, d.fixed_width, self.length,
                                          self.device)
                ex = self.data.examples(*batches.pairs(0), self.device)
            else:
                ex = read_icot_file(self.cfg.data.eval_files[split])
                ex = Examples(*(getattr(ex, f).to(self.device) for f in ("a", "b", "c", "len_a", "len_b", "len_c")))
            self._eval_sets[split] = ex
        return self._eval_sets[split]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Greedy-decode every answer; token accuracy and exact match, overall and per a x b length."""
        d = self.cfg.data
        ex = self.eval_examples(split)
        layout = ex.fixed_width() if d.fixed_width else ex
        correct = torch.zeros(len(ex), device=self.device)
        target_len = layout.len_c + 1
        # Rows with the same operand layout share a prompt length and decode together.
        for la, lb in torch.unique(torch.stack([layout.len_a, layout.len_b], 1), dim=0).tolist():
            rows = ((layout.len_a == la) & (layout.len_b == lb)).nonzero().squeeze(1)
            for chunk in rows.split(d.eval_batch_size):
                sub = layout.select(chunk)
                generated = greedy_answer(model, sub, la, lb, d.reverse)
                target = encode(sub, d.reverse, 2 * (la + lb) + 3)[:, la + lb + 2:]
                scored = torch.arange(target.shape[1], device=self.device)[None] < target_len[chunk, None]
                correct[chunk] = ((generated == target) & scored).sum(1).float()
        exact = correct == target_len
        metrics = {
            f"{split}/token_acc": float(correct.sum() / target_len.sum()),
            f"{split}/exact_match": float(exact.float().mean()),
        }
        # Buckets by the operands' own lengths (not their padded layout).
        buckets = torch.stack([ex.len_a, ex.len_b], 1)
        for la, lb in torch.unique(buckets, dim=0).tolist():
            rows = (ex.len_a == la) & (ex.len_b == lb)
            metrics[f"{split}/exact_match/{la}x{lb}"] = float(exact[rows].float().mean())
            metrics[f"{split}/token_acc/{la}x{lb}"] = float(correct[rows].sum() / target_len[rows].sum())
        metrics[f"{split}/examples"] = float(len(ex))
        return metrics


def greedy_answer(model: nn.Module, ex: Examples, la: int, lb: int, reverse: bool) -> torch.Tensor:
    """Generate la + lb + 1 tokens after `a * b =` for examples whose operands have la and lb digits."""
    prompt_len = la + lb + 2
    tokens = encode(ex, reverse, prompt_len + la + lb + 1)[:, :prompt_len]
    for _ in range(la + lb + 1):
        next_token = model(tokens)[:, -1].argmax(-1)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    answer = tokens[:, prompt_len:]
    # Everything after the first <end> counts as padding.
    after_end = (answer == END).int().cumsum(1) - (answer == END).int() > 0
    return answer.masked_fill(after_end, PAD)


TASK = Multiply
