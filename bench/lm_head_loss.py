"""The output head and cross-entropy of GPT-2-small, alone: which way of writing them runs fastest.

    python -m bench.lm_head_loss [--device cuda] [--rows 16384] [--tiny] [--fused-configs 8192x32,16384x32,...]

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
            the head's gradient matmuls run in the forward (not compiled: it is Triton and matmuls). One row
            per `--fused-configs` entry BLOCKxWARPS (columns per iteration x warps per row; default the
            kernel's own), to tune its launch: the seventh measurement found it at ~2.3x its memory traffic.

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

from latentforge.nn.fused_ce import BLOCK, WARPS, fused_available, linear_cross_entropy
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


def fused(block: int, warps: int) -> Callable[..., torch.Tensor]:
    def loss(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
        return linear_cross_entropy(h, w, targets, vocab, block=block, warps=warps)[0]
    return loss


def fused_configs(text: str) -> list[tuple[int, int]]:
    """'8192x32,4096x16' -> [(8192, 32), (4096, 16)]: a power-of-2 block of columns and 1-32 warps each."""
    configs = []
    for item in text.split(","):
        try:
            block, warps = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not BLOCKxWARPS (e.g. 8192x32)") from None
        if not 16 <= block <= 65536 or block & (block - 1) or not 1 <= warps <= 32 or warps & (warps - 1):
            raise argparse.ArgumentTypeError(f"{item!r}: BLOCK must be a power of 2 from 16 to 65536 and WARPS one of "
                                             "1, 2, 4, 8, 16, 32")
        configs.append((block, warps))
    return configs


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
    parser.add_argument("--fused-configs", type=fused_configs, default=[(BLOCK, WARPS)],
                        help=f"the fused kernel's launches to time, BLOCKxWARPS,... (default {BLOCK}x{WARPS})")
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
    variants = dict(VARIANTS)
    if fused_available(device):
        variants.update({f"fused {block}x{warps}": fused(block, warps) for block, warps in args.fused_configs})
    for name, fn in variants.items():
        compiled = torch.compile(fn, dynamic=False) if args.compile and not name.startswith("fused") else fn
        results[name] = time_variant(compiled, h, w, targets, vocab, device, warmup=3, steps=args.steps)
        ms, peak, loss = results[name]
        print(f"| {name} | {ms:.3f} | {peak:.2f} | {loss:.5f} |", flush=True)
    return results


if __name__ == "__main__":
    main()
