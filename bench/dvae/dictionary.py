"""Can the grid dVAE learn a dictionary? A toy where the answer is known, small enough for a CPU.

    python -m bench.dvae.dictionary [--patterns 200] [--codebook-size 512] [--threshold 2] [--reset distance]
        [--split-crowded 1] ...

Grids of 6 x 6 cells through 12 packed grid slots, 3 cells per code (the ARC presets' model, scaled down).
Every slot's run of 3 cells is one of P fixed patterns, drawn with Zipf frequencies (the commonest pattern
P times as frequent as the rarest), so a codebook of K >= P codes can hold every run exactly: each code one
pattern. With K < P the best a code can do is the K commonest patterns (printed as the bound). The table
gives, every steps // 4 steps and at the end, the runs and whole grids reconstructed exactly on 512 fresh grids, the
runs of the rarer half of the patterns, and the codes in use.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from latentforge.tasks.dvae.model import GridDVAE

SIDE, SLOTS, RUN, COLOURS = 6, 12, 3, 10


def make_patterns(count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct runs of 3 colours, (count, 3)."""
    if count > COLOURS**RUN:
        raise SystemExit(f"error: --patterns must be at most {COLOURS**RUN} (runs of {RUN} cells of {COLOURS} colours)")
    seen: set[tuple[int, ...]] = set()
    while len(seen) < count:
        seen.add(tuple(torch.randint(0, COLOURS, (RUN,), generator=generator).tolist()))
    return torch.tensor(sorted(seen))


def zipf_weights(patterns: int) -> torch.Tensor:
    """Pattern i (from 0) drawn in proportion to 1 / (i + 1)."""
    return 1.0 / torch.arange(1, patterns + 1).float()


def sample(patterns: torch.Tensor, weights: torch.Tensor, batch: int,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of grids (B, 6, 6) laid out from sampled patterns in reading order, and each run's pattern (B, 12)."""
    index = torch.multinomial(weights, batch * SLOTS, replacement=True, generator=generator).view(batch, SLOTS)
    return patterns[index].view(batch, SIDE, SIDE), index


def train(patterns: int, codebook_size: int, threshold: float, steps: int, codebook: str = "vq",
          reset: str = "uniform", split_crowded: int = 0, d_model: int = 64, layers: int = 1, batch: int = 64,
          lr: float = 3e-3, seed: int = 0) -> list[dict[str, float]]:
    """Train the toy; the evaluation rows, every steps // 4 steps and at the last."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    table = make_patterns(patterns, generator)
    weights = zipf_weights(patterns)
    options = {"threshold_ema_dead_code": threshold, "dead_code_reset": reset,
               "split_crowded": split_crowded} if codebook == "vq" else {}
    model = GridDVAE(vocab_in=COLOURS + 1, vocab_out=COLOURS + 1, grid_size=SIDE, d_model=d_model, n_head=4,
                     mlp_ratio=2, dropout=0.0, encoder_layers=layers, pool_layers=layers, decoder_layers=layers,
                     latents=2 + SLOTS, codebook=codebook, codebook_size=codebook_size, codebook_options=options,
                     rope_base_row=20.0, rope_base_col=20.0, grid_slots=True, pack_slots=True, pad_id=COLOURS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    held_out = sample(table, weights, 512, torch.Generator().manual_seed(seed + 1))
    rows = []
    for step in range(1, steps + 1):
        grids, _ = sample(table, weights, batch, generator)
        logits, out = model(grids)
        loss = F.cross_entropy(logits.flatten(0, 1), grids.flatten()) + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(steps // 4, 1) == 0 or step == steps:
            rows.append({"step": step, **evaluate(model, *held_out, patterns)})
    return rows


@torch.no_grad()
def evaluate(model: GridDVAE, grids: torch.Tensor, index: torch.Tensor, patterns: int) -> dict[str, float]:
    model.eval()
    logits, out = model(grids)
    model.train()
    exact = (logits.argmax(-1).view_as(grids) == grids).view(len(grids), SLOTS, RUN).all(-1)
    rare = index >= patterns // 2
    return {"runs": float(exact.float().mean()), "grids": float(exact.all(-1).float().mean()),
            "rare_runs": float(exact[rare].float().mean()), "codes": float(out.codes.unique().numel())}


def dictionary_bound(patterns: int, codebook_size: int) -> float:
    """The share of runs among the K commonest patterns: the runs one pattern per code can get back."""
    weights = zipf_weights(patterns)
    return float(weights[:codebook_size].sum() / weights.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patterns", type=int, default=200)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--codebook", default="vq", choices=["vq", "fsq", "gumbel", "reinmax", "softmax"])
    parser.add_argument("--threshold", type=float, default=2.0,
                        help="VQ's threshold_ema_dead_code (2: dvae/arc-vq's before 2026-12-05)")
    parser.add_argument("--reset", default="uniform", choices=["uniform", "distance"],
                        help="VQ's dead_code_reset: uniform (the package's) or distance (k-means++'s rule)")
    parser.add_argument("--split-crowded", type=int, default=0,
                        help="VQ's split_crowded: restart this many live codes nearest another code every step")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.patterns < 2 or args.codebook_size < SIDE or args.steps < 1:
        raise SystemExit(f"error: need --patterns >= 2, --codebook-size >= {SIDE} and --steps >= 1")
    if args.split_crowded and not (args.codebook == "vq" and args.reset == "distance"
                                   and 0 < args.split_crowded < args.codebook_size):
        raise SystemExit("error: --split-crowded needs --codebook vq, --reset distance and a count below "
                         "--codebook-size")
    bound = dictionary_bound(args.patterns, args.codebook_size)
    reset = (f", dead-code threshold {args.threshold} ({args.reset} reset, split_crowded {args.split_crowded})"
             if args.codebook == "vq" else "")
    print(f"{args.codebook}, {args.codebook_size} codes, {args.patterns} patterns of {RUN} cells{reset}: one pattern "
          f"per code gets back {bound:.3f} of the runs")
    print("| step | runs exact | grids exact | rarer half's runs | codes used |")
    print("|---|---|---|---|---|")
    for row in train(args.patterns, args.codebook_size, args.threshold, args.steps, args.codebook, args.reset,
                     args.split_crowded, seed=args.seed):
        print(f"| {row['step']} | {row['runs']:.3f} | {row['grids']:.3f} | {row['rare_runs']:.3f} "
              f"| {row['codes']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
