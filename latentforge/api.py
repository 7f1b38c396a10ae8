"""The operations behind the CLI, callable from Python and notebooks.

    run = latentforge.train("multiply/tiny", **{"train.steps": 50})
    run = latentforge.load_run(run.path)
    run.config, run.metrics, run.model()
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentforge.config import Config, apply_overrides, load_config, read_config
from latentforge.engine.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from latentforge.engine.distributed import env_from_environ, on_main, run_torchrun, under_torchrun_needed
from latentforge.engine.ema import PREFIX as EMA_PREFIX
from latentforge.engine.ema import ema_weights
from latentforge.engine.eval_all import evaluate_all
from latentforge.engine.loop import (
    Trainer,
    autocast,
    build_task_and_model,
    check_distributed,
    evaluate,
    load_model_state,
    load_weights,
    resolve_device,
)
from latentforge.engine.lr_find import lr_find as engine_lr_find
from latentforge.engine.task import Task
from latentforge.errors import ConfigError, RunError
from latentforge.tasks import get_task
from latentforge.track.files import write_atomic, write_json
from latentforge.track.listing import effective_status
from latentforge.track.progress import TrainProgress
from latentforge.track.remote import fetch_run
from latentforge.track.rundir import RunDir, default_runs_dir, new_run_id


def _override_list(overrides: tuple[str, ...] | list[str], kw: dict[str, Any]) -> list[str]:
    """Dotted strings, plus keyword overrides written as `train__steps=5` or `**{"train.steps": 5}`."""
    # JSON is YAML, so numbers, booleans, lists and quoted strings keep their types.
    return list(overrides) + [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in kw.items()]


# What an evaluation of a trained run may set for itself: how it batches, and extra held-out files (multiply).
# The rest of data.* (seeds, splits' sizes, layouts) would change what is scored.
EVAL_OVERRIDES = ("data.eval_batch_size", "data.eval_files")


def eval_config(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A trained run's config with EVAL_OVERRIDES items for one evaluation; anything that would change what is
    scored (another key, a split of eval_files given another file) is one ConfigError."""
    allowed = [key for key in EVAL_OVERRIDES if hasattr(cfg.data, key.split(".", 1)[1])]
    for item in overrides:
        if item.split("=", 1)[0] not in allowed:
            hint = " (a split is chosen with --split NAME)" if "=" not in item else ""
            takes = ", ".join(allowed) if allowed else "no overrides"
            raise ConfigError(f"{item!r}: an evaluation of this {cfg.task.name} run takes {takes}; nothing that "
                              f"changes what is scored{hint}")
    new = apply_overrides(cfg, list(overrides))
    before = getattr(cfg.data, "eval_files", {})
    for name, path in getattr(new.data, "eval_files", {}).items():
        if name in before and before[name] != path:
            raise ConfigError(f"data.eval_files: {name!r} is this run's name for {before[name]}; give {path} "
                              f"another name")
    return new


class Run:
    """A run directory read back: its record, config, metrics and checkpoints."""

    def __init__(self, path: str | Path, runs_dir: str | Path | None = None):
        self.dir = RunDir.find(path, runs_dir)

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def id(self) -> str:
        return self.dir.id

    @property
    def info(self) -> dict[str, Any]:
        info = self.dir.info()
        info["status"] = effective_status(info)
        return info

    @property
    def status(self) -> str:
        return self.info["status"]

    @property
    def config(self) -> Config:
        return read_config(self.dir.config_path)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self.dir.read_metrics()

    def checkpoints(self) -> list[int]:
        return list_checkpoints(self.dir.checkpoints)

    def checkpoint_path(self, checkpoint: str | int = "latest") -> Path:
        best = (self.dir.info().get("best") or {}).get("step")
        return resolve_checkpoint(self.dir.checkpoints, checkpoint, best)

    def load(self, checkpoint: str | int = "latest", device: str = "cpu", ema: bool = False,
             overrides: list[str] | tuple[str, ...] = ()) -> tuple[Task, nn.Module, int]:
        """The task and the model with a checkpoint's weights (its EMA weights if `ema`), in
        eval mode, and that step. `overrides`: EVAL_OVERRIDES items for this load only."""
        cfg = self.config
        if overrides:
            cfg = eval_config(cfg, overrides)
        path = self.checkpoint_path(checkpoint)
        task, model = build_task_and_model(cfg, resolve_device(device), path)
        state = load_checkpoint(path)
        if ema:
            load_model_state(model, ema_weights(state, path), path)
        else:
            load_weights(model, path, state)
        return task, model.eval(), int(state["step"])

    def inference_device(self, model: nn.Module) -> tuple[torch.device, str]:
        """Where a loaded model sits, and the precision to run it in: the run's own on a GPU,
        fp32 elsewhere."""
        dev = next(model.parameters()).device
        return dev, self.config.train.precision if dev.type == "cuda" else "fp32"

    def model(self, checkpoint: str | int = "latest", device: str = "cpu", ema: bool = False) -> nn.Module:
        return self.load(checkpoint, device, ema)[1]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"


