"""How fast GSSM sequences are generated, with and without their Bayes-optimal loss.

    python -m bench.gssm.generate [--device cpu|cuda] [--sequences N] [--seq-len T]

Prints tokens per second for each study preset (the best of three timed runs after a warm-up).
"""

from __future__ import annotations

import argparse
import time

import torch

from latentforge.config import load_config
from latentforge.tasks.gssm.data import generate
from latentforge.tasks.gssm.graph import Graph


def tokens_per_second(graph: Graph, n: int, length: int, device: torch.device, optimum: bool) -> float:
    generate(graph, 0, 0, min(n, 64), length, device, optimum)
    best = float("inf")
    for repeat in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        seqs = generate(graph, 1, repeat * n, n, length, device, optimum)
        float(seqs.optimal.sum() if optimum else seqs.tokens.sum())
        best = min(best, time.perf_counter() - start)
    return n * length / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sequences", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device} ({torch.get_num_threads()} threads), {args.sequences} sequences x {args.seq_len} tokens")
    print("| preset | joint hidden states | tokens/s | tokens/s with the optimum |")
    print("|---|---|---|---|")
    for preset in ("base", "sparse", "dense", "low_entropy"):
        graph = Graph(load_config(f"gssm/{preset}").data.nodes, seed=0)
        plain = tokens_per_second(graph, args.sequences, args.seq_len, device, optimum=False)
        with_optimum = tokens_per_second(graph, args.sequences, args.seq_len, device, optimum=True)
        print(f"| {preset} | {graph.joint_size} | {plain:,.0f} | {with_optimum:,.0f} |")


if __name__ == "__main__":
    main()
