"""The training loop, written once for every task: precision, compile, accumulation, clipping,
the stability guard, evaluation, checkpoints, exact resume, interrupts and logging."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from latentforge.config import Config
from latentforge.engine import clipping, distributed
from latentforge.engine.activation_checkpointing import checkpoint_blocks
from latentforge.engine.async_checkpoint import CheckpointWriter, as_checkpoint_error
from latentforge.engine.attention import attention_context
from latentforge.engine.checkpoint import (
    is_sharded,
    load_checkpoint,
    load_sharded,
    prune_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
    step_dir_name,
)
from latentforge.engine.compile import compiled
from latentforge.engine.device_guard import DeviceGuard, judges_on_device, skips_on_device
from latentforge.engine.ema import PREFIX as EMA_PREFIX
from latentforge.engine.ema import build_ema
from latentforge.engine.freeze import freeze
from latentforge.engine.guard import StabilityGuard
from latentforge.engine.init_from import init_model
from latentforge.engine.optim import build_optimizer, lr_at, reset_optimizer_state
from latentforge.engine.overfit import OverfitStream, check_resume
from latentforge.engine.seed import (
    explain_nondeterministic_ops,
    make_deterministic,
    preserved_rng,
    rng_state,
    seed_everything,
    set_rng_state,
)
from latentforge.engine.signals import PREEMPT_SIGNALS, CatchSignals
from latentforge.engine.step_graph import StepGraph
from latentforge.engine.task import Task
from latentforge.errors import CheckpointError, ConfigError, TrainingStopped
from latentforge.tasks import get_task
from latentforge.track.metrics import MetricsLogger
from latentforge.track.plots import plot_run, save_figure
from latentforge.track.profile import StepProfiler
from latentforge.track.progress import TrainProgress, shown_in
from latentforge.track.remote import Remote, RemoteMirror
from latentforge.track.rundir import FollowerRunDir, RunDir, git_sha
from latentforge.track.runlog import RunLog
from latentforge.track.system import SystemMetrics, host_info
from latentforge.track.wandb_sink import require_wandb

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_distributed(cfg: Config, world_size: int) -> None:
    """What data parallelism needs of a config, checked before anything is built."""
    t = cfg.train
    if t.batch_size % world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} (the global batch) must divide evenly over "
                          f"{world_size} processes")
    if cfg.dist.strategy == "fsdp" and cfg.optim.name == "muon":
        raise ConfigError("optim.name=muon needs whole weight matrices: use dist.strategy=ddp, or optim.name=adamw "
                          "with fsdp")
    if cfg.dist.strategy == "fsdp" and cfg.optim.orthograd:
        raise ConfigError("optim.orthograd=true projects whole weight tensors: use dist.strategy=ddp with it")
    if cfg.dist.strategy == "fsdp" and t.ema_decay > 0:
        raise ConfigError("train.ema_decay keeps a whole copy of the weights: use dist.strategy=ddp with it")
    if cfg.dist.strategy == "fsdp" and t.precision == "fp16":
        raise ConfigError("dist.strategy=fsdp trains in bf16 or fp32 (train.precision=fp16 needs a sharded grad "
                          "scaler)")


def optimizers_of(optimizer: Any) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "optimizers", [optimizer]))


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda or mps (got {name!r})")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is available (use train.device=cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available (use train.device=cpu or auto)")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


@dataclass
class Update:
    """What one optimizer update leaves for the log: device tensors, and the host guard's reason if it skipped."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    metrics: dict[str, torch.Tensor]  # clipping's and the task's, by their logged names
    bad: torch.Tensor | None  # the device guard's verdict (the update was skipped on the device)
    reason: str | None


def build_task_and_model(cfg: Config, device: torch.device,
                         restore_from: Path | None = None) -> tuple[Task, nn.Module]:
    """The task and its model on `device`. `restore_from`: the checkpoint whose weights and buffers will replace
    the model's (Task.restoring; not for a sharded one, which is read into tensors of the model's own sizes)."""
    task = get_task(cfg.task.name)(cfg, device)
    task.restoring = restore_from is not None and not is_sharded(restore_from)
    return task, task.build_model().to(device)


def load_model_state(model: nn.Module, state: dict[str, Any], source: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"checkpoint {source} does not fit this model's config: {first}") from None


def load_weights(model: nn.Module, path: Path, state: dict[str, Any]) -> None:
    """A checkpoint's weights into a single-process model, whether one process wrote them (in
    `state`) or several (in shards)."""
    if not is_sharded(path):
        load_model_state(model, state["model"], path)
        return
    root = distributed.LossModule(model)
    weights = {"model": get_model_state_dict(root)}
    load_sharded(path, weights)
    set_model_state_dict(root, weights["model"])


