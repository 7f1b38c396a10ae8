"""AdamW (or Muon + AdamW) with decay on weight matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from latentforge.config import OptimConfig
from latentforge.engine.muon import BatchedMuon
from latentforge.engine.orthograd import OrthoGrad


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}


def _hidden_matrix_ids(model: nn.Module) -> set[int]:
    """Weights of the linear layers inside the network: not the output head (a module named
    `head`, tied or not), not one-output readouts such as probes, not embeddings or raw parameters."""
    embeddings = _embedding_ids(model)
    return {id(m.weight) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] != "head" and min(m.weight.shape) > 1
            and id(m.weight) not in embeddings}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on >= 2-D weights; never on biases or norm gains; on embeddings if asked."""
    embedding_params = _embedding_ids(model)
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_params
        (decay if p.dim() >= 2 and (cfg.decay_embeddings or not is_embedding) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class OptimizerGroup:
    """Several optimizers stepped as one (Muon for hidden matrices, AdamW for the rest); it has
    the parts of the Optimizer interface the loop and the grad scaler use."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure: None = None) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("optimizers", [])) != len(self.optimizers):
            raise ValueError("the checkpoint was written with another optimizer (optim.name)")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device):
    optimizer = _build_optimizer(model, cfg, device)
    return OrthoGrad(optimizer) if cfg.orthograd else optimizer


def _build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device):
    groups = param_groups(model, cfg)
    # Fused: one kernel per step, and it can skip a step on the device (engine/device_guard.py). The CPU
    # kernel does not take FSDP's sharded parameters, so several CPU processes keep the foreach one.
    fused = device.type == "cuda" or (device.type == "cpu" and not torch.distributed.is_initialized())
    adamw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **adamw)
    # Muon orthogonalises the updates of hidden weight matrices; embeddings, the output head,
    # readouts, biases and norms stay with AdamW. Its LR is scaled to match AdamW's update size,
    # so one optim.lr serves both.
    hidden_ids = _hidden_matrix_ids(model)
    hidden = [p for p in groups[0]["params"] if id(p) in hidden_ids]
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden_ids]} for g in groups]
    muon = BatchedMuon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                            adjust_lr_fn="match_rms_adamw")
    return OptimizerGroup([muon, torch.optim.AdamW(rest, **adamw)])


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for the update that takes the model from `step` to `step + 1`."""
    warmup = cfg.warmup_steps(total_steps)
    if cfg.schedule == "noam":
        # Linear warmup, then inverse square root decay from the peak; min_lr is a floor.
        w = max(warmup, 1)
        s = step + 1
        return max(cfg.lr * min(s / w, math.sqrt(w / s)), cfg.min_lr)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = total_steps - max(1, round(cfg.decay_frac * total_steps))
        if step < max(decay_start, warmup):
            return cfg.lr
        progress = (step - max(decay_start, warmup) + 1) / max(1, total_steps - max(decay_start, warmup))
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(progress, 1.0)
    progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    # cosine
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def reset_optimizer_state(optimizer: torch.optim.Optimizer | OptimizerGroup) -> None:
    """Forget moments and momentum (a fresh optimizer over the same parameters and groups)."""
    for o in getattr(optimizer, "optimizers", [optimizer]):
        o.state.clear()
