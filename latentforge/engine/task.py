"""The one seam between the engine and an experiment: a Task builds the model, the batches,
the loss and the evaluation. The engine knows nothing else about it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from latentforge.config import Config, TaskConfig
from latentforge.errors import ConfigError


class BatchStream(Protocol):
    """An endless, resumable source of training batches.

    `state_dict()` is saved in every checkpoint; after `load_state_dict()` the stream yields
    exactly the batches it would have yielded had it never stopped.
    """

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(ABC):
    """Base class of every task; subclasses set the three config types and the methods below."""

    name: str = ""
    TaskConfig: type = TaskConfig
    ModelConfig: type
    DataConfig: type

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        # True when the engine builds the model only to load a checkpoint's weights and buffers into it (resume,
        # eval, a loaded run): build_model may then skip fitting anything to the data.
        self.restoring = False

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Cross-section checks that need the whole config; raise ConfigError."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, on the CPU; the engine moves it to the device."""

    @abstractmethod
    def train_batches(self) -> BatchStream:
        """The training stream, batches already on self.device."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss of a batch plus extra scalar metrics (device tensors, read only at log time).

        With train.compile one process compiles this whole method (model and loss fuse), so keep host
        reads (`.item()`, `float(...)`) out of it: each splits the graph and syncs. Call `model(...)`, not
        another of its methods, for the training forward: under DDP/FSDP the engine compiles and wraps the
        model's `forward` only."""

    def loss_weight(self, batch: Any) -> torch.Tensor | float:
        """How much this batch's mean loss weighs when micro-batches are accumulated (e.g. its
        scored tokens), so that accumulation gives the larger batch's loss exactly."""
        return 1.0

    @abstractmethod
    def tokens_in(self, batch: Any) -> int:
        """Tokens (or examples) in a batch, for throughput."""

    @abstractmethod
    def eval_splits(self) -> list[str]:
        """Names accepted by evaluate(); those the task evaluates during training come first."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics named `<split>/<metric>` for one split."""

    def training_eval_splits(self) -> list[str]:
        """The splits evaluated every train.eval_every steps and at the end."""
        return self.eval_splits()[:1]

    def new_stage(self, step: int) -> bool:
        """Whether the training data changes at this step (a curriculum stage), so the stability
        guard judges the losses from here on afresh. A pure function of the step."""
        return False

    def reset_optimizer(self, step: int) -> bool:
        """Whether the optimizer's state (moments, momentum) is cleared before this step, e.g. at
        a curriculum stage boundary. A pure function of the step, so resume stays exact."""
        return False

    def init_from_path(self, model: nn.Module, path: Path) -> bool:
        """Load the weights at `path` (model.init_from, when it names no run) into `model`, e.g. a
        Hugging Face checkpoint directory; False: this task does not load such a path."""
        return False

    def flops_per_example(self, model: nn.Module) -> float | None:
        """Forward FLOPs the model spends on one example at inference (saved in run.json for
        `latentforge compare`); None when the task does not measure it."""
        return None

    def predict(self, model: nn.Module, text: str) -> dict[str, str]:
        """The model's output for one input written as text, as labelled lines to print."""
        raise ConfigError(f"task {self.name!r} has no predict command")

    def figures(self, model: nn.Module) -> dict[str, Any]:
        """Matplotlib figures worth looking at after an evaluation (e.g. inputs beside their
        reconstructions): logged to TensorBoard as images and saved as PNGs in artifacts/."""
        return {}

    def probe(self, model: nn.Module, out: Path, split: str, method: str, examples: int) -> list[dict[str, Any]]:
        """Linear probes on the model's hidden states for the task's latent variables: one row per
        variable (written with a table and a plot under `out`)."""
        raise ConfigError(f"task {self.name!r} has nothing to probe")

    def write_data(self, path: Path) -> dict[str, str]:
        """Write the dataset this config trains on to `path`; returns labelled lines to print."""
        raise ConfigError(f"task {self.name!r} generates its data on the fly; there is no dataset to write")

    def encode(self, model: nn.Module, path: str) -> dict[str, str]:
        """The model's code for one input read from a file, as labelled lines to print."""
        raise ConfigError(f"task {self.name!r} has no encode command")

    def decode(self, model: nn.Module, codes: str) -> dict[str, str]:
        """What the model makes of a code written as text, as labelled lines to print."""
        raise ConfigError(f"task {self.name!r} has no decode command")
