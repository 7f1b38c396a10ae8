"""How fast does a `multiply` setting generalize? Trains the default preset with each given set of
overrides and reports when held-out 2x2 exact match first reaches 99%, and its trajectory.

    python -m bench.multiply_sweep --steps 2400 base= muon-wd.5="optim.weight_decay=0.5,optim.schedule=wsd"

Each argument is NAME=override,override,... (empty after '=' for the preset as it is).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import latentforge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="NAME=key=value,key=value")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print("| setting | overrides | first step >= 99% | final 2x2 exact match | trajectory (every 500 steps) | time |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as runs_dir:
        for setting in args.settings:
            name, _, spec = setting.partition("=")
            overrides = [o for o in spec.split(",") if o]
            start = time.time()
            run = latentforge.train("multiply", *overrides, f"train.steps={args.steps}", "train.eval_every=250",
                                    "train.log_every=250", f"train.device={args.device}", "train.guard.enabled=false",
                                    name=name, runs_dir=runs_dir)
            curve = [(r["step"], r["test/exact_match/2x2"]) for r in run.metrics if "test/exact_match/2x2" in r]
            first = next((step for step, value in curve if value >= 0.99), None)
            trajectory = ", ".join(f"{value:.2f}" for step, value in curve if step % 500 == 0)
            print(f"| {name} | {' '.join(overrides) or '(preset)'} | {first or '-'} | {curve[-1][1]:.3f} | "
                  f"{trajectory} | {time.time() - start:.0f}s |", flush=True)


if __name__ == "__main__":
    main()
