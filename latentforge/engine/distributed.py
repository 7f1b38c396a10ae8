"""Data parallelism over the processes torchrun (or Slurm through submitit) starts, one per device.

`train.batch_size` is the global batch of one micro-step: every rank builds that batch from its
index (the training streams are pure functions of the index) and trains on its own disjoint slice.
So N ranks see exactly the data one rank would see with the same config, the losses agree to float
tolerance, and a checkpoint saved by N ranks resumes on M.

The model is wrapped together with the task's loss (`LossModule`), so a task may call any method
of its model in `loss` (generate, ...) and DDP/FSDP still see one forward.
"""

from __future__ import annotations

import atexit
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentforge.errors import ConfigError, LatentforgeError, RunError


@dataclass(frozen=True)
class DistEnv:
    """This process's place among the training processes (torchrun's RANK/LOCAL_RANK/WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environ() -> DistEnv:
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                       int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError:
        raise ConfigError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None


# Whether setup() created the process group (a caller's own group is left to its caller).
_joined_here = False


def setup(device: torch.device, backend: str) -> tuple[DistEnv, torch.device]:
    """Join the process group when started by torchrun; returns this rank's env and device."""
    global _joined_here
    env = env_from_environ()
    if not env.enabled:
        return env, device
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("dist.backend=nccl needs CUDA GPUs (use gloo on the CPU)")
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        _joined_here = True
        atexit.register(teardown)
    return env, device


def teardown() -> None:
    if _joined_here and dist.is_initialized():
        dist.destroy_process_group()


def finish(env: DistEnv) -> None:
    """End a run that every rank finished: the ranks wait for each other, then leave the process group
    together. A rank that tore gloo down while its peer was still writing plots was seen to abort
    (SIGABRT) at exit, failing a finished run."""
    if env.enabled and _joined_here and dist.is_initialized():
        dist.barrier()
        teardown()


class LossModule(nn.Module):
    """The task's loss as one module: what DDP and FSDP wrap, and the root of checkpoint keys."""

    def __init__(self, model: nn.Module, task: Any = None):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.task.loss(self.model, batch)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks: every module of every nn.ModuleList (what FSDP shards one by one and
    activation checkpointing recomputes one by one), outer ones first."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def wrap(step: LossModule, strategy: str, device: torch.device) -> nn.Module:
    """DDP around the loss module, or FSDP2: every module of a ModuleList (the blocks) sharded on
    its own, the rest with the root."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Tasks may leave parameters unused in some steps (curricula, probes): DDP must not wait for them.
        return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for block in blocks(step.model):
        fully_shard(block)
    fully_shard(step)
    return step


def _fsdp_modules(step: nn.Module | None) -> list[Any]:
    if step is None:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in step.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(step: nn.Module | None) -> Iterator[None]:
    """FSDP's parameters whole for the length of the block, for code that runs the model outside
    the loss module's forward (evaluation, figures); nothing to do for DDP or one process."""
    modules = _fsdp_modules(step)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()


@contextmanager
def no_gradient_sync(step: nn.Module) -> Iterator[None]:
    """Backward without the gradient exchange (every micro-batch of an accumulated step but the last)."""
    if isinstance(step, nn.parallel.DistributedDataParallel):
        with step.no_sync():
            yield
        return
    modules = _fsdp_modules(step)
    for module in modules:
        module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True)


def shard(batch: Any, size: int, env: DistEnv) -> Any:
    """This rank's slice of a global batch: every tensor whose first dimension is the batch size
    is cut; everything else (scalars, metadata) is kept as is."""
    if not env.enabled:
        return batch
    per_rank = size // env.world_size
    start = env.rank * per_rank
    if isinstance(batch, torch.Tensor):
        return batch[start:start + per_rank] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, dict):
        return {k: shard(v, size, env) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(shard(v, size, env) for v in batch)
    if hasattr(batch, "_fields"):
        return type(batch)(*(shard(v, size, env) for v in batch))
    return batch


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast(value: Any, env: DistEnv) -> Any:
    """Rank 0's value on every rank (decisions that must agree: run paths, saves, errors)."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def on_main(env: DistEnv, action: Callable[[], Any]) -> Any:
    """Run `action` on rank 0 only (creating the run directory, say) and give its result, or the
    error it raised, to every rank."""
    result, error = None, None
    if env.is_main:
        try:
            result = action()
        except LatentforgeError as e:
            error = e
    result, error = broadcast((result, error), env)
    if error is not None:
        raise error
    return result


# Set for the workers that `run_torchrun` starts: their parent reports the run at the end.
LAUNCHED = "LATENTFORGE_LAUNCHED_WORKER"


def reports_run() -> bool:
    """Whether this process prints the run's summary: one process alone, rank 0 of a torchrun the
    user started, or the process that started torchrun for `dist.nproc`."""
    rank = os.environ.get("RANK")
    return rank is None or (rank == "0" and os.environ.get(LAUNCHED) != "1")


def under_torchrun_needed(cfg: Any) -> bool:
    """`dist.nproc=N` asks for N processes, and this process is not one of them yet."""
    return cfg.dist.nproc > 1 and "WORLD_SIZE" not in os.environ


def run_torchrun(nproc: int, args: list[str]) -> None:
    """`latentforge ARGS` as `nproc` processes on this machine, started by torchrun's launcher (as
    `torchrun --standalone` does). On Ctrl-C or SIGTERM the workers checkpoint and stop; the run's
    status then says so."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ[LAUNCHED] = "1"
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()), max_restarts=0,
                          monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)("-m", "latentforge", *args)
    except SignalException:
        return
    except ChildFailedError as e:
        codes = sorted({failure.exitcode for failure in e.failures.values()})
        if codes == [130]:
            return
        raise RunError(f"the distributed run failed: worker exit codes {codes} (their output is above)") from None
