"""The dvae results table (markdown) from each run's latest evaluation (`latentforge eval` saves it
in artifacts/, or the last evaluation during training), its exact match and token accuracy by cells per code, and,
for runs that also evaluate the training grids (data.eval_splits=[test,train]), their last such evaluation beside
the held-out one.

    python -m bench.dvae.summary RUNS_DIR RUN...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from latentforge.tasks.dvae.task import LOAD_NAMES


def latest_metrics(run: Path) -> dict:
    evals = sorted(run.glob("artifacts/eval_*.json"), key=lambda p: p.stat().st_mtime)
    if evals:
        record = json.loads(evals[-1].read_text())
        return {"step": record["step"], **record["metrics"]}
    return json.loads((run / "run.json").read_text()).get("last_eval") or {}


def main(runs: Path, names: list[str]) -> None:
    print("| run | codebook | params | step | train time | token acc | exact match | codes used | perplexity "
          "| dead codes | bits per grid (of) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        info = json.loads((runs / name / "run.json").read_text())
        m = latest_metrics(runs / name)
        config = (runs / name / "config.yaml").read_text()
        codebook = next((line.split(":")[1].strip() for line in config.splitlines()
                         if line.strip().startswith("codebook:")), "?")
        print(f"| {name} | {codebook} | {info['params']:,} | {m.get('step')} | {info.get('train_seconds', 0):.0f} s "
              f"| {m['test/token_acc']:.4f} | {m['test/exact_match']:.4f} | {m['test/codes_used']:.3f} "
              f"| {m['test/perplexity']:.1f} | {m['test/dead_codes']:.0f} "
              f"| {m['test/bits_per_grid']:.0f} ({m['test/code_bits']:.0f}) |")
    latest = {name: latest_metrics(runs / name) for name in names}
    print_by_load("Exact match by how many of its own cells each of a grid's codes carries (grids in the bucket)",
                  {name: [f"{m[f'test/exact_match/{load}']:.3f} ({m[f'test/grids/{load}']:.0f})"
                          if f"test/exact_match/{load}" in m else "" for load in LOAD_NAMES]
                   for name, m in latest.items()})
    by_load = {name: m for name, m in latest.items() if any(f"test/token_acc/{load}" in m for load in LOAD_NAMES)}
    if by_load:
        print_by_load("Token accuracy by the same buckets, decoded (teacher-forced beside it where the decoder is "
                      "autoregressive)",
                      {name: [(f"{m[f'test/token_acc/{load}']:.4f}" + (f" ({m[f'test/forced_token_acc/{load}']:.4f})"
                                                                      if f"test/forced_token_acc/{load}" in m else ""))
                              if f"test/token_acc/{load}" in m else "" for load in LOAD_NAMES]
                       for name, m in by_load.items()})
    fitted = {name: m for name in names if (m := latest_train_eval(runs / name))}
    if fitted:
        print("\nOn the training grids and the held-out ones at the last evaluation of both (exact match by cells "
              "per code, training / held-out):\n")
        print("| run | step | token acc | exact match | " + " | ".join(n.replace("_", " ") for n in LOAD_NAMES) + " |")
        print("|---|---|---|---|" + "---|" * len(LOAD_NAMES))
        for name, m in fitted.items():
            pair = [f"{m[f'train/{key}']:.3f} / {m[f'test/{key}']:.3f}" if f"test/{key}" in m and f"train/{key}" in m
                    else ""
                    for key in ("token_acc", "exact_match", *(f"exact_match/{load}" for load in LOAD_NAMES))]
            print(f"| {name} | {m['step']} | " + " | ".join(pair) + " |")


def print_by_load(title: str, rows: dict[str, list[str]]) -> None:
    """A table of one cell per cells-per-code bucket for each run."""
    print(f"\n{title}:\n")
    print("| run | " + " | ".join(name.replace("_", " ") for name in LOAD_NAMES) + " |")
    print("|---|" + "---|" * len(LOAD_NAMES))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def latest_train_eval(run: Path) -> dict:
    """The last step whose records hold the training grids' evaluation, merged with that step's held-out one.
    The training log's records (train/loss, and a train/token_acc of the augmented batches that shares the
    evaluation's name) are left out."""
    by_step: dict[int, dict] = {}
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        record = json.loads(line)
        if "train/loss" not in record:
            by_step.setdefault(record["step"], {}).update(record)
    steps = [step for step, m in by_step.items() if "train/exact_match" in m and "test/exact_match" in m]
    return by_step[max(steps)] if steps else {}


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
