"""Would a learned context model leave fewer cells for the codes than the fitted rule? A CPU experiment.

    python -m bench.dvae.predictor [--d-model 128] [--layers 3] [--steps 2000] [--batch 16] [--eval-grids N]

model.miss_slots spends a code on each cell that a fixed context rule (context.py) mispredicts, so a grid fits
its 126 codes when the rule misses at most that many of its cells (runs cut at miss_run cells aside). This trains
a small causal transformer on ARC-AGI-1's training grids (augmented as the dvae task does: the 8 dihedral
transforms and colour permutations that keep the background) to predict each cell from the cells before it in
reading order (its left and upper neighbours' colours, its row, column and the grid's shape as inputs), then
counts on the held-out grids, beside the fitted rule: the cells each mispredicts, the grids with at most 126 such
cells, and the token accuracy if the first 126 of a grid's mispredicted cells were given and the predictor's guess
taken for the rest. A predictor that beats the rule would be a better layout (a frozen one, trained first).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.tasks.dvae.context import context_guesses, fit_context_rule, inside_cells, miss_layout, uncoded_misses
from latentforge.tasks.dvae.data import dihedral, load_arc, permute_colors, random_color_permutations
from latentforge.tasks.dvae.task import unseen

SIZE, COLOURS, SLOTS, MISS_RUN = 32, 10, 126, 32
START = COLOURS + 1  # the input of a grid's first cell, and the upper colour of its first row


class CausalPredictor(nn.Module):
    """Each canvas cell's colour from the cells before it in reading order."""

    def __init__(self, d_model: int, layers: int, heads: int = 4):
        super().__init__()
        self.previous = nn.Embedding(COLOURS + 2, d_model)  # colours, padding, START
        self.upper = nn.Embedding(COLOURS + 2, d_model)
        self.row, self.col = nn.Embedding(SIZE, d_model), nn.Embedding(SIZE, d_model)
        self.height, self.width = nn.Embedding(SIZE + 1, d_model), nn.Embedding(SIZE + 1, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, 0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, COLOURS)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SIZE * SIZE), persistent=False)

    def forward(self, tokens: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        """(B, S, S) grids, (B, 2) shapes -> (B, S*S, colours) logits."""
        batch, flat = len(tokens), tokens.flatten(1)
        rows = torch.arange(SIZE).repeat_interleave(SIZE)
        cols = torch.arange(SIZE).repeat(SIZE)
        previous = torch.cat([torch.full((batch, 1), START), flat[:, :-1]], 1)
        # A row's first cell follows the last cell of the row above (START for the first row).
        row_above_last = ((rows - 1).clamp(min=0) * SIZE).unsqueeze(0) + shapes[:, 1:] - 1
        wrapped = torch.where(rows.unsqueeze(0) == 0, START, flat.gather(1, row_above_last))
        previous = torch.where((cols == 0).unsqueeze(0), wrapped, previous)
        upper = torch.cat([torch.full((batch, SIZE), START), flat[:, :-SIZE]], 1)
        x = (self.previous(previous) + self.upper(upper) + self.row(rows) + self.col(cols)
             + self.height(shapes[:, :1]) + self.width(shapes[:, 1:]))
        return self.head(self.blocks(x, mask=self.mask, is_causal=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-grids", type=int, default=0, help="the first N held-out grids (0: all)")
    args = parser.parse_args()
    if min(args.d_model, args.layers, args.steps, args.batch) < 1 or args.d_model % 4:
        raise SystemExit("error: --d-model (a multiple of 4), --layers, --steps and --batch must be positive")
    torch.manual_seed(args.seed)
    train = load_arc("train", "arc1", SIZE)
    test = unseen(load_arc("eval", "arc1", SIZE), train)
    test = test.select(slice(0, args.eval_grids or len(test)))
    model = CausalPredictor(args.d_model, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    began = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:  # cosine from lr to 0
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        index = torch.randint(0, len(train.tokens), (args.batch,), generator=generator)
        tokens, shapes = dihedral(train.tokens[index], train.shapes[index],
                                  torch.randint(0, 8, (args.batch,), generator=generator))
        tokens = permute_colors(tokens, random_color_permutations(args.batch, COLOURS, True, generator))
        inside = inside_cells(shapes, SIZE)
        loss = F.cross_entropy(model(tokens, shapes)[inside], tokens.flatten(1)[inside])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - began:.0f} s)", flush=True)
    model.eval()
    rule = fit_context_rule(train.tokens, train.shapes)
    counts = {"cells": 0, "rule_misses": 0, "rule_fits": 0, "rule_past": 0, "model_misses": 0, "model_fits": 0,
              "model_past": 0}
    with torch.no_grad():
        for start in range(0, len(test.tokens), 64):
            tokens, shapes = test.tokens[start:start + 64], test.shapes[start:start + 64]
            inside = inside_cells(shapes, SIZE)
            wrong = (model(tokens, shapes).argmax(-1) != tokens.flatten(1)) & inside
            slot, _, _, missed = miss_layout(tokens, shapes, context_guesses(tokens, shapes, rule), SLOTS, MISS_RUN)[:4]
            past = uncoded_misses(slot, missed, SLOTS)
            counts["cells"] += int(inside.sum())
            counts["rule_misses"] += int(missed.sum())
            counts["rule_fits"] += int((~past.any(1)).sum())
            counts["rule_past"] += int(past.sum())
            counts["model_misses"] += int(wrong.sum())
            counts["model_fits"] += int((wrong.sum(1) <= SLOTS).sum())
            counts["model_past"] += int((wrong & (wrong.long().cumsum(1) > SLOTS)).sum())
    cells, grids = counts["cells"], len(test.tokens)
    print(f"\n{grids} held-out grids, {cells:,} cells; {SLOTS} codes, one per mispredicted cell:")
    print("| predictor | cells mispredicted | grids that fit | token accuracy, the first 126 misses given |")
    print("|---|---|---|---|")
    for name, key, note in (("the fitted rule (model.miss_slots)", "rule", f" (runs of <= {MISS_RUN})"),
                            (f"causal transformer, d {args.d_model}, {args.layers} layers, {args.steps} steps",
                             "model", "")):
        print(f"| {name} | {counts[key + '_misses'] / cells:.4f} | {counts[key + '_fits'] / grids:.3f}{note} "
              f"| {1 - counts[key + '_past'] / cells:.4f} |")


if __name__ == "__main__":
    main()
