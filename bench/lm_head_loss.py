"""The output head and cross-entropy of GPT-2-small, alone: which way of writing them runs fastest.

    python -m bench.lm_head_loss [--device cuda] [--rows 16384] [--tiny]

The fifth measurement in docs/benchmarks.md puts the cross-entropy's two fused kernels at 3.8 ms of a
35.5 ms GPT-2 step, about 3x what their memory traffic needs. This times forward + backward of the
head matmul and the loss, compiled, for each way of writing them, on hidden states of the bench's shape
(16 x 1024 rows, d=768, vocab 50,257 padded to 50,304):

- sliced:   the engine's way: logits over the padded rows, sliced to the vocabulary, float32, cross-entropy;
- masked:   logits over the padded rows, the padded columns set to -inf, cross-entropy over all of them
            (the same loss and gradients: a padded id gets probability 0);
- unpadded: a head of exactly 50,257 rows (what HF does);
- chunked:  `sliced` over 8 slices of the rows, so the float32 logits of only one slice exist at a time;
- fused:    nn.fused_ce, where Triton runs (CUDA): one pass per row writes the gradient over the logits, and
            the head's gradient matmuls run in the forward (not compiled: it is Triton and matmuls).

Each row: milliseconds per forward + backward (median of the timed calls, CUDA events), peak memory,
and the loss, which must agree across rows. On the CPU it runs tiny dims to check that every variant
agrees with the others; those times mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from latentforge.nn.fused_ce import fused_available, linear_cross_entropy
from latentforge.nn.transformer import padded_vocab, vocab_logits

VOCAB, D_MODEL, ROWS, CHUNKS = 50257, 768, 16 * 1024, 8


def sliced(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(vocab_logits(h @ w.t(), vocab).float(), targets)


def masked(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(vocab_logits(h @ w.t(), vocab, padded=True).float(), targets)


def unpadded(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy((h @ w[:vocab].t()).float(), targets)


def chunked(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    losses = [sliced(hc, w, tc, vocab) * len(tc) for hc, tc in zip(h.chunk(CHUNKS), targets.chunk(CHUNKS))]
    return torch.stack(losses).sum() / len(targets)


def fused(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return linear_cross_entropy(h, w, targets, vocab)[0]


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {"sliced": sliced, "masked": masked, "unpadded": unpadded,
                                                   "chunked": chunked}


def time_variant(fn: Callable[..., torch.Tensor], h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                 vocab: int, device: torch.device, warmup: int, steps: int) -> tuple[float, float, float]:
    """(ms per forward + backward, peak GiB above the inputs, loss)."""
    weight = w.detach().clone().requires_grad_(True)
    hidden = h.detach().clone().requires_grad_(True)
    cuda = device.type == "cuda"

    def call() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fn(hidden, weight, targets, vocab)
        loss.backward()
        weight.grad = hidden.grad = None
        return loss

    for _ in range(warmup):
        loss = call()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = call()
            times.append(1000 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else float("nan")
    return statistics.median(times), peak, float(loss.detach())


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=ROWS, help=f"tokens per call (default {ROWS}: 16 x 1024)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="vocab 1000, d=64, 256 rows (default: on with --device cpu)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is available (use --device cpu)")
    tiny = device.type == "cpu" if args.tiny is None else args.tiny
    vocab, d_model, rows = (1000, 64, 256) if tiny else (VOCAB, D_MODEL, args.rows)
    torch.manual_seed(0)
    h = torch.randn(rows, d_model, device=device)
    w = torch.randn(padded_vocab(vocab, 64), d_model, device=device) * d_model**-0.5
    targets = torch.randint(0, vocab, (rows,), device=device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{rows} rows, d={d_model}, vocab {vocab} (head {w.shape[0]} rows); bf16 autocast; "
          f"compile {'on' if args.compile else 'off'}\n")
    print("| variant | ms per forward + backward | peak memory (GiB) | loss |\n|---|---|---|---|")
    results = {}
    variants = {**VARIANTS, "fused": fused} if fused_available(device) else VARIANTS
    for name, fn in variants.items():
        compiled = torch.compile(fn, dynamic=False) if args.compile and name != "fused" else fn
        results[name] = time_variant(compiled, h, w, targets, vocab, device, warmup=3, steps=args.steps)
        ms, peak, loss = results[name]
        print(f"| {name} | {ms:.3f} | {peak:.2f} | {loss:.5f} |", flush=True)
    return results


if __name__ == "__main__":
    main()
