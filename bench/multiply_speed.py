"""Training speed of the `multiply` preset: steps/s and tokens/s per precision/compile setting.

    python -m bench.multiply_speed [--steps 1500] [--device cuda]

Each setting trains the preset for --steps steps into a scratch runs directory; the rate is the
median over log windows after the first (which holds compilation and warm-up).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile

import torch

import latentforge
from latentforge.tasks.multiply.layout import sequence_length
from latentforge.track.rundir import git_sha

SETTINGS = {
    "fp32 eager": ["train.precision=fp32"],
    "bf16 eager": ["train.precision=bf16"],
    "bf16 + compile": ["train.precision=bf16", "train.compile=true"],
    "bf16 + compile, guard off": ["train.precision=bf16", "train.compile=true", "train.guard.enabled=false"],
}


def measure(device: str, steps: int, overrides: list[str], runs_dir: str, name: str) -> dict[str, float]:
    run = latentforge.train("multiply", *overrides, f"train.device={device}", f"train.steps={steps}",
                            "train.log_every=100", f"train.eval_every={steps}", f"checkpoint.every={steps}",
                            name=name, runs_dir=runs_dir)
    records = [r for r in run.metrics if "train/tokens_per_s" in r]
    d, t = run.config.data, run.config.train
    tokens_per_step = t.batch_size * t.grad_accum * (sequence_length(d.digits_a[1], d.digits_b[1]) - 1)
    rates = [r["train/tokens_per_s"] for r in records[1:]]
    tok_s = statistics.median(rates)
    return {"tokens_per_s": tok_s, "steps_per_s": tok_s / tokens_per_step,
            "exact_2x2": run.info["last_eval"].get("test/exact_match/2x2", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    sha = git_sha() or "(not a git checkout: see the commit this tree came from)"
    print(f"device: {device_name}; torch {torch.__version__}; date {datetime.date.today()}; commit {sha}")
    print(f"command: python -m bench.multiply_speed --steps {args.steps} --device {args.device}\n")
    print("| setting | steps/s | tokens/s | test exact match 2x2 after the run |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as runs_dir:
        for i, (label, overrides) in enumerate(SETTINGS.items()):
            r = measure(args.device, args.steps, overrides, runs_dir, f"bench{i}")
            print(f"| {label} | {r['steps_per_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['exact_2x2']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
