"""Several GPUs against one: per-step losses, scaling efficiency and cross-world-size resume.

    python -m bench.multi_gpu [--workload multiply|gpt2|all] [--steps 200] [--nproc 2] [--device cuda|cpu]
                              [--tiny] [--out DIR] [--lf KEY=VALUE ...]

For each workload (the `multiply` preset, and GPT-2-small's shape on random tokens from
bench/configs/gpt2-small.yaml) it trains, through the `latentforge` CLI as a user would:
- one process, then `dist.nproc=N` with `dist.strategy=ddp` and `fsdp`, all with the same global
  batch and `train.log_every=1`, and compares every step's loss with the one-process run's;
- from each N-process run's checkpoint at the half-way step, `latentforge resume --checkpoint HALF`
  on N processes and on one, and compares the continued losses with the uninterrupted N-process run;
- gpt2 only: N processes at N times the global batch (each GPU as busy as the single one), for
  weak scaling.
Scaling efficiency = tokens/s of all N GPUs over N x the single GPU's tokens/s (median over the
steps after the first tenth). A resumed run keeps train.steps, so its LR schedule is the original's.
Writes `multi_gpu.md` (tables), `multi_gpu.json`, `losses-<workload>.png` and the runs under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from latentforge.track.rundir import git_sha

CONFIGS = {"multiply": "multiply", "gpt2": str(Path(__file__).parent / "configs" / "gpt2-small.yaml")}
# The multiply preset trains with Muon, which FSDP refuses (it needs whole matrices): every row uses AdamW, at
# an LR whose early steps do not spike (at 3e-3 a one-step spike to the uniform loss at step ~14 is chaotic: it
# comes or not with the last bit of a bf16 sum, so the runs could not be compared step by step).
COMMON = {"multiply": ["optim.name=adamw", "optim.lr=1e-3"], "gpt2": []}
TINY = {"multiply": ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "train.batch_size=16",
                     "data.test_size=64"],
        "gpt2": ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.vocab_size=256",
                 "data.seq_len=16", "train.batch_size=8", "data.eval_rows=4"]}


@dataclass
class RunResult:
    label: str
    nproc: int
    strategy: str
    losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: float | None = None  # all processes together
    seconds: float | None = None
    error: str | None = None


def read_losses(run: Path) -> dict[int, float]:
    losses = {}
    with open(run / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "train/loss" in record:
                losses[record["step"]] = record["train/loss"]
    return losses


def read_throughput(run: Path, steps: int, nproc: int) -> float | None:
    """Median tokens/s of all processes together over the steps after the first tenth."""
    values = []
    with open(run / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "train/tokens_per_s" in record and record["step"] > steps // 10:
                values.append(record["train/tokens_per_s"] * nproc)  # logged per device
    return statistics.median(values) if values else None


def latentforge(args: list[str], log: Path) -> str | None:
    """Run `python -m latentforge ARGS`; returns the last line of its output when it fails."""
    command = [sys.executable, "-m", "latentforge", *args]
    print("$ latentforge " + shlex.join(args), flush=True)
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode == 0:
        return None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return f"exit {result.returncode}: {lines[-1] if lines else ''}"


class Bench:
    def __init__(self, out: Path, steps: int, nproc: int, device: str, tiny: bool, extra: list[str]):
        self.out, self.steps, self.nproc, self.device, self.tiny, self.extra = out, steps, nproc, device, tiny, extra
        self.half = steps // 2

    def overrides(self, workload: str) -> list[str]:
        backend = "gloo" if self.device == "cpu" else "nccl"
        return [*COMMON[workload], *(TINY[workload] if self.tiny else []), f"train.steps={self.steps}",
                "train.log_every=1", "train.eval_every=0", f"checkpoint.every={self.half}", "checkpoint.keep=10",
                f"train.device={self.device}",
                f"dist.backend={backend}", *self.extra]

    def train(self, workload: str, label: str, nproc: int, strategy: str, more: list[str] = ()) -> RunResult:
        result = RunResult(label, nproc, strategy)
        args = ["train", CONFIGS[workload], *self.overrides(workload), f"dist.nproc={nproc}",
                f"dist.strategy={strategy}", *more, "--name", label, "--runs-dir", str(self.out / "runs"),
                "--overwrite", "--quiet"]
        result.error = latentforge(args, self.out / "logs" / f"{label}.log")
        self.collect(result, workload, more)
        return result

    def resume(self, workload: str, source: str, label: str, nproc: int, strategy: str) -> RunResult:
        result = RunResult(label, nproc, strategy)
        runs = self.out / "runs"
        shutil.rmtree(runs / label, ignore_errors=True)
        shutil.copytree(runs / source, runs / label)
        args = ["resume", str(runs / label), f"dist.nproc={nproc}", "--checkpoint", str(self.half), "--quiet"]
        result.error = latentforge(args, self.out / "logs" / f"{label}.log")
        self.collect(result, workload, ())
        return result

    def collect(self, result: RunResult, workload: str, more: list[str]) -> None:
        run = self.out / "runs" / result.label
        if result.error is None:
            result.losses = read_losses(run)
            result.tokens_per_s = read_throughput(run, self.steps, result.nproc)
            info = json.loads((run / "run.json").read_text())
            result.seconds = info.get("train_seconds")


def max_difference(a: dict[int, float], b: dict[int, float], after: int = 0) -> tuple[float, int]:
    """The largest |a - b| over the steps both have beyond `after`, and how many steps that is."""
    steps = [s for s in a if s in b and s > after]
    if not steps:
        return math.nan, 0
    return max(abs(a[s] - b[s]) for s in steps), len(steps)


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def workload_tables(bench: Bench, workload: str) -> tuple[str, dict]:
    n = bench.nproc
    single = bench.train(workload, f"{workload}-1", 1, "ddp")
    runs = {"single": single}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = bench.train(workload, f"{workload}-{n}-{strategy}", n, strategy)
    lines = [f"#### {workload}: per-step losses against one process ({bench.steps} steps, same global batch)", "",
             "| run | processes | max abs loss difference (steps) | final loss | tokens/s (all GPUs) "
             "| scaling efficiency |", "|---|---|---|---|---|---|"]
    for key, r in runs.items():
        if r.error:
            lines.append(f"| {r.label} | {r.nproc} | error: {r.error} | | | |")
            continue
        diff, count = max_difference(r.losses, single.losses)
        eff = (r.tokens_per_s / (r.nproc * single.tokens_per_s)
               if r.tokens_per_s and single.tokens_per_s else None)
        final = r.losses.get(bench.steps)
        lines.append(f"| {r.label} | {r.nproc} | {fmt(diff, '.2e')} ({count}) | {fmt(final, '.4f')} "
                     f"| {fmt(r.tokens_per_s, ',.0f')} | {fmt(eff, '.2f') if key != 'single' else '1 (reference)'} |")
    lines += ["", f"#### {workload}: resume the {n}-process checkpoint of step {bench.half} on {n} and on 1 process",
              "", "| resumed run | from | processes | max abs loss difference after the resume (steps) |",
              "|---|---|---|---|"]
    for strategy in ("ddp", "fsdp"):
        source = runs[strategy]
        if source.error:
            continue
        for nproc in (n, 1):
            label = f"{source.label}-resumed-on-{nproc}"
            r = bench.resume(workload, source.label, label, nproc, strategy)
            runs[label] = r
            if r.error:
                lines.append(f"| {label} | {source.label} | {nproc} | error: {r.error} |")
                continue
            diff, count = max_difference(r.losses, source.losses, after=bench.half)
            lines.append(f"| {label} | {source.label} step {bench.half} | {nproc} | {fmt(diff, '.2e')} ({count}) |")
    if workload == "gpt2":
        lines += ["", f"#### {workload}: weak scaling ({n} processes, {n}x the global batch: each GPU's share "
                  "equals the single run's batch)", "", "| run | tokens/s (all GPUs) | scaling efficiency |",
                  "|---|---|---|"]
        config = yaml.safe_load((bench.out / "runs" / single.label / "config.yaml").read_text())
        batch = config["train"]["batch_size"]
        for strategy in ("ddp", "fsdp"):
            label = f"{workload}-{n}-{strategy}-weak"
            r = bench.train(workload, label, n, strategy, [f"train.batch_size={batch * n}"])
            runs[label] = r
            eff = (r.tokens_per_s / (n * single.tokens_per_s) if r.tokens_per_s and single.tokens_per_s else None)
            lines.append(f"| {label} | {fmt(r.tokens_per_s, ',.0f')} | {fmt(eff, '.2f')} |"
                         if not r.error else f"| {label} | error: {r.error} | |")
    plot_losses(bench.out / f"losses-{workload}.png", workload, runs)
    return "\n".join(lines), {k: asdict(v) for k, v in runs.items()}


def plot_losses(path: Path, workload: str, runs: dict[str, RunResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = runs["single"].losses
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in runs.values():
        if not r.losses or r.label.endswith("-weak"):
            continue
        steps = sorted(r.losses)
        top.plot(steps, [r.losses[s] for s in steps], label=r.label, linewidth=1)
        common = [s for s in steps if s in single]
        if r is not runs["single"]:
            bottom.plot(common, [r.losses[s] - single[s] for s in common], label=r.label, linewidth=1)
    top.set_ylabel("train loss")
    top.set_title(f"{workload}: every run's per-step loss")
    top.legend(fontsize=7)
    bottom.set_ylabel("loss - one process's")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["multiply", "gpt2", "all"], default="all")
    parser.add_argument("--steps", type=int, help="steps per run (default 200; 6 with --tiny)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="tiny dims that run in seconds (default: on with --device cpu)")
    parser.add_argument("--out", type=Path, default=Path("bench-multi-gpu"))
    parser.add_argument("--lf", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. train.compile=true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        parser.error(f"--nproc {args.nproc} needs {args.nproc} GPUs; {torch.cuda.device_count()} visible")
    tiny = args.device == "cpu" if args.tiny is None else args.tiny
    steps = args.steps or (6 if tiny else 200)
    if steps < 2 or steps % 2:
        parser.error("--steps must be an even number >= 2 (the resumes start half-way)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    bench = Bench(args.out, steps, args.nproc, args.device, tiny, args.lf)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    command = "python -m bench.multi_gpu " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = (f"device: {args.nproc} x {name}; torch {torch.__version__}; date {datetime.date.today()}; "
              f"commit {git_sha() or '?'}\ncommand: `{command}`")
    sections, results = [header], {"device": name, "nproc": args.nproc, "command": command, "steps": steps,
                                   "workloads": {}}
    for workload in ("multiply", "gpt2"):
        if args.workload in (workload, "all"):
            text, runs = workload_tables(bench, workload)
            print("\n" + text, flush=True)
            sections.append(text)
            results["workloads"][workload] = runs
            (args.out / "multi_gpu.md").write_text("\n\n".join(sections) + "\n")
            (args.out / "multi_gpu.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