def load_run(path: str | Path, runs_dir: str | Path | None = None) -> Run:
    return Run(path, runs_dir)


def resolve_config(config: str | Path | Config, overrides: tuple[str, ...] | list[str] = (),
                   **kw_overrides: Any) -> tuple[Config, str, list[str]]:
    """The validated config, a label for run ids, and the overrides as `key=value` strings."""
    items = _override_list(overrides, kw_overrides)
    if isinstance(config, Config):
        cfg = apply_overrides(config, items)
        return cfg, cfg.task.name, items
    label = Path(str(config)).stem if str(config).endswith((".yaml", ".yml")) else str(config)
    return load_config(config, items), label, items


def create_run(cfg: Config, source: str, items: list[str], name: str, runs_dir: str | Path | None = None,
               overwrite: bool = False, status: str = "created") -> RunDir:
    """A new run directory with the resolved config and its run.json: what `train` trains into, and
    what `launch` creates (status queued) before a job trains into it."""
    run = RunDir.create(default_runs_dir(runs_dir), name, overwrite)
    write_atomic(run.config_path, cfg.to_yaml())
    run.write_info({"id": run.id, "task": cfg.task.name, "source": source, "overrides": items,
                    "command": sys.argv, "status": status, "created": time.time(), "step": 0,
                    "total_steps": cfg.train.steps, "best": None})
    return run


def train(config: str | Path | Config, *overrides: str, name: str | None = None,
          runs_dir: str | Path | None = None, overwrite: bool = False, quiet: bool = True,
          **kw_overrides: Any) -> Run:
    """Train a preset name, YAML file or Config into a new run directory; returns the Run."""
    cfg, label, items = resolve_config(config, overrides, **kw_overrides)
    if under_torchrun_needed(cfg):
        check_distributed(cfg, cfg.dist.nproc)
        name = name or new_run_id(label)
        if (default_runs_dir(runs_dir) / name).exists() and not overwrite:
            raise RunError(f"run directory {default_runs_dir(runs_dir) / name} already exists; pass --overwrite "
                           f"to replace it or --name to choose another name")
        args = ["train", str(config), *items, "--name", name, "--runs-dir", str(default_runs_dir(runs_dir))]
        run_torchrun(cfg.dist.nproc, args + (["--overwrite"] if overwrite else []) + (["--quiet"] if quiet else []))
        return Run(name, runs_dir)
    trainer = Trainer(cfg, quiet=quiet, runs_dir=runs_dir)
    run_id = name or new_run_id(label)

    def create() -> Path:
        if trainer.remote is not None:
            trainer.remote.claim(run_id, overwrite)
        return create_run(cfg, str(config), items, run_id, runs_dir, overwrite).path

    run = RunDir(on_main(trainer.dist, create))
    trainer.fit(run)
    return Run(run.path)


def fit_run(run_spec: str | Path, runs_dir: str | Path | None = None, quiet: bool = True) -> Trainer:
    """Train a created run directory to its end: from its latest checkpoint if it has one, else from
    step 0. What a launched job runs, so that a requeued job resumes by itself."""
    run = RunDir.find(run_spec, runs_dir)
    checkpoint = resolve_checkpoint(run.checkpoints, "latest", None) if list_checkpoints(run.checkpoints) else None
    trainer = Trainer(read_config(run.config_path), quiet=quiet, resume_from=checkpoint, runs_dir=runs_dir)
    trainer.fit(run)
    return trainer


