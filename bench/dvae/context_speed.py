"""How long each miss-layout context takes to guess every cell of a batch of ARC training grids: the fitted rule's
table lookup against the adaptive context's counts (model.miss_context), on the device given; and how long the
interval codes' layout (model.miss_interval, context.interval_runs) takes once the context's probabilities are known.

    python -m bench.dvae.context_speed [--batch 128] [--repeats 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from latentforge.tasks.dvae.context import (
    AdaptiveContext,
    colour_ranks,
    context_guesses,
    fit_context_rule,
    inside_cells,
    interval_runs,
)
from latentforge.tasks.dvae.data import load_arc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    train = load_arc("train")
    rule = fit_context_rule(train.tokens, train.shapes).to(device)
    adaptive = AdaptiveContext(colours=10).fit(train.tokens, train.shapes).to(device)
    grids, shapes = train.tokens[:args.batch].to(device), train.shapes[:args.batch].to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{len(grids)} ARC training grids on {name}:")
    probs, choices = adaptive.ranked(grids, shapes)
    ranks, inside = colour_ranks(choices, grids.flatten(1)), inside_cells(shapes, grids.shape[-1])
    for context, guess in (("fitted rule", lambda: context_guesses(grids, shapes, rule)),
                           ("adaptive context", lambda: adaptive.guesses(grids, shapes)),
                           ("interval layout", lambda: interval_runs(probs, ranks, inside, 126, 512))):
        guess()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        for _ in range(args.repeats):
            guess()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"{context}: {(time.perf_counter() - began) / args.repeats * 1000:.1f} ms per batch")


if __name__ == "__main__":
    main()