def evaluate(task: Task, model: nn.Module, splits: list[str], device: torch.device,
             precision: str, progress: TrainProgress | None = None) -> dict[str, float]:
    """Every split's metrics; the task's own bars (`tracked`) show below `progress`'s."""
    was_training = model.training
    metrics: dict[str, float] = {}
    try:
        model.eval()
        with torch.no_grad(), autocast(device, precision), shown_in(progress):
            for split in splits:
                metrics.update(task.evaluate(model, split))
    finally:
        model.train(was_training)
    return metrics


class EvaluationAbandoned(BaseException):
    """A stop request arrived during an evaluation: the run checkpoints without it and evaluates first on resume.
    A BaseException, so that a task's `except Exception` does not swallow it."""


class StopRequest(CatchSignals):
    """Ctrl-C, SIGTERM or a scheduler's SIGUSR1/SIGUSR2 (time nearly up) asks the loop to stop after the
    current step, or at once inside `abandoning_evaluation`; a second Ctrl-C aborts."""

    signals = (signal.SIGINT, signal.SIGTERM, *PREEMPT_SIGNALS)

    def __init__(self):
        super().__init__()
        self.signal_name: str | None = None
        self.abandons_evaluation = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self.abandons_evaluation:
            self.abandons_evaluation = False
            raise EvaluationAbandoned

    @contextlib.contextmanager
    def abandoning_evaluation(self, allowed: bool) -> Iterator[None]:
        """Inside, a stop request (or one already made) raises EvaluationAbandoned: an evaluation can take minutes
        (an autoregressive decoder's greedy decoding), longer than a scheduler waits after its signal. Not
        `allowed` (several processes, which must stop at the same point), the request waits for the step's end."""
        self.abandons_evaluation = allowed
        try:
            if allowed and self.signal_name is not None:
                raise EvaluationAbandoned
            yield
        finally:
            self.abandons_evaluation = False