def resume(run_spec: str | Path, *overrides: str, checkpoint: str | int = "latest",
           runs_dir: str | Path | None = None, quiet: bool = True, **kw_overrides: Any) -> Run:
    """Continue a run from a checkpoint to its configured end (overrides may extend it). A URL
    (s3://bucket/prefix/RUN) is first fetched into the runs directory; the run keeps mirroring there."""
    if "://" in str(run_spec):
        if env_from_environ().enabled:
            raise ConfigError(f"fetch {run_spec} in one process: `latentforge resume URL dist.nproc=N` fetches it, "
                              f"then starts N processes")
        run_spec = fetch_run(str(run_spec), default_runs_dir(runs_dir), checkpoint)
    run = RunDir.find(run_spec, runs_dir)
    info = run.info()
    if effective_status(info) == "running" and info.get("host") == RunDir.host():
        raise RunError(f"run {run.id} is still running (pid {info.get('pid')}); stop it before resuming")
    items = _override_list(overrides, kw_overrides)
    cfg = apply_overrides(read_config(run.config_path), items)
    trained = float(info.get("train_seconds", 0.0))
    # A run that the limit ended needs a higher one; a run stopped otherwise just past it ends at its next step.
    if info.get("stopped_by") == "time_limit" and cfg.train.time_limit and trained >= cfg.train.time_limit:
        raise ConfigError(f"run {run.id} has trained {trained:.0f} s, its train.time_limit={cfg.train.time_limit:g}: "
                          f"raise it to go on (latentforge resume {run.id} train.time_limit=SECONDS; 0: no limit)")
    path = resolve_checkpoint(run.checkpoints, checkpoint, (info.get("best") or {}).get("step"))
    if under_torchrun_needed(cfg):
        check_distributed(cfg, cfg.dist.nproc)
        run_torchrun(cfg.dist.nproc, ["resume", str(run.path), *items, "--checkpoint", str(checkpoint)]
                     + (["--quiet"] if quiet else []))
        return Run(run.path)
    trainer = Trainer(cfg, quiet=quiet, resume_from=path)
    if items and trainer.dist.is_main:
        write_atomic(run.config_path, cfg.to_yaml())
        run.update_info(overrides=info.get("overrides", []) + items, total_steps=cfg.train.steps)
    trainer.fit(run)
    return Run(run.path)


def lr_find(config: str | Path | Config, *overrides: str, steps: int = 100, min_lr: float = 1e-7,
            max_lr: float = 1.0, out: str | Path | None = None, runs_dir: str | Path | None = None,
            quiet: bool = True, **kw_overrides: Any) -> dict[str, Any]:
    """The LR range test on a config (see engine/lr_find.py); its CSV and plot go to `out`
    (default <runs>/lr-find/<label>-<time>/), never into a run directory."""
    items = _override_list(overrides, kw_overrides)
    if isinstance(config, Config):
        cfg, label = apply_overrides(config, items), config.task.name
    else:
        cfg = load_config(config, items)
        label = Path(str(config)).stem if str(config).endswith((".yaml", ".yml")) else str(config)
    directory = Path(out) if out is not None else default_runs_dir(runs_dir) / "lr-find" / new_run_id(label)
    return engine_lr_find(cfg, steps, min_lr, max_lr, directory, quiet)


def evaluate_run(run_spec: str | Path, checkpoint: str | int = "latest", splits: list[str] | None = None,
                 runs_dir: str | Path | None = None, device: str = "auto",
                 ema: bool = False, quiet: bool = True,
                 overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, float], Path]:
    """Evaluate a checkpoint on splits; the metrics are also saved under the run's artifacts/.
    With `ema`, its EMA weights, and the metrics are named as in training (`ema_test/...`). Not `quiet`: a bar
    of the splits, with the task's own below it. `overrides`: EVAL_OVERRIDES items for this evaluation."""
    run = Run(run_spec, runs_dir)
    task, model, step = run.load(checkpoint, device, ema, overrides)
    available = task.eval_splits()
    splits = splits or task.training_eval_splits()
    for split in splits:
        if split not in available:
            raise ConfigError(f"unknown split {split!r} (splits of this run: {', '.join(available)})")
    dev, precision = run.inference_device(model)
    progress = TrainProgress(len(splits), 0, enabled=not quiet, description="eval")
    metrics: dict[str, float] = {}
    try:
        for done, split in enumerate(splits, 1):
            metrics.update(evaluate(task, model, [split], dev, precision, progress))
            progress.update(done)
    finally:
        progress.close()
    if ema:
        metrics = {EMA_PREFIX + k: v for k, v in metrics.items()}
    out = run.dir.artifacts / f"eval_{'+'.join(splits)}_step{step:08d}{'_ema' if ema else ''}.json"
    run.dir.artifacts.mkdir(exist_ok=True)
    write_json(out, {"step": step, "checkpoint": str(checkpoint), "ema": ema, "splits": splits,
                     "overrides": list(overrides), "device": str(dev), "torch": torch.__version__,
                     "metrics": metrics})
    return {"step": step, **metrics}, out


def evaluate_all_checkpoints(run_spec: str | Path, splits: list[str] | None = None,
                             runs_dir: str | Path | None = None, device: str = "auto", ema: bool = False,
                             quiet: bool = True) -> list[dict[str, Any]]:
    """Evaluate every kept checkpoint in step order and write the metrics into the run's
    metrics.jsonl and TensorBoard at their steps (see engine/eval_all.py); one row per checkpoint."""
    run = Run(run_spec, runs_dir)
    return evaluate_all(run.dir, run.config, splits, device, ema, quiet)


