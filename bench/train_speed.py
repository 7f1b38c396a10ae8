"""Training speed of latentforge against its peers, in one process, on the same architecture and batches.

    python -m bench.train_speed [--shape small|gpt2|all] [--steps N] [--warmup N] [--device cuda|cpu]
                                [--compile/--no-compile] [--tiny] [--no-peers] [--no-eager] [--json OUT]
                                [--lf KEY=VALUE ...] [--trace DIR]

Rows, per shape:
- latentforge: its Transformer trained by the engine's `Trainer.train_step` (bf16 autocast, fused
  AdamW, gradient clipping, device-side metric sums). The small shape is the `multiply` preset
  itself (its data stream included); the gpt2 shape is bench/configs/gpt2-small.yaml, the
  random-token task of bench/random_lm.py (batches made on the device); its `model.vocab_multiple: 64`
  pads the tied embedding and head to 50,304 rows and slices the logits back to 50,257 (the peers
  below keep 50,257 rows, as their users run them; MFU counts 50,257 for every row).
- hf eager / hf compiled: transformers' GPT2LMHeadModel with the same dims in a plain loop (bf16
  autocast, fused AdamW, clipping at 1.0, the same loss function), on batches made beforehand.
- lightning: a LightningModule around the same HF model, Trainer(precision="bf16-mixed").

Timing: `--warmup` untimed steps (they hold compilation; "first step" reports the first one's
seconds), then `--steps` timed steps between two device synchronisations. MFU counts model FLOPs
as 6 * (12 * L * d^2 + V * d) per token plus 12 * L * d * T per token for attention (the
PaLM/nanoGPT convention, causal attention counted in full), against a bf16 matmul timed on the
device at start. Each row's failure is recorded in the row; the run goes on.

`--trace DIR` profiles 5 more steps of latentforge's first row, as it trains them (the whole-step CUDA graph
included, where the profiler sees the kernels the graph launches), and writes their kernel table to
DIR/<shape>.txt. The row then also reports the kernels' device time per step against the step's wall time:
what is left is time the device spends between kernels (or, without a graph, waiting for the host).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.random_lm import RandomTokenBatches, lm_loss
from latentforge.config import load_config
from latentforge.engine.async_checkpoint import CheckpointWriter
from latentforge.engine.checkpoint import load_checkpoint, save_checkpoint
from latentforge.engine.device_guard import DeviceGuard
from latentforge.engine.loop import Trainer
from latentforge.tasks.multiply.layout import sequence_length
from latentforge.track.profile import operator_table
from latentforge.track.rundir import git_sha

GPT2_CONFIG = Path(__file__).parent / "configs" / "gpt2-small.yaml"
LR = 3e-4


@dataclass
class Shape:
    name: str
    n_layer: int
    d_model: int
    n_head: int
    batch: int
    seq_len: int  # input tokens per row (the small shape: what the multiply task gives)
    vocab: int
    steps: int  # default timed steps
    warmup: int  # default untimed steps

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def flops_per_step(self) -> float:
        L, d, T, V = self.n_layer, self.d_model, self.seq_len, self.vocab
        return (6 * (12 * L * d * d + V * d) + 12 * L * d * T) * self.tokens


def multiply_seq_len() -> int:
    """Input tokens per row of the `multiply` preset (the sequence minus the shifted-out last token)."""
    d = load_config("multiply").data
    return sequence_length(d.digits_a[1], d.digits_b[1]) - 1


def shapes(tiny: bool) -> dict[str, Shape]:
    """The issue's two shapes, or tiny ones that train in seconds on a CPU."""
    t = multiply_seq_len()
    if tiny:
        return {"small": Shape("small", 2, 64, 2, 32, t, 19, 3, 1),
                "gpt2": Shape("gpt2", 2, 64, 2, 2, 32, 512, 3, 1)}
    return {"small": Shape("small", 4, 384, 6, 512, t, 19, 100, 10),
            "gpt2": Shape("gpt2", 12, 768, 12, 16, 1024, 50257, 30, 5)}


