"""The `latentforge` command: one subcommand per user action."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from latentforge import api
from latentforge.config import list_presets
from latentforge.engine.distributed import reports_run
from latentforge.errors import ConfigError, LatentforgeError, TrainingStopped
from latentforge.launch.local import failure_lines, plan_sweep, run_sweep, summary_rows
from latentforge.launch.report import build_report, print_report, print_rows, save_report
from latentforge.launch.slurm import (
    launch_slurm,
    plan_slurm_sweep,
    slurm_parameters,
    split_slurm_settings,
    submit_sweep,
)
from latentforge.launch.sweep import expand_sweep
from latentforge.track.compare import compare_rows, print_comparison, save_comparison
from latentforge.track.listing import duration, list_runs, print_table, sort_runs, status_text
from latentforge.track.rundir import default_runs_dir
from latentforge.track.wandb_sync import sync_run

app = typer.Typer(
    help="latentforge: train, resume, list and evaluate research models whose interesting part is a latent.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
runs_app = typer.Typer(help="List runs, or show one run.", invoke_without_command=True, no_args_is_help=False)
app.add_typer(runs_app, name="runs")

out = Console()
err = Console(stderr=True)

RunsDir = typer.Option(None, "--runs-dir", help="Where runs live (default ./runs or $LATENTFORGE_RUNS).")
Quiet = typer.Option(False, "--quiet", "-q", help="No progress bar or status lines.")
Overrides = typer.Argument(None, help="Config overrides: section.key=value ...", show_default=False)
RunArg = typer.Argument(..., help="A run directory or run id.")
Checkpoint = typer.Option("latest", "--checkpoint", help="latest, best or a step number.")
Device = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")
AsJson = typer.Option(False, "--json", help="Print the output as JSON.")
Ema = typer.Option(False, "--ema", help="Use the checkpoint's EMA weights (kept when trained with train.ema_decay).")


def user_errors(fn: Callable) -> Callable:
    """Bad input becomes one line on stderr and exit code 2; an unstable run exits 1; Ctrl-C 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LatentforgeError as e:
            err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except TrainingStopped as e:
            err.print(f"[red]stopped:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("aborted (second Ctrl-C): no checkpoint written for the current step")
            raise typer.Exit(130) from None

    return wrapper


def _where(run: api.Run, quiet: bool) -> None:
    if quiet or not reports_run():
        return
    info = run.info
    best = info.get("best")
    status = status_text(info["status"], info.get("stopped_by"))
    out.print(f"run {run.id}: {status} at step {info.get('step')}/{info.get('total_steps')}"
              + (f", best {best['metric']}={best['value']:.4f} at step {best['step']}" if best else ""))
    out.print(f"  run directory  {run.path}\n  metrics        {run.dir.metrics_path}\n"
              f"  checkpoints    {run.dir.checkpoints}\n  plots          {run.dir.artifacts}\n"
              f"  tensorboard    tensorboard --logdir {run.dir.tb}")


def _print_lines(lines: dict[str, str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(lines, indent=2))
        return
    width = max(map(len, lines))
    for key, value in lines.items():
        out.print(f"{key:<{width}}  {value}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def train(
    config: str = typer.Argument(..., help="A preset (e.g. multiply, multiply/tiny) or a YAML file."),
    overrides: Optional[list[str]] = Overrides,
    name: Optional[str] = typer.Option(None, "--name", help="Run id (default: <preset>-<date>-<hex>)."),
    runs_dir: Optional[Path] = RunsDir,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run of the same name."),
    quiet: bool = Quiet,
) -> None:
    """Train a new run from a preset or YAML file, with key=value overrides."""
    run = api.train(config, *(overrides or []), name=name, runs_dir=runs_dir, overwrite=overwrite, quiet=quiet)
    _where(run, quiet)
    if run.status == "interrupted":
        raise typer.Exit(130)


@app.command()
@user_errors
def resume(
    run: str = typer.Argument(..., help="A run directory, run id, or remote run URL (s3://bucket/prefix/RUN)."),
    overrides: Optional[list[str]] = Overrides,
    checkpoint: str = Checkpoint,
    runs_dir: Optional[Path] = RunsDir,
    quiet: bool = Quiet,
) -> None:
    """Continue a run from its latest checkpoint to the configured end (train.steps=N extends it).

    \b
    A remote run (checkpoint.remote) resumes on any machine: latentforge resume s3://bucket/prefix/RUN
    (S3-compatible servers: set AWS_ENDPOINT_URL)."""
    result = api.resume(run, *(overrides or []), checkpoint=checkpoint, runs_dir=runs_dir, quiet=quiet)
    _where(result, quiet)
    if result.status == "interrupted":
        raise typer.Exit(130)


@app.command("lr-find")
@user_errors
def lr_find(
    config: str = typer.Argument(..., help="A preset (e.g. multiply, multiply/tiny) or a YAML file."),
    overrides: Optional[list[str]] = Overrides,
    steps: int = typer.Option(100, "--steps", help="Steps of the sweep (it stops early once the loss diverges)."),
    min_lr: float = typer.Option(1e-7, "--min-lr", help="The LR of the first step."),
    max_lr: float = typer.Option(1.0, "--max-lr", help="The LR of the last step."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where lr_find.csv and lr_find.png go "
                                           "(default <runs-dir>/lr-find/<label>-<time>/)."),
    runs_dir: Optional[Path] = RunsDir,
    quiet: bool = Quiet,
    as_json: bool = AsJson,
) -> None:
    """Find a learning rate: train with the LR growing exponentially from --min-lr to --max-lr and
    suggest the LR where the smoothed loss falls fastest. No run is created; the model is discarded."""
    result = api.lr_find(config, *(overrides or []), steps=steps, min_lr=min_lr, max_lr=max_lr, out=out_dir,
                         runs_dir=runs_dir, quiet=quiet or as_json)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(f"suggested lr {result['suggestion']:.3g} (steepest descent of the smoothed loss); lowest loss "
              f"{result['min_loss']:.4g} at lr {result['min_loss_lr']:.3g}", highlight=False, soft_wrap=True)
    if not quiet:
        if result["stopped"]:
            out.print(f"stopped after {result['steps']} steps: {result['stopped']}", highlight=False, soft_wrap=True)
        out.print(f"saved {result['csv']} and {result['png']}", highlight=False, soft_wrap=True)


Slurm = typer.Option(None, "--slurm", help="Submit to Slurm instead: key=value (partition, gpus, nodes, time, "
                     "cpus_per_task, mem, account, qos, constraint, ...); repeat it, or quote several.")


@app.command()
@user_errors
def launch(
    config: str = typer.Argument(..., help="A preset (e.g. multiply, multiply/tiny) or a YAML file."),
    overrides: Optional[list[str]] = Overrides,
    name: Optional[str] = typer.Option(None, "--name", help="Run id (default: <preset>-<date>-<hex>)."),
    runs_dir: Optional[Path] = RunsDir,
    slurm: Optional[list[str]] = Slurm,
    local: bool = typer.Option(False, "--local", help="Train here, in the foreground (the default)."),
    quiet: bool = Quiet,
) -> None:
    """Train a run here (--local, the default), or submit it as a Slurm job that checkpoints and requeues
    itself before its time limit: --slurm partition=gpu gpus=8 time=4:00:00."""
    overrides, slurm = split_slurm_settings(overrides or [], slurm or [])
    if local and slurm:
        raise ConfigError("--local trains here and --slurm submits to Slurm: give one of them")
    if not slurm:
        train(config, overrides, name, runs_dir, overwrite=False, quiet=quiet)
        return
    job = launch_slurm(config, overrides or [], slurm, name, runs_dir)
    out.print(f"submitted run {job.run.name} as Slurm job {job.job_id}\n  run directory  {job.run}\n"
              f"  sbatch script  {job.script}\n  log            {job.log} (and .err)\n"
              f"  follow         squeue -j {job.job_id}; latentforge runs show {job.run}",
              highlight=False, soft_wrap=True)


@app.command("eval")
@user_errors
def eval_command(
    run: str = RunArg,
    overrides: Optional[list[str]] = typer.Argument(None, help="data.eval_batch_size=N or data.eval_files={...} "
                                                    "for this evaluation.", show_default=False),
    checkpoint: str = Checkpoint,
    split: Optional[list[str]] = typer.Option(None, "--split", help="Split(s) to evaluate (default: the run's)."),
    device: str = Device,
    ema: bool = Ema,
    runs_dir: Optional[Path] = RunsDir,
    quiet: bool = Quiet,
    as_json: bool = AsJson,
    all_checkpoints: bool = typer.Option(False, "--all-checkpoints", help="Evaluate every kept checkpoint and "
                                         "write the metrics into the run's metrics.jsonl at their steps."),
) -> None:
    """Evaluate a checkpoint; prints the metrics and saves them in the run's artifacts/. With
    --all-checkpoints: every kept checkpoint, its metrics written into the run's curves."""
    if all_checkpoints:
        if overrides:
            raise ConfigError("--all-checkpoints writes into the run's curves, which its own config made: "
                              "leave out the overrides")
        _eval_all(run, checkpoint, split, device, ema, runs_dir, quiet, as_json)
        return
    metrics, path = api.evaluate_run(run, checkpoint, split, runs_dir, device, ema, quiet=quiet or as_json,
                                     overrides=overrides or ())
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    table = Table(show_edge=False, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)
    if not quiet:
        out.print(f"saved {path}")


def _eval_all(run: str, checkpoint: str, split: Optional[list[str]], device: str, ema: bool,
              runs_dir: Optional[Path], quiet: bool, as_json: bool) -> None:
    if checkpoint != "latest":
        raise ConfigError("--all-checkpoints evaluates every kept checkpoint: leave out --checkpoint")
    rows = api.evaluate_all_checkpoints(run, split, runs_dir, device, ema, quiet=quiet or as_json)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k.count("/") == 1]
    table = Table(show_edge=False, header_style="bold")
    for key in ["step", *keys, "written"]:
        table.add_column(key, justify="right")
    for row in rows:
        written = row.get("note") or f"{row['new']} new"
        table.add_row(str(row["step"]), *(f"{row[k]:.4f}" if k in row else "-" for k in keys), written)
    out.print(table)
    if not quiet:
        written = sum(row["new"] > 0 for row in rows)
        where = api.Run(run, runs_dir).dir.metrics_path
        out.print(f"wrote the metrics of {written} of {len(rows)} checkpoints into {where}", highlight=False,
                  soft_wrap=True)


@app.command()
@user_errors
def predict(
    run: str = RunArg,
    text: str = typer.Argument(..., help='The input, e.g. "1234*5678" for multiply.'),
    checkpoint: str = Checkpoint,
    device: str = Device,
    ema: bool = Ema,
    runs_dir: Optional[Path] = RunsDir,
    as_json: bool = AsJson,
) -> None:
    """The model's output for one input (for multiply: its answer, its chain, and the true product)."""
    _print_lines(api.predict(run, text, checkpoint, runs_dir, device, ema), as_json)


@app.command("generate")
@user_errors
def generate_command(
    run: str = RunArg,
    prompt: str = typer.Argument(..., help='The text to continue, e.g. "def fibonacci(n):".'),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0: greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the K likeliest tokens (0: all)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Sample among the likeliest tokens holding mass P (1: all)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: one seed, one text."),
    checkpoint: str = Checkpoint,
    device: str = Device,
    runs_dir: Optional[Path] = RunsDir,
) -> None:
    """Print a prompt and the language model's continuation of it (lm runs; sampled with a KV cache)."""
    text = api.generate(run, prompt, max_new_tokens, temperature, top_k, top_p, seed, checkpoint, runs_dir, device)
    print(prompt + text)


@app.command("export")
@user_errors
def export_command(
    run: str = RunArg,
    out_dir: Path = typer.Argument(..., help="The directory to write."),
    fmt: str = typer.Option("hf", "--format", help="hf: a transformers checkpoint (config.json, model.safetensors)."),
    checkpoint: str = Checkpoint,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty directory."),
    runs_dir: Optional[Path] = RunsDir,
) -> None:
    """Write a run's model as a transformers checkpoint that AutoModelForCausalLM.from_pretrained(DIR) loads
    with the same logits (lm runs; an HF tokenizer is copied alongside)."""
    path = api.export(run, out_dir, fmt, checkpoint, runs_dir, overwrite)
    out.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def compare(
    runs: list[str] = typer.Argument(..., help="Run directories or run ids.", show_default=False),
    split: Optional[str] = typer.Option(None, "--split", help="Split to compare (default: checkpoint.metric's)."),
    out_dir: Path = typer.Option(Path("artifacts"), "--out", help="Where to save compare-<time>.csv and .png."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (the files are still saved)."),
    runs_dir: Optional[Path] = RunsDir,
) -> None:
    """Compare runs: size, FLOPs, training time and exact match per digit length and per parameter."""
    rows = compare_rows([api.Run(run, runs_dir) for run in runs], split)
    paths = save_comparison(rows, out_dir)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_comparison(rows, out)
    for path in paths:
        (err if as_json else out).print(f"saved {path}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def sweep(
    target: str = typer.Argument(..., metavar="FILE|report", help="A sweep file to run, or the word report."),
    directory: Optional[Path] = typer.Argument(None, metavar="DIR", show_default=False,
                                               help="After report: a directory of runs (or its name in --runs-dir)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, help="Run N points at a time (default 1)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each point and what would be done; start nothing."),
    metric: Optional[str] = typer.Option(None, "--metric", help="report: the metric (default: sweep.yaml's "
                                         "report.metric, else the runs' checkpoint.metric)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="report: min or max, which end is better (default: "
                                       "what goes with that metric in sweep.yaml or checkpoint.mode)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="report: where report.csv and the PNGs go "
                                           "(default: DIR)."),
    slurm: Optional[list[str]] = Slurm,
    slurm_parallel: Optional[int] = typer.Option(None, "--slurm-parallel", min=1,
                                                 help="With --slurm: run at most N points at a time."),
    local: bool = typer.Option(False, "--local", help="Run the points on this machine (the default)."),
    runs_dir: Optional[Path] = RunsDir,
    quiet: bool = Quiet,
) -> None:
    """Run a grid of training runs from a sweep file, or report on a directory of runs.

    \b
    latentforge sweep FILE [--local] [--parallel N] [--dry-run]
        trains every point of FILE as its own `latentforge train` process in <runs-dir>/<name>/
        (logs in <name>/logs/); run it again to continue: finished runs are skipped, stopped ones
        resumed. Ctrl-C stops every run with a checkpoint.
    latentforge sweep FILE --slurm "partition=gpu gpus=1 time=2:00:00" [--slurm-parallel N] [--dry-run]
        submits every point that is not finished (nor still queued) as one Slurm job array, each into
        the same run directory as above; run it again to resubmit what did not finish.
    latentforge sweep report DIR [--metric M] [--mode min|max] [--out DIR]
        each run's best metric: a table, report.csv and report-<x>.png (best metric vs x).

    \b
    A sweep file (YAML):
      name: d-model            # the sweep directory (default: the file's name)
      config: multiply/tiny    # a preset or YAML file, or a list of them (a grid axis named config)
      overrides: \\[train.steps=2000]          # for every point
      grid: {model.d_model: [32, 64], optim.lr: [1e-3, 3e-3]}   # every combination
      report: {metric: test/loss, mode: min, x: \\[params], curves: optim.lr}
    """
    if local and slurm:
        raise ConfigError("--local runs the sweep here and --slurm submits it to Slurm: give one of them")
    if target == "report":
        if directory is None:
            raise ConfigError("sweep report needs a directory of runs: latentforge sweep report DIR")
        if parallel is not None or dry_run or slurm or slurm_parallel is not None:
            raise ConfigError("--parallel, --slurm and --dry-run are for running a sweep file, not for sweep report")
        _report_sweep(directory, runs_dir, metric, mode, out_dir)
        return
    if directory is not None:
        raise ConfigError(f"unexpected argument {directory} after the sweep file "
                          f"(to report on a directory: latentforge sweep report {directory})")
    if metric is not None or mode is not None or out_dir is not None:
        raise ConfigError("--metric, --mode and --out are for latentforge sweep report DIR")
    if slurm:
        if parallel is not None:
            raise ConfigError("--parallel runs points here; with --slurm, --slurm-parallel N limits the array")
        _submit_sweep(Path(target), slurm, slurm_parallel, dry_run, runs_dir)
        return
    if slurm_parallel is not None:
        raise ConfigError("--slurm-parallel goes with --slurm")
    _run_sweep(Path(target), parallel or 1, dry_run, runs_dir, quiet)


def _submit_sweep(file: Path, slurm: list[str], parallel: Optional[int], dry_run: bool,
                  runs_dir: Optional[Path]) -> None:
    plan = expand_sweep(file)
    if dry_run:
        slurm_parameters(slurm, plan.name)
        sweep_dir, jobs = plan_slurm_sweep(plan, default_runs_dir(runs_dir))
        for job in jobs:
            out.print(f"{job.point.run_id}  ({job.action})  {job.point.config} {' '.join(job.point.overrides)}",
                      highlight=False, markup=False, soft_wrap=True)
        out.print(f"{len(jobs)} points in {sweep_dir}/; nothing submitted (dry run)", highlight=False)
        return
    sweep_dir, jobs, submitted = submit_sweep(plan, default_runs_dir(runs_dir), slurm, parallel)
    idle = len(jobs) - len(submitted)
    if not submitted:
        out.print(f"nothing to submit: all {len(jobs)} runs of {sweep_dir} are finished, or queued or running "
                  f"in Slurm", highlight=False, soft_wrap=True)
    else:
        first = submitted[0]
        out.print(f"submitted {len(submitted)} runs of sweep {plan.name} as one Slurm job "
                  f"({first.job_id.split('_')[0]})" + (f"; {idle} need no work" if idle else ""), highlight=False)
        for job in submitted:
            out.print(f"  {job.run.name}  job {job.job_id}", highlight=False, markup=False)
        out.print(f"  sbatch script  {first.script}\n  logs           {first.log.parent}/", highlight=False,
                  soft_wrap=True)
    out.print(f"report: latentforge sweep report {sweep_dir}", highlight=False, soft_wrap=True)


def _run_sweep(file: Path, parallel: int, dry_run: bool, runs_dir: Optional[Path], quiet: bool) -> None:
    plan = expand_sweep(file)
    if dry_run:
        sweep_dir, jobs = plan_sweep(plan, default_runs_dir(runs_dir))
        for job in jobs:
            out.print(f"{job.point.run_id}  ({job.action})  {job.point.config} {' '.join(job.point.overrides)}",
                      highlight=False, markup=False, soft_wrap=True)
        out.print(f"{len(jobs)} points in {sweep_dir}/; nothing started (dry run)", highlight=False)
        return
    result = run_sweep(plan, default_runs_dir(runs_dir), parallel, None if quiet else out)
    rows, best_label = summary_rows(plan, result)
    print_rows(rows, plan.keys, best_label, out, f"sweep {plan.name}: {result.sweep_dir}")
    again = f"latentforge sweep {file}" + (f" --runs-dir {runs_dir}" if runs_dir else "")
    problems = failure_lines(result)
    for line in problems:
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    if result.interrupted:
        err.print(f"interrupted: the running runs saved a checkpoint; continue the sweep with: {again}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    if problems:
        err.print(f"{len(problems)} of {len(rows)} runs did not finish; to retry them: {again}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if not quiet:
        out.print(f"all {len(rows)} runs finished; report: latentforge sweep report {result.sweep_dir}",
                  highlight=False, soft_wrap=True)


def _report_sweep(directory: Path, runs_dir: Optional[Path], metric: Optional[str], mode: Optional[str],
                  out_dir: Optional[Path]) -> None:
    if not directory.is_dir() and (default_runs_dir(runs_dir) / directory).is_dir():
        directory = default_runs_dir(runs_dir) / directory
    report = build_report(directory, metric, mode)
    print_report(report, out)
    for path in save_report(report, out_dir or directory):
        out.print(f"saved {path}", highlight=False, soft_wrap=True)


@runs_app.callback()
@user_errors
def runs(
    ctx: typer.Context,
    sort: str = typer.Option("date", "--sort", help="date, step, loss or an eval metric (e.g. test/exact_match)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Show at most N runs."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as JSON."),
    runs_dir: Optional[Path] = RunsDir,
    quiet: bool = Quiet,
) -> None:
    """List runs: id, task, status, step/total, best metric, last loss, started, host."""
    if ctx.invoked_subcommand is not None:
        return
    directory = default_runs_dir(runs_dir)
    rows = sort_runs(list_runs(directory), sort)[:limit]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        out.print(f"no runs in {directory}/")
    else:
        metric = sort if sort not in ("date", "step", "loss") else None
        print_table(rows, out, metric)


@runs_app.command("show")
@user_errors
def runs_show(
    run: str = RunArg,
    runs_dir: Optional[Path] = RunsDir,
    quiet: bool = Quiet,
) -> None:
    """One run's config summary, status and final metrics."""
    r = api.Run(run, runs_dir)
    info, cfg = r.info, r.config
    best = info.get("best")
    rows = [
        ("run", r.id), ("path", str(r.path)), ("status", status_text(info["status"], info.get("stopped_by"))),
        ("task", cfg.task.name),
        ("source", f"{info.get('source', '')} {' '.join(info.get('overrides', []))}".strip()),
        ("step", f"{info.get('step', 0)}/{info.get('total_steps')}"),
        ("best", f"{best['metric']}={best['value']:.4f} at step {best['step']}" if best else "-"),
        ("last loss", f"{info['last_loss']:.4f}" if info.get("last_loss") is not None else "-"),
        ("duration", duration(info)), ("host", info.get("host", "")), ("device", info.get("device", "")),
        ("params", f"{info['params']:,}" if info.get("params") else "-"),
        ("git", info.get("git_sha") or "-"), ("torch", info.get("torch", "-")),
        ("checkpoints", ", ".join(map(str, r.checkpoints())) or "-"),
        ("model", ", ".join(f"{k}={v}" for k, v in cfg.to_dict()["model"].items())),
        ("optim", ", ".join(f"{k}={v}" for k, v in cfg.to_dict()["optim"].items())),
        ("train", ", ".join(f"{k}={v}" for k, v in cfg.to_dict()["train"].items() if k != "guard")),
    ]
    if info.get("error"):
        rows.append(("error", info["error"]))
    table = Table(show_header=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    last_eval = info.get("last_eval") or {}
    if last_eval:
        metrics = Table(title=f"metrics at step {last_eval.get('step')}", show_edge=False, header_style="bold")
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for key, value in last_eval.items():
            if key != "step":
                metrics.add_row(key, f"{value:.4f}")
        out.print(metrics)


@runs_app.command("sync")
@user_errors
def runs_sync(
    run: str = RunArg,
    to: str = typer.Option(..., "--to", help="Where to: wandb."),
    project: Optional[str] = typer.Option(None, "--project", help="W&B project (default: the run's "
                                          "track.wandb_project)."),
    entity: Optional[str] = typer.Option(None, "--entity", help="W&B entity (default: the run's track.wandb_entity, "
                                         "else your default)."),
    runs_dir: Optional[Path] = RunsDir,
) -> None:
    """Upload a run to W&B: its config, metrics.jsonl (each record at its step) and artifacts/. Syncing
    again continues the same W&B run and sends only the new steps (WANDB_MODE=offline is honoured)."""
    if to != "wandb":
        raise ConfigError(f"--to must be wandb (got {to!r})")
    r = api.Run(run, runs_dir)
    result = sync_run(r.dir, r.config, project, entity)
    where = f"W&B run {result['id']} in {result['destination']}"
    if result["nothing_new"]:
        out.print(f"nothing new: {where} already has every step up to {result['step']}", highlight=False,
                  soft_wrap=True)
        return
    sent = (f"steps {result['from_step']}..{result['to_step']} ({result['sent_steps']} steps)"
            if result["sent_steps"] else "no new steps")
    out.print(f"synced {r.id} to {where}: {sent}, {result['images']} images, {result['files']} other files",
              highlight=False, soft_wrap=True)
    if result["mode"] == "offline":
        out.print(f"  offline: upload it with `wandb sync {result['sync_dir']}`", highlight=False, soft_wrap=True)
    elif result["url"]:
        out.print(f"  {result['url']}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def encode(
    run: str = RunArg,
    path: str = typer.Argument(..., help="An input file, e.g. an ARC grid as JSON for dvae."),
    checkpoint: str = Checkpoint,
    device: str = Device,
    ema: bool = Ema,
    runs_dir: Optional[Path] = RunsDir,
    as_json: bool = AsJson,
) -> None:
    """The model's discrete code for an input (dvae: a grid's codes, and whether they reconstruct it)."""
    _print_lines(api.encode(run, path, checkpoint, runs_dir, device, ema), as_json)


@app.command()
@user_errors
def decode(
    run: str = RunArg,
    codes: str = typer.Argument(..., help='The codes, e.g. "3 17 250 ..." (as `encode` prints them).'),
    checkpoint: str = Checkpoint,
    device: str = Device,
    ema: bool = Ema,
    runs_dir: Optional[Path] = RunsDir,
    as_json: bool = AsJson,
) -> None:
    """Render what the model decodes from a code (dvae: the grid)."""
    _print_lines(api.decode(run, codes, checkpoint, runs_dir, device, ema), as_json)


@app.command()
@user_errors
def probe(
    run: str = RunArg,
    checkpoint: str = Checkpoint,
    split: str = typer.Option("test", "--split", help="Split whose sequences are probed."),
    method: str = typer.Option("logistic", "--method", help="logistic (L-BFGS) or ridge (closed form)."),
    examples: int = typer.Option(500, "--examples", help="Sequences (examples) to probe."),
    device: str = Device,
    ema: bool = Ema,
    runs_dir: Optional[Path] = RunsDir,
    as_json: bool = AsJson,
) -> None:
    """Linear probes on every layer's hidden states for the task's latent variables (gssm: each
    hidden node's state, beside the Bayes ceiling); writes probe.csv and probe.png to artifacts/
    (artifacts/ema/ with --ema)."""
    rows, where = api.probe(run, checkpoint, split, method, examples, runs_dir, device, ema)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(show_edge=False, header_style="bold", title=f"probe accuracy at step {rows[0]['step']}")
    columns = [key for key in rows[0] if key != "step"]
    for key in columns:
        table.add_column(key, justify="left" if key == "node" else "right")
    for row in rows:
        table.add_row(*(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in columns))
    out.print(table)
    out.print(f"saved {where / 'probe.csv'} and {where / 'probe.png'}", highlight=False, soft_wrap=True)


data_app = typer.Typer(help="Write datasets to disk.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("generate")
@user_errors
def data_generate(
    config: str = typer.Argument(..., help="A preset (e.g. gssm/sparse) or a YAML file."),
    overrides: Optional[list[str]] = Overrides,
    out_file: Path = typer.Option(..., "--out", help="The file to write (e.g. sparse.npz)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    device: str = typer.Option("auto", "--device", help="Where to generate: auto, cpu, cuda or mps."),
) -> None:
    """Generate the finite dataset a config trains on and write it to one file; train from it with
    data.path=FILE (gssm: data.train_sequences=N sequences plus the test set, with optimal losses)."""
    _print_lines(api.generate_data(config, *(overrides or []), out=out_file, overwrite=overwrite, device=device),
                 as_json=False)


@data_app.command("build")
@user_errors
def data_build(
    sources: list[str] = typer.Argument(..., help="Text: .txt/.jsonl files (jsonl: a \"text\" field per line), "
                                        "directories of them, or quoted globs ('lib/**/*.py')."),
    out_dir: Path = typer.Option(..., "--out", help="The shard directory to write."),
    tokenizer: str = typer.Option("bytes", "--tokenizer", help="bytes, a tokenizer.json, or an HF directory."),
    shard_tokens: Optional[int] = typer.Option(None, "--shard-tokens", help="Tokens per shard (default 4M)."),
    shard_sequences: Optional[int] = typer.Option(None, "--shard-sequences", help="Documents per shard."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out directory."),
    quiet: bool = Quiet,
) -> None:
    """Tokenize text into WebDataset tar shards plus manifest.jsonl; train on them with
    data.sources='[{path: DIR}]'."""
    from latentforge.data.shards import build_shards

    _print_lines(build_shards(sources, out_dir, tokenizer, shard_tokens, shard_sequences, force, not quiet),
                 as_json=False)


tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
@user_errors
def tokenizer_train(
    files: list[str] = typer.Argument(..., help="Text: .txt/.jsonl files, directories of them, or quoted globs."),
    vocab: int = typer.Option(..., "--vocab", help="Vocabulary size (256 bytes + <|endoftext|> + merges)."),
    out_file: Path = typer.Option(..., "--out", help="The tokenizer.json to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Train a byte-level BPE tokenizer (HF tokenizers); use it with --tokenizer PATH or data.tokenizer=PATH."""
    from latentforge.data.rawtext import expand, read_documents
    from latentforge.data.tokenizer import train_tokenizer

    if out_file.exists() and not force:
        raise ConfigError(f"{out_file} exists; pass --force to replace it")
    paths = [p for f in files for p in expand(f)]
    tok = train_tokenizer((doc for p in paths for doc in read_documents(p)), vocab, out_file)
    _print_lines({"out": str(out_file), "vocab": str(tok.vocab_size), "eos": str(tok.eos_id),
                  "files": str(len(paths))}, as_json=False)


@app.command()
def presets() -> None:
    """List the built-in presets."""
    for name in list_presets():
        out.print(name)


def main() -> None:
    # Keep rich's output plain when it goes to a file or a pipe.
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "200")
    app()


if __name__ == "__main__":
    main()
