"""What activation checkpointing (`model.activation_checkpointing=true`) saves and costs: peak memory
and step time of the engine's own training step, with and without it, on a mid-size model.

    python -m bench.activation_ckpt [--device cuda|cpu] [--tiny] [--steps N] [--warmup N]
                                    [--batch-size B] [--seq-len T] [--lf KEY=VALUE ...]

The model is the gssm task's transformer at GPT-2-small width (12 layers, d_model 768, 12 heads,
about 85M parameters) on 1024-token sequences in bf16; `--tiny` shrinks it to seconds on a CPU.
The batches are taken from the task's stream once (train.overfit_batches), so the timed steps are
the model's alone. Peak memory is CUDA's max_memory_allocated over the timed steps (not measured on
a CPU). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from latentforge.config import load_config
from latentforge.engine.loop import Trainer

MID = ["model.n_layer=12", "model.d_model=768", "model.n_head=12", "train.precision=bf16"]
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "train.precision=fp32"]


def measure(overrides: list[str], device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Peak memory (GiB, CUDA only) and seconds per step of `steps` timed training steps."""
    trainer = Trainer(load_config("gssm", overrides), quiet=True)
    for _ in range(warmup):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in trainer.model.parameters())
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peak_gib": peak, "step_s": seconds, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="A seconds-long run of a tiny model (for the tests).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default 20, tiny 2).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3, tiny 1).")
    parser.add_argument("--batch-size", type=int, default=None, help="Sequences per step (default 16, tiny 4).")
    parser.add_argument("--seq-len", type=int, default=None, help="Tokens per sequence (default 1024, tiny 32).")
    parser.add_argument("--lf", nargs="*", default=[], help="More latentforge overrides, e.g. train.compile=true.")
    args = parser.parse_args()
    steps = args.steps or (2 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    batch = args.batch_size or (4 if args.tiny else 16)
    seq_len = args.seq_len or (32 if args.tiny else 1024)
    device = torch.device(args.device)
    overrides = [*(TINY if args.tiny else MID), f"train.device={args.device}", f"train.batch_size={batch}",
                 f"data.seq_len={seq_len}", "train.overfit_batches=2", "data.optimum=false",
                 f"data.chunk_sequences={2 * batch}", "data.test_sequences=8", "data.train_eval_sequences=8",
                 "optim.warmup=0", *args.lf]
    rows = {flag: measure([*overrides, f"model.activation_checkpointing={flag}"], device, steps, warmup)
            for flag in ("false", "true")}
    off, on = rows["false"], rows["true"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gssm transformer, {off['params']:,} parameters, batch {batch} x {seq_len} tokens, "
          f"{steps} timed steps after {warmup}, on {name} (torch {torch.__version__})\n")
    print("| activation checkpointing | peak memory (GiB) | step time (ms) | tokens/s |")
    print("|---|---:|---:|---:|")
    for label, row in (("off", off), ("on", on)):
        tokens_per_s = batch * seq_len / row["step_s"]
        peak = f"{row['peak_gib']:.2f}" if device.type == "cuda" else "n/a"
        print(f"| {label} | {peak} | {row['step_s'] * 1e3:.1f} | {tokens_per_s:,.0f} |")
    if device.type == "cuda":
        print(f"\nmemory saved {1 - on['peak_gib'] / off['peak_gib']:.0%}, ", end="")
    print(f"step time x{on['step_s'] / off['step_s']:.2f}")


if __name__ == "__main__":
    main()