@dataclass
class Row:
    name: str
    steps_per_s: float = float("nan")
    tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    peak_mem_gib: float | None = None
    first_step_s: float = float("nan")
    loss: float = float("nan")
    ratio: float = float("nan")
    error: str = ""
    extra: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    """Drop the last path's compiled graphs and memory, so the next row starts clean."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def matmul_ceiling(device: torch.device, n: int) -> float:
    """Measured bf16 matmul FLOP/s of an n x n x n product: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def timed(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first step, seconds per step over `steps` after `warmup` untimed steps)."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return first, (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------------- latentforge
def lf_trainer(shape: Shape, device: torch.device, compile: bool, overrides: list[str]) -> Trainer:
    """A Trainer for the shape's config: the `multiply` preset (small) or bench/configs/gpt2-small.yaml,
    the random-token task of bench/random_lm.py (gpt2), at the shape's dims."""
    base = ["optim.name=adamw", f"optim.lr={LR}", "optim.betas=[0.9,0.95]", "optim.weight_decay=0.1",
            "optim.decay_embeddings=false", "optim.schedule=constant", "optim.warmup=0", "train.precision=bf16",
            f"train.device={device.type}",
            f"train.compile={str(compile).lower()}", f"train.steps={shape.steps + shape.warmup}",
            f"model.n_layer={shape.n_layer}", f"model.d_model={shape.d_model}", f"model.n_head={shape.n_head}",
            f"train.batch_size={shape.batch}"]
    if shape.name == "small":
        return Trainer(load_config("multiply", base + overrides), quiet=True)
    gpt2 = [f"model.vocab_size={shape.vocab}", f"data.seq_len={shape.seq_len}"]
    return Trainer(load_config(GPT2_CONFIG, base + gpt2 + overrides), quiet=True)


TRACE_STEPS = 5


def run_latentforge(shape: Shape, device: torch.device, compile: bool, overrides: list[str],
                    measure_io: bool, trace: Path | None = None) -> Row:
    trainer = lf_trainer(shape, device, compile, overrides)

    def step() -> None:
        trainer.train_step()
        # As Trainer.fit does: the device guard's verdicts are read (one sync) every log_every steps.
        if isinstance(trainer.guard, DeviceGuard) and trainer.step % trainer.cfg.train.log_every == 0:
            trainer.guard.read()

    first, per_step = timed(step, shape.warmup, shape.steps, device)
    row = Row("latentforge" + (" compiled" if compile else ""), first_step_s=first, peak_mem_gib=peak_gib(device))
    row.steps_per_s = 1 / per_step
    row.loss = float(trainer.window["sums"]["train/loss"]) / max(trainer.window["steps"], 1)
    # The data path: seconds per batch the stream spends, as a share of a step, over enough batches to
    # hold whole chunks of the batches a stream makes together (multiply: data.chunk_batches).
    n = 1024
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        trainer.batches.next_batch()
    sync(device)
    data_s = (time.perf_counter() - start) / n
    row.extra.update(data_ms_per_batch=1e3 * data_s, data_share_of_step=data_s / per_step)
    if trace is not None:
        try:  # the row's numbers are already measured: a profiler that fails costs only the trace
            row.extra.update(traced(step, device, trace / f"{shape.name}.txt"))
        except Exception as e:  # noqa: BLE001
            print(f"--trace failed: {type(e).__name__}: {e}", file=sys.stderr)
    if measure_io:
        row.extra.update(checkpoint_times(trainer, device))
    return row


