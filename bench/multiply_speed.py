"""Training speed of a `multiply` preset: steps/s and tokens/s per precision/compile setting.

    python -m bench.multiply_speed [--steps 1500] [--device cuda] [--preset multiply/icot-si]
        [--setting "NAME=key=value,key=value" ...]

Each setting (by default: fp32, bf16, bf16 compiled with and without the guard) trains the preset
for --steps steps into a scratch runs directory; the rate is the median over log windows after the
first (which holds compilation and warm-up).
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import tempfile

import torch

import latentforge
from latentforge.track.rundir import git_sha

SETTINGS = {
    "fp32 eager": ["train.precision=fp32"],
    "bf16 eager": ["train.precision=bf16"],
    "bf16 + compile": ["train.precision=bf16", "train.compile=true"],
    "bf16 + compile, guard off": ["train.precision=bf16", "train.compile=true", "train.guard.enabled=false"],
}


LOG_EVERY = 100


def split_overrides(spec: str) -> list[str]:
    """`a=1,b=[5,5]` -> ["a=1", "b=[5,5]"]: commas inside brackets or braces belong to the value."""
    return [o for o in re.split(r",(?![^\[{]*[\]}])", spec) if o]


def measure(preset: str, device: str, steps: int, overrides: list[str], runs_dir: str, name: str) -> dict[str, float]:
    run = latentforge.train(preset, *overrides, f"train.device={device}", f"train.steps={steps}",
                            f"train.log_every={LOG_EVERY}", f"train.eval_every={steps}", f"checkpoint.every={steps}",
                            name=name, runs_dir=runs_dir)
    records = [r for r in run.metrics if "train/tokens_per_s" in r][1:]
    t = run.config.train
    samples_per_step = t.batch_size * t.grad_accum
    return {"tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in records),
            "steps_per_s": statistics.median(r["train/samples_per_s"] for r in records) / samples_per_step,
            "exact": run.info["last_eval"].get(run.config.checkpoint.metric, float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="multiply")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=key=value,...",
                        help="a setting to measure instead of the default ones (repeatable)")
    args = parser.parse_args()
    if args.steps < 3 * LOG_EVERY:
        parser.error(f"--steps must be at least {3 * LOG_EVERY}: the rate is the median of the {LOG_EVERY}-step "
                     "log windows after the first")
    settings = SETTINGS
    if args.setting:
        settings = {}
        for setting in args.setting:
            label, _, spec = setting.partition("=")
            settings[label] = split_overrides(spec)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    sha = git_sha() or "(not a git checkout: see the commit this tree came from)"
    print(f"device: {device_name}; torch {torch.__version__}; date {datetime.date.today()}; commit {sha}")
    extra = "".join(f' --setting "{s}"' for s in args.setting)
    print(f"command: python -m bench.multiply_speed --steps {args.steps} --device {args.device} "
          f"--preset {args.preset}{extra}\n")
    print("| setting | overrides | steps/s | tokens/s | checkpoint metric after the run |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as runs_dir:
        for i, (label, overrides) in enumerate(settings.items()):
            r = measure(args.preset, args.device, args.steps, overrides, runs_dir, f"bench{i}")
            print(f"| {label} | `{' '.join(overrides)}` | {r['steps_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['exact']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