def predict(run_spec: str | Path, text: str, checkpoint: str | int = "latest", runs_dir: str | Path | None = None,
            device: str = "auto", ema: bool = False) -> dict[str, str]:
    """The model's output for one input written as text (e.g. "1234*5678" for multiply)."""
    return _with_model(run_spec, checkpoint, runs_dir, device, ema, lambda task, model: task.predict(model, text))


def encode(run_spec: str | Path, path: str, checkpoint: str | int = "latest", runs_dir: str | Path | None = None,
           device: str = "auto", ema: bool = False) -> dict[str, str]:
    """The model's discrete code for an input file (e.g. an ARC grid for dvae)."""
    return _with_model(run_spec, checkpoint, runs_dir, device, ema, lambda task, model: task.encode(model, path))


def decode(run_spec: str | Path, codes: str, checkpoint: str | int = "latest", runs_dir: str | Path | None = None,
           device: str = "auto", ema: bool = False) -> dict[str, str]:
    """What the model decodes from a code written as text (e.g. "3 17 250 ...")."""
    return _with_model(run_spec, checkpoint, runs_dir, device, ema, lambda task, model: task.decode(model, codes))


def generate(run_spec: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
             top_p: float = 0.95, seed: int = 0, checkpoint: str | int = "latest", runs_dir: str | Path | None = None,
             device: str = "auto") -> str:
    """The text a language-model run writes after `prompt` (sampled with the KV cache; temperature 0: greedy)."""

    def action(task: Task, model: nn.Module) -> str:
        _require_method(task, "generate_text", "generate")
        return task.generate_text(model, prompt, max_new_tokens, temperature, top_k, top_p, seed)

    return _with_model(run_spec, checkpoint, runs_dir, device, False, action)


def export(run_spec: str | Path, out: str | Path, fmt: str = "hf", checkpoint: str | int = "latest",
           runs_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """A checkpoint's model written in another framework's format (hf: a transformers checkpoint directory
    that AutoModelForCausalLM.from_pretrained loads)."""
    if fmt != "hf":
        raise ConfigError(f"--format must be hf (got {fmt!r})")
    task, model, _ = Run(run_spec, runs_dir).load(checkpoint, "cpu")
    _require_method(task, "export", "export")
    return task.export(model, Path(out).expanduser(), overwrite)


def _require_method(task: Task, method: str, command: str) -> None:
    if not callable(getattr(task, method, None)):
        raise ConfigError(f"`latentforge {command}` needs a language-model run (task lm); this is a {task.name} run")


def _with_model(run_spec: str | Path, checkpoint: str | int, runs_dir: str | Path | None, device: str,
                ema: bool, action: Any) -> Any:
    run = Run(run_spec, runs_dir)
    task, model, _ = run.load(checkpoint, device, ema)
    dev, precision = run.inference_device(model)
    with torch.no_grad(), autocast(dev, precision):
        return action(task, model)


def probe(run_spec: str | Path, checkpoint: str | int = "latest", split: str = "test", method: str = "logistic",
          examples: int = 500, runs_dir: str | Path | None = None, device: str = "auto", ema: bool = False
          ) -> tuple[list[dict[str, Any]], Path]:
    """Linear probes on a checkpoint's hidden states; the table and plot go to the run's artifacts/."""
    if method not in ("logistic", "ridge"):
        raise ConfigError(f"--method must be logistic or ridge (got {method!r})")
    if examples < 1:
        raise ConfigError(f"--examples must be >= 1 (got {examples})")
    run = Run(run_spec, runs_dir)
    task, model, step = run.load(checkpoint, device, ema)
    # The EMA weights' probe goes beside, not over, the raw weights' one.
    where = run.dir.artifacts / "ema" if ema else run.dir.artifacts
    rows = task.probe(model, where, split, method, examples)
    return [{"step": step, **row} for row in rows], where


def generate_data(config: str | Path, *overrides: str, out: str | Path, overwrite: bool = False,
                  device: str = "auto") -> dict[str, str]:
    """Write the dataset a config trains on (e.g. gssm with data.train_sequences=N) to a file."""
    path = Path(out).expanduser()
    if path.exists() and not overwrite:
        raise RunError(f"{path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise RunError(f"{path} is a directory; give a file name, e.g. {path / 'data.npz'}")
    cfg = load_config(config, list(overrides))
    task = get_task(cfg.task.name)(cfg, resolve_device(device))
    return {"file": str(path), **task.write_data(path)}
