"""The dvae results table (markdown) from each run's latest evaluation (`latentforge eval` saves it
in artifacts/, or the last evaluation during training).

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
    print("\nExact match by how many of its own cells each of a grid's codes carries (grids in the bucket):\n")
    print("| run | " + " | ".join(name.replace("_", " ") for name in LOAD_NAMES) + " |")
    print("|---|" + "---|" * len(LOAD_NAMES))
    for name in names:
        m = latest_metrics(runs / name)
        cells = [f"{m[f'test/exact_match/{load}']:.3f} ({m[f'test/grids/{load}']:.0f})"
                 if f"test/exact_match/{load}" in m else "" for load in LOAD_NAMES]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
