"""Where a model.miss_slots run's decoder is wrong with the true earlier cells in view (teacher forcing), and
whether its codes tell the runs apart.

    python -m bench.dvae.misses RUNS_DIR RUN [--split test|train] [--grids N] [--device cuda]

A miss_slots code need only say where in its run the context rule fails and with what colour (context.py): a
run's class is (its length, its last cell's colour, whether the rule missed there), fewer classes than codes.
The decoder then copies the rule's guess everywhere but at that place. So its teacher-forced errors are
counted apart in four kinds of cells: cells the rule gets right (the code says "not here"), cells it misses (the
code gives the colour), and cells past the last code (no code to read: the decoder's own prediction is all there
is), which the rule gets right or not. A code shared by runs of different classes cannot be right for all of
them: the share of runs whose code is mostly used by another class bounds the decoder's errors from the codebook
(from above: a run cut at model.miss_run cells without a miss needs no colour, so codes shared by such runs of
different last colours are harmless, and they are counted all the same). For a shared code, "apart" is how far
the encoder's vectors (the codebook's input) of its two commonest classes lie from each other, in units of their
spread: well above 1, the encoder tells them apart and the codebook merges them (more codes there would help);
near 0, the encoder itself maps both to one place.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import torch

from latentforge.api import load_run
from latentforge.engine.loop import autocast
from latentforge.tasks.dvae.context import uncoded_misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("run")
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--grids", type=int, default=0, help="the split's first N grids (0: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    run = load_run(args.run, args.runs_dir)
    task, model, step = run.load(device=args.device)
    if not getattr(model, "miss_slots", False):
        raise SystemExit(f"run {args.run} does not lay its codes out by model.miss_slots")
    device, precision = run.inference_device(model)
    grids = task.test_grids if args.split == "test" else task.train_grids  # all, whatever data.eval_grids says
    grids = grids.select(slice(0, args.grids or len(grids))).to(device)
    kinds = ("rule right", "rule missed", "past the last code, rule right", "past the last code, rule missed")
    cells, wrong = Counter(), Counter()
    grids_fit = grids_fit_exact = 0
    classes_of_code: dict[int, Counter] = defaultdict(Counter)
    vectors: dict[tuple[int, tuple], list] = {}  # (code, class) -> [runs, sum of h, sum of |h|^2]
    inputs: list[torch.Tensor] = []
    model.codebook.register_forward_hook(lambda module, args, output: inputs.append(args[0].float()))
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(grids), task.cfg.data.eval_batch_size):
            tokens = grids.tokens[start:start + task.cfg.data.eval_batch_size]
            shapes = model.grid_shapes(tokens)
            logits, out = model(tokens)
            slot, offset, end, missed = model.layout(tokens, shapes, model.grid_axes(tokens, shapes))[:4]
            targets = tokens.flatten(1)
            # Grids that keep even runs (model.miss_above_cells) are left out: their codes carry every cell.
            laid_out = ~model.keeps_even_runs(shapes)
            inside = (targets != task.pad_id) & laid_out.unsqueeze(1)
            error = (logits.argmax(-1) != targets) & inside
            coded = inside & (slot < model.slots)
            masks = (coded & ~missed, coded & missed, inside & ~coded & ~missed, inside & ~coded & missed)
            for kind, mask in zip(kinds, masks):
                cells[kind] += int(mask.sum())
                wrong[kind] += int((error & mask).sum())
            fits = laid_out & ~uncoded_misses(slot, missed, model.slots).any(1)
            grids_fit += int(fits.sum())
            grids_fit_exact += int((fits & ~error.any(1)).sum())
            # Each finished run's class, and the code its slot got.
            ends = end & coded
            batch, cell = ends.nonzero(as_tuple=True)
            codes = out.codes[batch, slot[batch, cell]]
            h = inputs.pop()[batch, slot[batch, cell]]
            keys = torch.stack([codes, offset[batch, cell] + 1, targets[batch, cell], missed[batch, cell].long()], 1)
            unique, inverse = keys.unique(dim=0, return_inverse=True)
            sums = h.new_zeros(len(unique), h.shape[1]).index_add_(0, inverse, h)
            squares = h.new_zeros(len(unique)).index_add_(0, inverse, h.square().sum(1))
            counts = torch.bincount(inverse, minlength=len(unique))
            for key, n, total, square in zip(unique.tolist(), counts.tolist(), sums, squares.tolist()):
                code, cls = key[0], (key[1], key[2], bool(key[3]))
                classes_of_code[code][cls] += n
                entry = vectors.setdefault((code, cls), [0, torch.zeros_like(total), 0.0])
                entry[0] += n
                entry[1] += total
                entry[2] += square
    read = int((~model.keeps_even_runs(grids.shapes)).sum())
    left_out = f" ({len(grids) - read} with even runs left out: model.miss_above_cells)" if read < len(grids) else ""
    print(f"{args.run} at step {step}, {len(grids)} {args.split} grids{left_out}, teacher-forced:")
    print("| cells | count | share | wrong | accuracy |")
    print("|---|---|---|---|---|")
    total = sum(cells.values())
    for kind in kinds:
        print(f"| {kind} | {cells[kind]:,} | {cells[kind] / total:.3f} | {wrong[kind]:,} "
              f"| {1 - wrong[kind] / max(cells[kind], 1):.4f} |")
    print(f"\n{grids_fit} grids ({grids_fit / max(read, 1):.3f}) have every missed cell within the codes; "
          f"{grids_fit_exact} of them ({grids_fit_exact / max(grids_fit, 1):.3f}) are right in every cell.")
    runs = sum(sum(c.values()) for c in classes_of_code.values())
    majority = sum(max(c.values()) for c in classes_of_code.values())
    classes = {cls for c in classes_of_code.values() for cls in c}
    mixed = sorted(((sum(c.values()) - max(c.values()), code) for code, c in classes_of_code.items()), reverse=True)
    print(f"\n{runs:,} finished runs of {len(classes)} classes (length, colour, missed) on {len(classes_of_code)} "
          f"codes: {runs - majority:,} ({(runs - majority) / max(runs, 1):.4f}) have a code used mostly by "
          f"another class.")
    for count, code in mixed[:8]:
        if count:
            top = ", ".join(f"{cls}: {n}" for cls, n in classes_of_code[code].most_common(4))
            print(f"  code {code}: {top}; apart {apart(vectors, code, classes_of_code[code]):.2f}")
    pairs = [apart(vectors, code, c) for code, c in classes_of_code.items()
             if len(c) > 1 and c.most_common(2)[1][1] >= 5]
    if pairs:
        median = sorted(pairs)[len(pairs) // 2]
        print(f"codes whose two commonest classes have 5 runs or more each: {len(pairs)}; their classes lie apart by "
              f"more than 1 spread on {sum(p > 1 for p in pairs)} of them (median {median:.2f})")


def apart(vectors: dict[tuple[int, tuple], list], code: int, classes: Counter) -> float:
    """The distance between the mean encoder vectors of a code's two commonest classes, over their RMS spread."""
    (a, _), (b, _) = classes.most_common(2)
    stats = []
    for cls in (a, b):
        n, total, square = vectors[(code, cls)]
        mean = total / n
        stats.append((mean, max(square / n - float(mean.square().sum()), 0.0)))
    spread = ((stats[0][1] + stats[1][1]) / 2) ** 0.5
    return float((stats[0][0] - stats[1][0]).norm()) / max(spread, 1e-12)


if __name__ == "__main__":
    main()
