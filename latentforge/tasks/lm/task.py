"""The `lm` task: a decoder-only language model (nn/lm.py, Llama or GPT-2) trained on text from the data
platform (data/text.py): packed rows of documents that never attend to each other, next-token cross-entropy
with an optional z-loss, and optionally a prefix-LM (bidirectional attention over the first
task.prefix_len tokens of each row, which are then context only, never predicted).

Besides training it serves `latentforge generate` (sampling with the KV cache), `latentforge export --format
hf` (a transformers checkpoint) and `model.init_from=DIR` (a local transformers Llama or GPT-2 checkpoint
as the starting weights, through `init_from_path`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.config import Config, TaskConfig, require, require_evaluated_metric
from latentforge.data.text import TextBatches, TextDataConfig, eval_batches, load_tokenizer, text_batches
from latentforge.engine.distributed import env_from_environ
from latentforge.engine.fused_loss import check_fused_config, check_fused_device, unwrapped
from latentforge.engine.task import Task
from latentforge.errors import CheckpointError, ConfigError
from latentforge.interop.hf import export_hf, load_hf
from latentforge.nn.fused_ce import linear_cross_entropy
from latentforge.nn.generate import generate
from latentforge.nn.lm import LM, LMConfig, forward_flops
from latentforge.nn.lm_loss import IGNORE, lm_loss
from latentforge.track.progress import tracked

SPLIT = "valid"
# Tokens `latentforge predict RUN TEXT` continues a prompt by (fewer when max_len leaves less room).
PREDICT_TOKENS = 200


@dataclass
class LMTaskConfig(TaskConfig):
    # Weight of the z-loss, mean(logsumexp(logits)^2), beside the cross-entropy (0: off; PaLM used 1e-4).
    z_loss: float = 0.0
    # Prefix-LM: the first prefix_len tokens of every row attend to each other both ways and are not
    # predicted (0: a plain causal LM).
    prefix_len: int = 0
    # The loss through nn.fused_ce (Triton, CUDA): the gradient made in the same pass over the logits as the
    # log-sum-exp, the head's gradient matmuls in the forward. One process or DDP, bf16 or fp32.
    fused_loss: bool = False

    def validate(self) -> None:
        super().validate()
        require(self.z_loss >= 0, "z_loss", f"must be >= 0 (got {self.z_loss})")
        require(self.prefix_len >= 0, "prefix_len", f"must be >= 0 (got {self.prefix_len})")


def hf_mismatch(ours: LMConfig, theirs: LMConfig) -> list[str]:
    """The `model.KEY=VALUE` settings that would make our config compute what a transformers checkpoint's
    config computes (empty when they agree)."""

    def show(value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    keys = ["vocab_size", "n_layer", "n_head", "d_model", "norm", "norm_eps", "mlp", "positions", "bias",
            "tie_embeddings"]
    if theirs.positions == "rope":
        keys.append("rope_theta")
    settings = [f"model.{k}={show(getattr(theirs, k))}" for k in keys if getattr(ours, k) != getattr(theirs, k)]
    if ours.kv_heads != theirs.kv_heads:
        settings.append(f"model.n_kv_heads={theirs.kv_heads}")
    if ours.hidden != theirs.hidden:
        settings.append(f"model.ffn_hidden={theirs.hidden}")
    # Learned positions are a weight of their own; RoPE works at any length up to ours.
    if theirs.positions == "learned" and ours.max_len != theirs.max_len:
        settings.append(f"model.max_len={theirs.max_len}")
    return settings


class LMTask(Task):
    name = "lm"
    TaskConfig = LMTaskConfig
    ModelConfig = LMConfig
    DataConfig = TextDataConfig

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        check_fused_device(cfg, device)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        if vocab < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab} is below the tokenizer's {self.tokenizer.vocab_size} ids "
                              f"(data.tokenizer={cfg.data.tokenizer}): raise it, or 0 to take the tokenizer's")
        # The model section with vocab_size 0 resolved: what the model is built from and exported as.
        self.lm_config = dataclasses.replace(cfg.model, vocab_size=vocab)
        self.valid: list[dict[str, torch.Tensor]] | None = None

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        require_evaluated_metric(cfg.checkpoint.metric, [SPLIT], "valid/loss")
        check_fused_config(cfg)
        if cfg.model.max_len < cfg.data.seq_len:
            raise ConfigError(f"model.max_len={cfg.model.max_len} must be >= data.seq_len={cfg.data.seq_len}")
        if cfg.task.prefix_len >= cfg.data.seq_len:
            raise ConfigError(f"task.prefix_len={cfg.task.prefix_len} must be below data.seq_len={cfg.data.seq_len} "
                              "(the tokens after the prefix are the ones predicted)")

    def build_model(self) -> nn.Module:
        return LM(self.lm_config)

    def train_batches(self) -> TextBatches:
        # The held-out set is read here, before any run directory exists, so an empty one fails first.
        self.valid = self._valid_batches()
        return text_batches(self.cfg.data, self.cfg.train.batch_size, self.device, env_from_environ())

    def _valid_batches(self) -> list[dict[str, torch.Tensor]]:
        if self.valid is None:
            self.valid = eval_batches(self.cfg.data, self.cfg.train.batch_size, self.device)
        return self.valid

    # ------------------------------------------------------------------ loss
    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's labels with the prefix's tokens unscored: the label at position i is token i + 1,
        which a prefix position before the last may already read through the bidirectional prefix."""
        n = self.cfg.task.prefix_len
        if n <= 1:
            return batch["labels"]
        labels = batch["labels"].clone()
        labels[:, : n - 1] = IGNORE
        return labels

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor], **how: bool) -> torch.Tensor:
        """`how`: the model's padded=True (for the loss: every head row, the padded ones at -inf) or hidden=True
        (the final hidden states, for the fused loss)."""
        prefix = self.cfg.task.prefix_len or None
        return model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"], prefix_len=prefix,
                     **how)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cfg.task.fused_loss:
            loss, metrics = linear_cross_entropy(self.logits(model, batch, hidden=True), unwrapped(model).output.weight,
                                                 self.labels(batch), self.lm_config.vocab_size, self.cfg.task.z_loss)
        else:
            loss, metrics = lm_loss(self.logits(model, batch, padded=True), self.labels(batch), self.cfg.task.z_loss)
        return loss, {"ce_loss": metrics["ce_loss"], "z_loss": metrics["z_loss"]}

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.labels(batch) != IGNORE).sum()

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    # ------------------------------------------------------------------ evaluation
    def eval_splits(self) -> list[str]:
        return [SPLIT]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        if split != SPLIT:
            raise ConfigError(f"unknown split {split!r} (the lm task has {SPLIT})")
        nll = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        scored = torch.zeros((), device=self.device)
        for batch in tracked(self._valid_batches(), f"eval {split}"):
            logits = self.logits(model, batch).float()
            labels = self.labels(batch)
            nll += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
            correct += ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
            scored += (labels != IGNORE).sum()
        loss = float(nll / scored.clamp(min=1))
        return {f"{SPLIT}/loss": loss, f"{SPLIT}/perplexity": math.exp(min(loss, 80.0)),
                f"{SPLIT}/token_accuracy": float(correct / scored.clamp(min=1))}

    def flops_per_example(self, model: nn.Module) -> float:
        return forward_flops(self.lm_config, self.cfg.data.seq_len)

    # ------------------------------------------------------------------ generation
    def generate_text(self, model: nn.Module, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
        """The text that follows `prompt` (stopping at end-of-text), sampled with the KV cache."""
        device = next(model.parameters()).device
        ids = torch.tensor(self.tokenizer.encode(prompt), dtype=torch.long, device=device)
        eos = self.tokenizer.eos_id
        new = generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id=eos,
                       prefix=self.cfg.task.prefix_len > 0)
        return self.tokenizer.decode([t for t in new.tolist() if t != eos])

    def predict(self, model: nn.Module, text: str) -> dict[str, str]:
        room = model.cfg.max_len - len(self.tokenizer.encode(text))
        continuation = self.generate_text(model, text, max(1, min(PREDICT_TOKENS, room)))
        return {"prompt": text, "continuation": continuation}

    # ------------------------------------------------------------------ Hugging Face
    def init_from_path(self, model: nn.Module, path: str | Path) -> bool:
        """Load a local transformers Llama or GPT-2 checkpoint directory into `model`; False when `path`
        is not one (no config.json), so the caller may try it as something else."""
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            return False
        theirs, state = load_hf(directory, self.lm_config.vocab_multiple)
        settings = hf_mismatch(self.lm_config, theirs)
        if settings:
            hint = " and data.tokenizer to its tokenizer" if any("vocab_size" in s for s in settings) else ""
            raise CheckpointError(f"{directory} is a different model than the model section: set "
                                  f"{' '.join(settings)}{hint}")
        model.load_state_dict(state)
        return True

    def export(self, model: nn.Module, out: Path, overwrite: bool) -> Path:
        """The model as a transformers checkpoint directory; an HF tokenizer (not bytes) goes alongside."""
        spec = self.cfg.data.tokenizer
        if spec == "bytes":
            return export_hf(model, self.lm_config, out, overwrite=overwrite)
        source = Path(spec).expanduser()
        if source.is_dir():
            return export_hf(model, self.lm_config, out, source, overwrite=overwrite)
        with tempfile.TemporaryDirectory() as tmp:  # a lone tokenizer.json: only it goes alongside
            shutil.copy2(source, Path(tmp) / "tokenizer.json")
            return export_hf(model, self.lm_config, out, tmp, overwrite=overwrite)


TASK = LMTask