class Trainer:
    """Builds everything `cfg` needs (from scratch or from a checkpoint directory) before any run
    directory exists, so bad input fails without leaving anything behind; `fit(run)` trains.
    `runs_dir` is where model.init_from looks for a run named by its id."""

    def __init__(self, cfg: Config, quiet: bool = False, resume_from: Path | None = None,
                 runs_dir: str | Path | None = None):
        self.cfg = cfg
        t = cfg.train
        if t.deterministic:
            make_deterministic()
        self.dist, self.device = distributed.setup(resolve_device(t.device), cfg.dist.backend)
        self.quiet = quiet or not self.dist.is_main
        if self.dist.enabled:
            check_distributed(cfg, self.dist.world_size)
        require_wandb(cfg)
        # Checked before any work, so an unusable checkpoint.remote fails before a run directory exists;
        # rank 0 alone uploads.
        self.remote = Remote(cfg.checkpoint.remote) if cfg.checkpoint.remote and self.dist.is_main else None
        self.mirror: RemoteMirror | None = None
        seed_everything(t.seed)
        self.attention = attention_context(t.sdpa_backends, self.device)
        self.task, self.model = build_task_and_model(cfg, self.device, resume_from)
        # Where the weights came from (run.json's init_from), and what a partial load left out.
        self.init_source: dict[str, Any] | None = None
        self.notes: list[str] = []
        if cfg.model.init_from and resume_from is None:
            self.init_source, self.notes = init_model(cfg, self.task, self.model, runs_dir)
        if cfg.model.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.frozen = freeze(self.model, cfg.optim.freeze)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if t.precision == "fp16" else None
        self.batches = self.task.train_batches()
        self.overfit = OverfitStream(self.batches, t.overfit_batches) if t.overfit_batches else None
        if self.overfit is not None:
            self.batches = self.overfit
        self.clipper = clipping.AdaptiveClip(t.clip_adaptive, t.clip_adaptive_beta, t.clip_adaptive_warmup,
                                             t.clip_grad, self.device) if t.clip_adaptive else None
        self.guard = self._build_guard()
        self.ema = build_ema(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.timer: StepProfiler | None = None
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.stop_signal: str | None = None  # the signal that stopped fit() early (a launcher may requeue on it)
        # A stop request abandoned this step's evaluation: the loop runs it before the next step.
        self.eval_pending = False
        self.window = self._empty_window()
        # DDP or FSDP around the task's loss, when there are several processes (restoring reads it).
        self.loss_module: nn.Module | None = None
        if resume_from is not None:
            self._restore(resume_from)
            if self.step > t.steps:
                raise ConfigError(f"train.steps={t.steps} is below the checkpoint's step {self.step}")
        # Measured here, before any run directory exists, so a failure leaves nothing behind.
        self.flops_per_example = self.task.flops_per_example(self.model) if self.step == 0 else None
        # train.compile: one process compiles the task's whole loss, so the model's last layer and the loss
        # fuse (a cross-entropy never materialises float32 logits); under DDP/FSDP the model alone is compiled.
        self.compiled_loss = (compiled(distributed.LossModule(self.model, self.task), t.compile_mode, t.compile_options)
                              if t.compile and not self.dist.enabled else None)
        if self.dist.enabled:
            self._wrap(resume_from)
        self.step_graph = self._build_step_graph()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Fused AdamW divides each gradient by its `grad_scale` inside its own kernel: given the clipping's
        # factor there, the step needs no separate pass that scales every gradient (0.28 ms of GPT-2's step
        # on an H200, docs/benchmarks.md). fp16's grad scaler owns that slot, and FSDP's sharded gradients
        # keep torch's clipping. The groups' own flag counts: a restored state keeps the one it was saved with
        # (a run of several CPU processes saves foreach AdamW's).
        self.clip_in_optimizer = (t.clip_grad > 0 and self.clipper is None and self.scaler is None
                                  and type(self.optimizer) is torch.optim.AdamW
                                  and all(g.get("fused") for g in self.optimizer.param_groups)
                                  and not any(isinstance(p, DTensor) for p in self.params))
        # checkpoint.async_save: one process writes its checkpoints in the background (shards stay synchronous).
        self.writer = CheckpointWriter(self.device) if cfg.checkpoint.async_save and not self.dist.enabled else None

    def _wrap(self, resume_from: Path | None) -> None:
        """DDP or FSDP around the task's loss; FSDP replaces the parameters, so the optimizer is
        rebuilt over the shards and given the state it had (a checkpoint's, or none)."""
        plain = distributed.LossModule(self.model)
        fsdp = self.cfg.dist.strategy == "fsdp"
        full_state = None
        if fsdp and resume_from is not None and not is_sharded(resume_from):
            full_state = get_optimizer_state_dict(plain, optimizers_of(self.optimizer),
                                                  options=StateDictOptions(full_state_dict=True))
        t = self.cfg.train
        model = compiled(self.model, t.compile_mode, t.compile_options) if t.compile else self.model
        self.loss_module = distributed.wrap(distributed.LossModule(model, self.task),
                                            self.cfg.dist.strategy, self.device)
        if fsdp:
            self.optimizer = build_optimizer(self.model, self.cfg.optim, self.device)
            if full_state is not None:
                set_optimizer_state_dict(self._state_root(), optimizers_of(self.optimizer), full_state,
                                         options=StateDictOptions(full_state_dict=True))
        if resume_from is not None and is_sharded(resume_from):
            self._restore_sharded(resume_from)

    def _build_guard(self) -> StabilityGuard | DeviceGuard:
        """On the device (no sync per step) where the optimizer can skip a step there."""
        t = self.cfg.train
        on_device = t.guard.enabled and judges_on_device(optimizers_of(self.optimizer), self.scaler, t.ema_decay,
                                                         self.dist.enabled)
        return DeviceGuard(t.guard, self.device, t.log_every, t.compile) if on_device else StabilityGuard(t.guard)

    def _build_step_graph(self) -> StepGraph | None:
        """train.cuda_graph: the update recorded as one CUDA graph, where nothing in it needs the host."""
        t = self.cfg.train
        if not t.cuda_graph:
            return None
        device_step = all(skips_on_device(o) for o in optimizers_of(self.optimizer))
        needs = [(self.device.type == "cuda", "a CUDA device"), (not self.dist.enabled, "one process"),
                 (t.grad_accum == 1, "train.grad_accum=1"), (device_step, "optim.name=adamw or muon"),
                 (self.scaler is None, "train.precision bf16 or fp32"), (self.ema is None, "train.ema_decay=0"),
                 (self.clipper is None, "train.clip_adaptive=0")]
        missing = [what for ok, what in needs if not ok]
        if missing:
            raise ConfigError(f"train.cuda_graph=true needs {', '.join(missing)}")
        return StepGraph(lambda batch: self._update([batch]), optimizers_of(self.optimizer), self.device)

    def _state_root(self) -> nn.Module:
        """The module whose state-dict keys name the checkpoint's shards (`model.<param>`)."""
        return self.loss_module if self.loss_module is not None else distributed.LossModule(self.model)

    # ------------------------------------------------------------------ state
    def _empty_window(self) -> dict[str, Any]:
        """Device-side sums of the metrics since the last log (read only every log_every steps). "seconds": its
        wall time, once it is due and waits for its step's evaluation (logged after it, or after the resumed one)."""
        return {"sums": {}, "steps": 0, "tokens": 0, "seconds": None}

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model and optimizer when those are saved in shards."""
        weights = {} if self.dist.enabled else {"model": self.model.state_dict(),
                                                "optimizer": self.optimizer.state_dict()}
        return {
            **weights,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "rng": rng_state(),
            "data": self.batches.state_dict(),
            "guard": self.guard.state_dict(),
            "best": self.best,
            "eval_pending": self.eval_pending,
            "window": {"sums": {k: v.detach().cpu() for k, v in self.window["sums"].items()},
                       "steps": self.window["steps"], "tokens": self.window["tokens"],
                       "seconds": self.window["seconds"]},
            "lr": self.optimizer.param_groups[0]["lr"],
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "clip": self.clipper.state_dict() if self.clipper is not None else None,
            "config": self.cfg.to_dict(),
        }

    def _sharded_state(self) -> dict[str, Any]:
        model, optimizer = get_state_dict(self._state_root(), optimizers_of(self.optimizer))
        return {"model": model, "optimizer": optimizer}

    def _restore_sharded(self, path: Path) -> None:
        state = self._sharded_state()
        load_sharded(path, state)
        try:
            set_state_dict(self._state_root(), optimizers_of(self.optimizer), model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model's config: "
                                  f"{str(e).splitlines()[0]}") from None

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        if is_sharded(path):
            if not self.dist.enabled:
                self._restore_sharded(path)
        else:
            load_model_state(self.model, state["model"], path)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {path} optimizer state does not fit: {e}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        check_resume(self.cfg.train.overfit_batches, state["data"])
        self.batches.load_state_dict(state["data"])
        self.guard = self._build_guard()  # the checkpoint's optimizer groups say whether they are fused
        self.guard.load_state_dict(state["guard"])
        self.best = state["best"]
        self.eval_pending = bool(state.get("eval_pending", False))
        w = state["window"]
        self.window = {"sums": {k: v.to(self.device) for k, v in w["sums"].items()},
                       "steps": w["steps"], "tokens": w["tokens"], "seconds": w.get("seconds")}
        if self.ema is not None and state.get("ema") is not None:
            # A checkpoint without one (EMA turned on at resume) starts the average afresh.
            self.ema.load_state_dict(state["ema"])
        if self.clipper is not None and state.get("clip") is not None:
            # A checkpoint without one (clip_adaptive turned on at resume) warms the average up afresh.
            self.clipper.load_state_dict(state["clip"])
        set_rng_state(state["rng"])

    def save(self, kind: str) -> Path:
        """Checkpoint this step. With the background writer only the snapshot blocks training, except
        after the saves training does not simply go on from (final, interrupt, emergency): those wait
        until the checkpoint is on disk. The blocked seconds are logged (checkpoint/blocked_s)."""
        start = time.perf_counter()
        protected = {self.best["step"]} if self.best else set()
        meta = {"best": copy.deepcopy(self.best), "world_size": self.dist.world_size}
        if self.writer is not None:
            self._wait_for_writer()
            self.writer.save(self.state_dict(), functools.partial(self._write, self.step, kind, meta, protected))
            if kind in ("final", "interrupt", "emergency"):
                self._wait_for_writer()
        else:
            sharded = self._sharded_state() if self.dist.enabled else None
            self._write(self.step, kind, meta, protected, self.state_dict(), sharded)
        blocked = time.perf_counter() - start
        self.log.write(f"checkpoint of step {self.step} ({kind}): training blocked {blocked:.3f} s")
        if kind in ("periodic", "best", "emergency") and self.dist.is_main:  # saves that training goes on after
            self.logger.log(self.step, {"checkpoint/blocked_s": blocked})
        return self.run.checkpoints / step_dir_name(self.step)

    def _write(self, step: int, kind: str, meta: dict[str, Any], protected: set[int], state: dict[str, Any],
               sharded: dict[str, Any] | None = None) -> None:
        """Everything a save does on disk; on the writer thread when saving in the background."""
        try:
            path = save_checkpoint(self.run.checkpoints, step, state, kind, meta, sharded, self.dist)
            if self.dist.is_main:
                prune_checkpoints(self.run.checkpoints, self.cfg.checkpoint.keep, protected)
        except OSError as e:
            raise as_checkpoint_error(e, f"the checkpoint of step {step}") from None
        if self.dist.is_main:
            self.logger.log_checkpoint(path, step, best=step in protected)
        if self.mirror is not None:
            self.mirror.sync(protected)
        distributed.barrier(self.dist)

    def _wait_for_writer(self) -> None:
        if self.writer is not None and (seconds := self.writer.wait()) is not None:
            self.log.write(f"checkpoint written in the background in {seconds:.3f} s")

    # ------------------------------------------------------------------ one step
    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        sums = self.window["sums"]
        sums[name] = sums[name] + value.detach().float() if name in sums else value.detach().float().clone()

    def train_step(self) -> str | None:
        """One optimizer update over grad_accum micro-batches; returns why it was skipped, if it was."""
        t = self.cfg.train
        if self.task.new_stage(self.step):
            # The data changes here (a curriculum stage): the loss level may jump, legitimately.
            self.guard.rebaseline()
        if self.task.reset_optimizer(self.step):
            reset_optimizer_state(self.optimizer)
            if self.step_graph is not None:
                self.step_graph.reset()
        lr = lr_at(self.step, self.cfg.optim, t.steps) * self.guard.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [distributed.shard(self.batches.next_batch(), t.batch_size, self.dist)
                         for _ in range(t.grad_accum)]
        if self.timer is not None:
            self.timer.lap("data")
        if isinstance(self.guard, DeviceGuard):
            self.guard.make_room()
        if self.step_graph is not None and self.timer is None:
            # The guard's rows buffer is replaced when it grows: a graph that writes into it is then stale.
            context = (self.guard.records.data_ptr(),) if isinstance(self.guard, DeviceGuard) else ()
            update = self.step_graph(micro_batches[0], lr, context)
        else:
            update = self._update(micro_batches)
        if isinstance(self.guard, DeviceGuard):
            self.guard.note(self.step + 1)
        self.step += 1
        if update.reason is None:
            # A step the device guard skipped adds zeros; it is taken off the step count when the guard is read.
            bad = update.bad
            keep = (lambda v: v) if bad is None else (lambda v: torch.where(bad, 0.0, v))
            self._accumulate("train/loss", keep(update.loss))
            self._accumulate("train/grad_norm", keep(update.grad_norm))
            for k, v in update.metrics.items():
                self._accumulate(k, keep(v))
            self.window["steps"] += 1
        self.window["tokens"] += sum(self.task.tokens_in(b) for b in micro_batches)
        self.last_lr = lr
        return update.reason

    def _update(self, micro_batches: list[Any]) -> Update:
        """Forward, backward, clipping, the guard's verdict and the optimizer step over the micro-batches:
        what train.cuda_graph records. With the device guard (or none) nothing here waits for the GPU."""
        t = self.cfg.train
        loss_sum = torch.zeros((), device=self.device)
        extras: dict[str, torch.Tensor] = {}
        weights = [self.task.loss_weight(b) for b in micro_batches]
        total_weight = sum(weights)
        if self.dist.enabled:
            # Shares of the global batch; DDP and FSDP average the ranks' gradients, hence world_size.
            total_weight = distributed.all_reduce_sum(torch.as_tensor(total_weight, dtype=torch.float32,
                                                                      device=self.device), self.dist)
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            share = weight / total_weight
            with self.attention():
                with autocast(self.device, t.precision), self._gradient_sync(i == len(micro_batches) - 1):
                    loss, metrics = self._loss(batch)
                scaled = loss * share * self.dist.world_size
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float() * share
            for k, v in metrics.items():
                extras[k] = extras.get(k, 0) + v.detach().float() * share
        if self.timer is not None:
            self.timer.lap("forward_backward")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip_metrics: dict[str, torch.Tensor] = {}
        if self.clipper is not None:
            grad_norm, clip_metrics = self.clipper.clip_(self.params)
        elif self.clip_in_optimizer:
            # clip_grad_norm_'s factor, min(1, clip_grad / (norm + 1e-6)), as the divisor fused AdamW applies.
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            self.optimizer.grad_scale = ((grad_norm.float() + 1e-6) / t.clip_grad).clamp(min=1.0)
        else:
            max_norm = t.clip_grad if t.clip_grad > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
        if self.dist.enabled:
            loss_sum = distributed.all_reduce_sum(loss_sum, self.dist)

        reason, bad = None, None
        if isinstance(self.guard, DeviceGuard):
            bad = self.guard.judge_on_device(loss_sum, grad_norm)
            for o in optimizers_of(self.optimizer):
                o.found_inf = bad.float()  # fused AdamW and BatchedMuon skip the update on the device
        elif t.guard.enabled:
            loss_value = float(loss_sum)
            # Under fp16 the grad scaler already skips overflowing steps by itself.
            norm_value = float(grad_norm) if self.scaler is None else None
            reason = self.guard.judge(loss_value, norm_value)
            if self.guard.record(loss_value, reason):
                reason = f"{reason}; {t.guard.max_bad_steps} spikes in a row: taken as the new loss level"
        if self.clipper is not None and (reason is not None or bad is not None):
            self.clipper.revert(bad if bad is not None else True)
        if reason is None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.timer is not None:
            self.timer.lap("optimizer")
        metrics = {**clip_metrics, **{f"train/{k}": v for k, v in extras.items()}}
        return Update(loss_sum, grad_norm, metrics, bad, reason)

    def _loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.loss_module is not None:
            return self.loss_module(batch)
        if self.compiled_loss is not None:
            return self.compiled_loss(batch)
        return self.task.loss(self.model, batch)

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Ranks exchange gradients on the last micro-batch of an accumulated step only."""
        if self.loss_module is None or last:
            return contextlib.nullcontext()
        return distributed.no_gradient_sync(self.loss_module)

    def _stops_agreed(self, stop: StopRequest) -> tuple[bool, bool]:
        """Whether any rank was asked to stop, and whether train.time_limit is reached on any rank's clock:
        all ranks must end at the same step (one all-reduce for both)."""
        limit = self.cfg.train.time_limit
        asked, up = stop.signal_name is not None, bool(limit) and self._train_seconds() >= limit
        if not self.dist.enabled:
            return asked, up
        flags = torch.tensor([float(asked), float(up)], device=self.device)
        asked, up = (v > 0 for v in distributed.all_reduce_sum(flags, self.dist).tolist())
        if asked:
            stop.signal_name = stop.signal_name or "SIGTERM"
        return asked, up

    # ------------------------------------------------------------------ the loop
    def fit(self, run: RunDir) -> str:
        """Train to train.steps; returns the final status (finished or interrupted). With checkpoint.remote
        the run directory is uploaded in the background, and all of it is remote when this returns."""
        if self.remote is not None:
            self.mirror = RemoteMirror(self.remote, run, self.cfg.checkpoint.keep, fresh=self.step == 0,
                                       quiet=self.quiet)
        self.log = RunLog(run.path, self.dist.rank)
        self.log.write(f"{'resumed' if self.step else 'started'} run {run.id} at step {self.step} "
                       f"(host {RunDir.host()}, pid {os.getpid()}, rank {self.dist.rank})")
        try:
            with self.log.warnings(), explain_nondeterministic_ops():
                status = self._fit(run)
            distributed.finish(self.dist)
            self.log.write(f"{status} at step {self.step}")
            return status
        except BaseException as e:
            self.log.failure(e)
            raise
        finally:
            self.log.close()
            if self.mirror is not None:
                self.mirror.close()

    def _fit(self, run: RunDir) -> str:
        self.run = run if self.dist.is_main else FollowerRunDir(run.path)
        t, c = self.cfg.train, self.cfg.checkpoint
        logger = self.logger = MetricsLogger(self.run, self.cfg, resume_step=self.step if self.step > 0 else None,
                                             writes=self.dist.is_main)
        if self.step > 0:
            self.run.truncate_metrics(self.step)
        n_params = sum(p.numel() for p in self.model.parameters())
        info = self.run.info()
        info.update(status="running", host=self.run.host(), pid=os.getpid(), device=str(self.device),
                    world_size=self.dist.world_size, params=n_params, total_steps=t.steps, step=self.step,
                    best=self.best, git_sha=git_sha(),
                    torch=torch.__version__, python=sys.version.split()[0], ended=None, error=None, stopped_by=None,
                    **host_info(self.device))
        info.setdefault("started", time.time())
        if self.step == 0:
            info["flops_per_example"] = self.flops_per_example
            if self.init_source is not None:
                info["init_from"] = self.init_source
        # Wall time spent training, summed over resumes (what `compare` reports).
        self.seconds_before = float(info.get("train_seconds", 0.0))
        self.fit_start = time.perf_counter()
        if self.step > 0:
            info.setdefault("resumed", []).append({"step": self.step, "time": time.time()})
        self.run.write_info(info)
        # Per device: train.batch_size is the global batch, split over the ranks.
        self.system = SystemMetrics(self.device, t.precision, t.batch_size * t.grad_accum // self.dist.world_size,
                                    self.step, info.get("flops_per_example"))

        progress = TrainProgress(t.steps, self.step, enabled=not self.quiet, log=self.log)
        for note in self.notes:
            progress.print(note)
        if self.frozen:
            progress.print(f"optim.freeze: {self.frozen:,} of {n_params:,} parameters frozen")
            self.run.update_info(frozen_params=self.frozen)
        self.last_lr = lr_at(self.step, self.cfg.optim, t.steps)
        status, stopped_by = "finished", None
        if self.dist.is_main:
            remove_stale_temporaries(self.run.checkpoints)
        profiles = t.profile and self.dist.is_main
        self.timer = StepProfiler(self.run, t.profile, self.device, self.step, t.profile_sources) if profiles else None
        try:
            with StopRequest() as stop:
                clock = time.perf_counter()
                while self.step < t.steps or self.eval_pending:
                    # A resumed run whose evaluation a stop request abandoned runs it before the next step.
                    resumes_evaluation = self.eval_pending
                    if not resumes_evaluation:
                        if self.timer is not None:
                            self.timer.begin_step()
                        reason = self.train_step()
                        if reason is not None:
                            self._on_bad_step(reason, logger, progress)
                    done = self.step >= t.steps
                    asked, time_up = (False, False) if done else self._stops_agreed(stop)
                    if time_up:
                        done, stopped_by = True, "time_limit"
                        progress.print(f"train.time_limit={t.time_limit:g} s reached at step {self.step}: "
                                       f"evaluating and saving as the last step")
                    if not resumes_evaluation and (self.step % t.log_every == 0 or done):
                        self._read_device_guard(logger, progress)
                        self.window["seconds"] = time.perf_counter() - clock
                        clock = time.perf_counter()
                    metrics = None
                    if (t.eval_every and self.step % t.eval_every == 0) or done or resumes_evaluation:
                        try:
                            metrics = self._evaluation_metrics(progress, stop)
                            self.eval_pending = False
                        except EvaluationAbandoned:
                            self.eval_pending, asked, done, stopped_by = True, True, False, None
                            torch.set_grad_enabled(True)
                            self.model.train()
                            progress.print(f"{stop.signal_name}: the evaluation of step {self.step} is abandoned; "
                                           f"a resumed run evaluates it first")
                    # The step's window waits for its evaluation: a record W&B has taken at a step is its last there.
                    if self.window["seconds"] is not None and not self.eval_pending:
                        self._log_window(logger, progress)
                    saved = False
                    if metrics is not None:
                        saved = self._record_evaluation(metrics, logger, progress, last=done)
                        clock = time.perf_counter()
                        if not done:  # a stop request made while it ran stops the run now, not a step later
                            asked = self._stops_agreed(stop)[0]
                    if not saved and not self.eval_pending and ((c.every and self.step % c.every == 0) or done):
                        self.save("final" if done else "periodic")
                        clock = time.perf_counter()
                    if not resumes_evaluation and self.timer is not None and (where := self.timer.end_step(self.step)):
                        progress.print(where)
                        self.timer = None
                    if done:
                        break
                    if asked:
                        self.save("interrupt")
                        progress.print(f"{stop.signal_name}: checkpoint saved at step {self.step}; "
                                       f"continue with: latentforge resume {self.run.path}")
                        status = "interrupted"
                        self.stop_signal = stop.signal_name
                        break
                self._wait_for_writer()
        except KeyboardInterrupt:
            self.run.update_info(status="interrupted", ended=time.time(), step=self.step)
            raise
        except TrainingStopped as e:
            self.run.update_info(status="failed", ended=time.time(), step=self.step, error=str(e))
            raise
        except BaseException as e:
            self.run.update_info(status="failed", ended=time.time(), step=self.step,
                                 error=f"{type(e).__name__}: {e}")
            raise
        finally:
            if self.writer is not None and sys.exc_info()[0] is not None:
                # Training failed: the checkpoint in flight is still finished; the first error is the one raised.
                with contextlib.suppress(Exception):
                    self.writer.wait()
            if self.timer is not None:  # training ended inside the profiled window
                progress.print(self.timer.finish())
                self.timer = None
            progress.close()
            logger.close(failed=sys.exc_info()[0] is not None)
        self.run.update_info(status=status, ended=time.time(), step=self.step, train_seconds=self._train_seconds(),
                             stopped_by=stopped_by)
        if not self.dist.is_main:
            return status
        try:
            plot_run(self.run)
        except Exception as e:  # whatever matplotlib raises: the run is complete and its metrics are safe
            progress.print(f"warning: could not draw the plots in {self.run.artifacts}: {type(e).__name__}: {e}")
        return status

    def _train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.fit_start

    def _log_window(self, logger: MetricsLogger, progress: TrainProgress) -> None:
        if self.dist.enabled:
            self._reduce_window()
        w = self.window
        elapsed = w["seconds"]
        # No good step in the window (all skipped by the guard): no train metrics.
        metrics = {k: float(v) / w["steps"] for k, v in w["sums"].items()} if w["steps"] > 0 else {}
        metrics["train/lr"] = self.last_lr
        metrics["train/tokens_per_s"] = w["tokens"] / max(elapsed, 1e-9)
        metrics["train/bad_steps"] = float(self.guard.bad_total)
        metrics.update(self.system.window(self.step, elapsed))
        logger.log(self.step, metrics)
        self.window = self._empty_window()
        if "train/loss" in metrics:
            self.run.update_info(step=self.step, last_loss=metrics["train/loss"], train_seconds=self._train_seconds())
        progress.update(self.step, f"loss {metrics.get('train/loss', float('nan')):.4f}  lr {self.last_lr:.2e}  "
                                   f"{metrics['train/tokens_per_s']:,.0f} tok/s")

    def _reduce_window(self) -> None:
        """Sum the ranks' shares of the per-step metrics, and their tokens (the loss and the
        gradient norm are global already)."""
        w = self.window
        keys = sorted(k for k in w["sums"] if k not in ("train/loss", "train/grad_norm", *clipping.METRICS))
        packed = torch.stack([w["sums"][k].float() for k in keys]
                             + [torch.tensor(float(w["tokens"]), device=self.device)])
        distributed.all_reduce_sum(packed, self.dist)
        for k, value in zip(keys, packed[:-1]):
            w["sums"][k] = value
        # Per device, like the other throughputs.
        w["tokens"] = int(packed[-1].item()) // self.dist.world_size

    def _evaluation_metrics(self, progress: TrainProgress, stop: StopRequest) -> dict[str, float]:
        """This step's evaluation. A stop request abandons it (EvaluationAbandoned), one process only. The random
        generators (python, numpy, torch's CPU and CUDA ones) come out as they went in, so evaluating, abandoned
        or not, never changes what training draws next."""
        splits = self.task.training_eval_splits()
        with preserved_rng(), stop.abandoning_evaluation(not self.dist.enabled):
            with distributed.gathered(self.loss_module):
                metrics = evaluate(self.task, self.model, splits, self.device, self.cfg.train.precision, progress)
                if self.overfit is not None:
                    metrics.update(self.overfit.evaluate(self.task, self.model,
                                                         autocast(self.device, self.cfg.train.precision)))
            if self.ema is not None:
                ema = evaluate(self.task, self.ema.module, splits, self.device, self.cfg.train.precision, progress)
                metrics.update({EMA_PREFIX + k: v for k, v in ema.items()})
        return metrics

    def _record_evaluation(self, metrics: dict[str, float], logger: MetricsLogger, progress: TrainProgress,
                           last: bool) -> bool:
        """Log an evaluation, draw the figures, track the best checkpoint; returns whether a checkpoint was saved.
        `last`: the run ends at this step (train.steps or train.time_limit reached)."""
        # Every rank evaluates the same data; rank 0's numbers decide, so all save together.
        metrics = distributed.broadcast(metrics, self.dist)
        logger.log(self.step, metrics)
        logger.flush()
        headline = {k: v for k, v in metrics.items() if k.count("/") == 1 and not k.endswith("/examples")}
        progress.print(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in headline.items()))
        self.run.update_info(last_eval={"step": self.step, **metrics})
        with preserved_rng():
            self._figures(logger, progress, last)
        c = self.cfg.checkpoint
        if not c.metric:
            return False
        if c.metric not in metrics:
            progress.print(f"warning: checkpoint.metric {c.metric!r} is not among the eval metrics "
                           f"({', '.join(sorted(headline))}); no best checkpoint is tracked")
            return False
        value = metrics[c.metric]
        better = self.best is None or (value > self.best["value"] if c.mode == "max" else value < self.best["value"])
        if better and math.isfinite(value):
            self.best = {"metric": c.metric, "value": value, "step": self.step}
            self.run.update_info(best=self.best)
            self.save("final" if last else "best")
            return True
        return False

    def _figures(self, logger: MetricsLogger, progress: TrainProgress, last: bool) -> None:
        """The task's figures every track.figures_every evaluations and at the end."""
        every, t = self.cfg.track.figures_every, self.cfg.train
        evaluation = self.step // t.eval_every if t.eval_every else 0
        if not every or (not last and evaluation % every):
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device, t.precision), distributed.gathered(self.loss_module):
                figures = self.task.figures(self.model)
        finally:
            self.model.train(was_training)
        if not self.dist.is_main:
            return
        self.run.artifacts.mkdir(exist_ok=True)
        for tag, figure in figures.items():
            logger.add_figure(tag, figure, self.step)
            try:
                save_figure(figure, self.run.artifacts / f"{tag}-step{self.step:08d}.png")
            except OSError as e:
                progress.print(f"warning: could not save the {tag} figure: {e}")

    def _read_device_guard(self, logger: MetricsLogger, progress: TrainProgress) -> None:
        """The device guard's bad steps since the last read, handled as the host guard handles them when
        they happen; their zeros leave the metric window's step count."""
        if isinstance(self.guard, DeviceGuard):
            for bad in self.guard.read():
                self.window["steps"] -= 1
                self._on_bad_step(bad.reason, logger, progress, bad.step, bad.streak)

    def _on_bad_step(self, reason: str, logger: MetricsLogger, progress: TrainProgress, step: int | None = None,
                     streak: int | None = None) -> None:
        g = self.guard
        step = self.step if step is None else step
        streak = g.bad_streak if streak is None else streak
        logger.log(step, {"guard/bad_step": 1.0, "guard/lr_scale": g.cfg.lr_factor})
        events = self.run.info().get("guard_events", [])
        events.append({"step": step, "reason": reason})
        self.run.update_info(guard_events=events[-100:])
        progress.print(f"step {step}: skipped update, {reason}; LR x{g.cfg.lr_factor} "
                       f"for {g.cfg.cooldown} steps")
        if streak == 1:
            self.save("emergency")
        if streak >= g.cfg.max_bad_steps:
            raise TrainingStopped(f"training stopped at step {step}: {streak} bad steps in a row "
                                  f"(last: {reason}); lower optim.lr or raise train.guard.max_bad_steps")
