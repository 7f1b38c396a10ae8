"""The gssm results tables (markdown): each run's loss against the optimum, and its best layer's
probe accuracy against the Bayes ceiling for every hidden node (from artifacts/probe.json).

    python -m bench.gssm.summary RUNS_DIR RUN...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(runs: Path, names: list[str]) -> None:
    print("| run | params | steps | train time | optimal loss (± se) | test loss | gap | gap / optimal |")
    print("|---|---|---|---|---|---|---|---|")
    probes = {}
    for name in names:
        run = runs / name
        info = json.loads((run / "run.json").read_text())
        last = info["last_eval"]
        print(f"| {name} | {info['params']:,} | {info['step']} | {info.get('train_seconds', 0):.0f} s "
              f"| {last['test/optimal_loss']:.4f} ± {last['test/optimal_loss_se']:.4f} | {last['test/loss']:.4f} "
              f"| {last['test/gap']:.4f} ± {last['test/gap_se']:.4f} | {100 * last['test/relative_gap']:.2f}% |")
        probe_file = run / "artifacts" / "probe.json"
        if probe_file.exists():
            probes[name] = json.loads(probe_file.read_text())
    if probes:
        print("\n| run | node | Bayes ceiling | best layer | its accuracy | accuracy / ceiling | every layer |")
        print("|---|---|---|---|---|---|---|")
        for name, rows in probes.items():
            for row in rows:
                layers = sorted((k for k in row if k.startswith("layer")), key=lambda k: int(k[5:]))
                best = f"layer{row['best_layer']}"
                print(f"| {name} | {row['node']} | {row['ceiling']:.3f} | {row['best_layer']} | {row[best]:.3f} "
                      f"| {100 * row['best_of_ceiling']:.1f}% | {' '.join(f'{row[k]:.3f}' for k in layers)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