def traced(step: Callable[[], Any], device: torch.device, table: Path) -> dict[str, float]:
    """TRACE_STEPS steps under the profiler: their kernel table written to `table`, and per step the wall
    time, the kernels' summed device time and the difference (a CPU has no kernels: its ops' time)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        sync(device)
        start = time.perf_counter()
        for _ in range(TRACE_STEPS):
            step()
        sync(device)
        wall = (time.perf_counter() - start) / TRACE_STEPS
    averages = profiler.key_averages()
    cuda = device.type == "cuda"
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    busy = sum(e.self_device_time_total if cuda else e.self_cpu_time_total
               for e in averages if e.device_type == kind) / 1e6 / TRACE_STEPS
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(f"{TRACE_STEPS} steps: {1e3 * wall:.3f} ms per step, {'kernels' if cuda else 'ops'} "
                     f"{1e3 * busy:.3f} ms\n" + operator_table(averages, device, rows=60, max_name_column_width=100))
    return {"trace_step_ms": 1e3 * wall, "trace_kernel_ms": 1e3 * busy, "trace_gap_ms": 1e3 * (wall - busy)}


def checkpoint_times(trainer: Trainer, device: torch.device) -> dict[str, float]:
    """Seconds train_step is blocked by a save as the Trainer makes it with checkpoint.async_save (state_dict
    and the snapshot to pinned host memory; the second of two saves, whose pinned buffers are reused; the
    first's, which allocates them, too), the seconds until that checkpoint is on disk (the background write
    included), the seconds a synchronous save blocks, and the seconds to restore the weights and optimizer
    state (load_checkpoint + load_state_dict)."""
    writer = CheckpointWriter(device)
    with tempfile.TemporaryDirectory() as tmp:
        blocked = []
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            writer.save(trainer.state_dict(), lambda state: save_checkpoint(Path(tmp), trainer.step, state, "periodic"))
            blocked.append(time.perf_counter() - start)
            writer.wait()
            written = time.perf_counter() - start
        sync(device)
        start = time.perf_counter()
        path = save_checkpoint(Path(tmp), trainer.step, trainer.state_dict(), "periodic")
        sync(device)
        saved_sync = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.iterdir())
        start = time.perf_counter()
        state = load_checkpoint(path)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        sync(device)
        restored = time.perf_counter() - start
    return {"ckpt_save_blocked_s": blocked[1], "ckpt_first_save_blocked_s": blocked[0], "ckpt_write_s": written,
            "ckpt_sync_save_s": saved_sync, "ckpt_restore_s": restored, "ckpt_gib": size / 2**30}


# ---------------------------------------------------------------------------- peers
def peer_batches(shape: Shape, device: torch.device, count: int = 8) -> list[dict[str, torch.Tensor]]:
    """The peers' batches, made beforehand on the device: the small shape's from the multiply
    task's own stream (the same data latentforge trains on), gpt2's random tokens."""
    if shape.name == "small":
        cfg = load_config("multiply", [f"train.batch_size={shape.batch}", f"train.device={device.type}"])
        from latentforge.tasks import get_task

        stream = get_task("multiply")(cfg, device).train_batches()
    else:
        stream = RandomTokenBatches(shape.batch, shape.seq_len, shape.vocab, 0, device)
    return [stream.next_batch() for _ in range(count)]


def hf_model(shape: Shape, device: torch.device) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=shape.vocab, n_positions=shape.seq_len, n_embd=shape.d_model,
                        n_layer=shape.n_layer, n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").to(device)


def adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1,
                             fused=device.type == "cuda")


def run_hf(shape: Shape, device: torch.device, compile: bool) -> Row:
    model = hf_model(shape, device)
    optimizer = adamw(model, device)
    forward = torch.compile(model) if compile else model
    batches = peer_batches(shape, device)
    losses: list[torch.Tensor] = []

    def step() -> None:
        batch = batches[len(losses) % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_loss(forward(input_ids=batch["inputs"]).logits, batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    first, per_step = timed(step, shape.warmup, shape.steps, device)
    row = Row("hf compiled" if compile else "hf eager", steps_per_s=1 / per_step, first_step_s=first,
              peak_mem_gib=peak_gib(device), loss=float(torch.stack(losses).mean()))
    return row


def run_lightning(shape: Shape, device: torch.device) -> Row:
    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    batches = peer_batches(shape, device)
    total = shape.warmup + shape.steps

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(total):
                yield batches[i % len(batches)]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = hf_model(shape, device)
            self.losses: list[torch.Tensor] = []

        def training_step(self, batch, index):
            loss = lm_loss(self.model(input_ids=batch["inputs"]).logits, batch["targets"])
            self.losses.append(loss.detach())
            return loss

        def configure_optimizers(self):
            return adamw(self.model, device)

        def on_before_optimizer_step(self, optimizer):
            # Lightning's own gradient_clip_val refuses fused AdamW under mixed precision; the same
            # clipping by norm, done here, keeps the optimizer the other rows use.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)

    class Clock(L.Callback):
        """Synchronised wall time from the first timed batch to the end of training."""

        def __init__(self):
            self.start = self.end = self.first = 0.0

        def on_train_batch_start(self, trainer, module, batch, index):
            if index in (0, shape.warmup):
                sync(device)
                now = time.perf_counter()
                self.start = now
                if index == 0:
                    self.first = now

        def on_train_batch_end(self, trainer, module, outputs, batch, index):
            if index == 0:
                sync(device)
                self.first = time.perf_counter() - self.first

        def on_train_end(self, trainer, module):
            sync(device)
            self.end = time.perf_counter()

    module, clock = Module(), Clock()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=total, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[clock])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(Stream(), batch_size=None))
    per_step = (clock.end - clock.start) / shape.steps
    row = Row("lightning", steps_per_s=1 / per_step, first_step_s=clock.first, peak_mem_gib=peak_gib(device),
              loss=float(torch.stack(module.losses).mean()))
    return row


# ---------------------------------------------------------------------------- the run
def guarded(name: str, fn: Callable[[], Row], device: torch.device) -> Row:
    """One row; a failure becomes the row's error instead of ending the run."""
    free(device)
    try:
        row = fn()
    except Exception as e:  # noqa: BLE001 - any path's failure is reported in its row
        traceback.print_exc(file=sys.stderr)
        row = Row(name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    free(device)
    return row


def bench_shape(shape: Shape, device: torch.device, compile: bool, ceiling: float,
                overrides: list[str], peers: bool = True, eager: bool = True, trace: Path | None = None) -> list[Row]:
    first = "latentforge compiled" if compile else "latentforge"
    measure_io = shape.name == "gpt2"
    rows = [guarded(first, lambda: run_latentforge(shape, device, compile, overrides, measure_io, trace=trace), device)]
    if compile and eager:
        rows.append(guarded("latentforge", lambda: run_latentforge(shape, device, False, overrides, False), device))
    if peers:
        rows.append(guarded("hf eager", lambda: run_hf(shape, device, False), device))
        if compile:
            rows.append(guarded("hf compiled", lambda: run_hf(shape, device, True), device))
        rows.append(guarded("lightning", lambda: run_lightning(shape, device), device))
    base = rows[0].steps_per_s
    for row in rows:
        row.tokens_per_s = row.steps_per_s * shape.tokens
        row.mfu = shape.flops_per_step() * row.steps_per_s / ceiling
        row.ratio = row.steps_per_s / base
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def table(shape: Shape, rows: list[Row]) -> str:
    lines = ["| trainer | steps/s | tokens/s | MFU | peak memory (GiB) | first step (s) | mean loss "
             "| steps/s ÷ latentforge's |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | error: {r.error} | | | | | | |")
            continue
        lines.append(f"| {r.name} | {fmt(r.steps_per_s, ',.1f')} | {fmt(r.tokens_per_s, ',.0f')} "
                     f"| {fmt(100 * r.mfu, '.1f')}% | {fmt(r.peak_mem_gib, '.2f')} | {fmt(r.first_step_s, '.2f')} "
                     f"| {fmt(r.loss, '.4f')} | {fmt(r.ratio, '.2f')} |")
    x = rows[0].extra
    if "data_ms_per_batch" in x:
        lines.append(f"\n{rows[0].name}: data path {x['data_ms_per_batch']:.3f} ms per batch "
                     f"({100 * x['data_share_of_step']:.2f}% of a step)")
    if "ckpt_save_blocked_s" in x:
        lines.append(f"{rows[0].name}: checkpoint with optimizer ({x['ckpt_gib']:.2f} GiB): an asynchronous save "
                     f"blocks train_step for {x['ckpt_save_blocked_s']:.2f} s (the first, which pins its host "
                     f"buffers, {x['ckpt_first_save_blocked_s']:.2f} s) and is on disk after {x['ckpt_write_s']:.2f} "
                     f"s; a synchronous save blocks {x['ckpt_sync_save_s']:.2f} s; restore takes "
                     f"{x['ckpt_restore_s']:.2f} s")
    return "\n".join(lines)


def describe(shape: Shape) -> str:
    params = 12 * shape.n_layer * shape.d_model**2 + shape.vocab * shape.d_model
    data = ("the `multiply` preset's stream (peers: 8 of its batches made beforehand)" if shape.name == "small"
            else "random tokens made on the device (latentforge: bench/configs/gpt2-small.yaml, the task in "
                 "bench/random_lm.py; peers: 8 of its batches made beforehand)")
    return (f"### {shape.name}: {shape.n_layer} layers, d={shape.d_model}, {shape.n_head} heads, vocab {shape.vocab}, "
            f"batch {shape.batch} × {shape.seq_len} tokens, ~{params / 1e6:.1f}M parameters; data: {data}; "
            f"{shape.warmup} warm-up + {shape.steps} timed steps; model FLOPs {shape.flops_per_step() / 1e9:,.1f} "
            f"GFLOP per step")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["small", "gpt2", "all"], default="all")
    parser.add_argument("--steps", type=int, help="timed steps (default: 100 small, 30 gpt2; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 10 small, 5 gpt2; 1 with --tiny)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile latentforge and add the hf compiled row (default: on with cuda)")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="tiny dims that run in seconds (default: on with --device cpu)")
    parser.add_argument("--lf", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the latentforge rows, e.g. train.guard.enabled=false")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="the HF and Lightning rows (--no-peers: latentforge's alone, to compare its settings)")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="latentforge's uncompiled row beside the compiled one (--no-eager: compiled alone)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--trace", type=Path, metavar="DIR",
                        help=f"profile {TRACE_STEPS} more steps of latentforge's first row: DIR/<shape>.txt")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is available (use --device cpu)")
    compile = device.type == "cuda" if args.compile is None else args.compile
    tiny = device.type == "cpu" if args.tiny is None else args.tiny
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    chosen = [s for name, s in shapes(tiny).items() if args.shape in (name, "all")]
    chosen = [replace(s, steps=args.steps or s.steps, warmup=max(1, args.warmup or s.warmup)) for s in chosen]

    ceiling = matmul_ceiling(device, 8192 if device.type == "cuda" else 512)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    command = "python -m bench.train_speed " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = (f"device: {name}; torch {torch.__version__}; date {datetime.date.today()}; commit {git_sha() or '?'}\n"
              f"command: `{command}`\nmeasured bf16 matmul ceiling: {ceiling / 1e12:,.3g} TFLOP/s")
    print(header, flush=True)
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "date": str(datetime.date.today()),
                               "commit": git_sha(), "command": command, "ceiling_flops": ceiling, "shapes": {}}
    for shape in chosen:
        rows = bench_shape(shape, device, compile, ceiling, args.lf, args.peers, args.eager, args.trace)
        print(f"\n{describe(shape)}\n\n{table(shape, rows)}", flush=True)
        if "trace_step_ms" in rows[0].extra:
            x = rows[0].extra
            busy = "kernels" if device.type == "cuda" else "ops"
            print(f"{rows[0].name}, {TRACE_STEPS} steps profiled: {x['trace_step_ms']:.3f} ms per step, of which "
                  f"{busy} {x['trace_kernel_ms']:.3f} ms and between them {x['trace_gap_ms']:.3f} ms "
                  f"(table: {args.trace / (shape.name + '.txt')})", flush=True)
        results["shapes"][shape.name] = {"shape": asdict(shape), "rows": [asdict(r) for r in rows]}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
