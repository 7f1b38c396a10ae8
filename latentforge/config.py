"""Typed configs: dataclass defaults <- preset YAML <- user YAML <- key=value overrides.

Every value is checked before any work starts; a problem is one `ConfigError` line naming the key
and what is allowed. The engine's sections (optim, train, checkpoint, track) live here; a task
brings its own dataclasses for the `task`, `model` and `data` sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentforge.errors import ConfigError, RunError

PRESET_ROOT = Path(__file__).parent / "tasks"


def require(ok: bool, key: str, message: str) -> None:
    """Raise a ConfigError for `key` unless `ok`; section prefixes are added by the loader."""
    if not ok:
        raise ConfigError(f"{key} {message}")


def metric_split(metric: str) -> str:
    """The split a metric is computed on: `test` for test/exact_match, and for ema_test/exact_match
    (the same split run with the EMA weights of train.ema_decay)."""
    return metric.removeprefix("ema_").split("/")[0]


def require_evaluated_metric(metric: str, eval_splits: list[str], example: str = "") -> None:
    """checkpoint.metric must come from a split the task evaluates during training (or its EMA twin)."""
    if metric:
        hint = f", e.g. {example}" if example else ""
        require(metric_split(metric) in eval_splits, "checkpoint.metric",
                f"must be a metric of an evaluated split {eval_splits}{hint} (got {metric!r})")


# ----------------------------------------------------------------------------- engine sections


@dataclass
class ModelBase:
    """What the engine reads from every task's `model` section: each task's ModelConfig inherits it."""

    # Start from another run's weights (not its optimizer, step or data): RUN[@STEP|@best], a run
    # directory or id (default its latest checkpoint); else a path the task loads (e.g. a HF checkpoint).
    init_from: str = ""
    # Refuse weights that do not fit the model exactly; false loads those that fit and lists the rest.
    init_strict: bool = True
    # Recompute every block's activations (each module of an nn.ModuleList) in the backward pass:
    # less memory for more time.
    activation_checkpointing: bool = False

    # Keys added with a new default after runs were saved, and the value those runs were built with: a
    # run's config.yaml holds every key its code knew, so one it lacks takes this value (build_config
    # with saved=True), and the run resumes and loads as it was trained. Any section's class may say so.
    old_run_values: ClassVar[dict[str, Any]] = {}


@dataclass
class TaskConfig:
    """Which task to train; tasks subclass this to add their own options."""

    name: str = ""

    def validate(self) -> None:
        require(bool(self.name), "name", "must name a task (a folder under latentforge/tasks/)")


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    # adamw, or muon: Muon on hidden weight matrices and AdamW on everything else.
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Embeddings are excluded from weight decay by default (as in nanoGPT/Lingua, they are
    # 2-D but act as lookup tables); biases and norm gains are never decayed.
    decay_embeddings: bool = False
    schedule: Literal["constant", "linear", "cosine", "noam", "wsd"] = "cosine"
    # < 1: a fraction of train.steps; >= 1: a number of steps.
    warmup: float = 0.0
    min_lr: float = 0.0
    # wsd only: the fraction of training spent in the final decay.
    decay_frac: float = 0.2
    # muon only: its momentum.
    momentum: float = 0.95
    # ⊥Grad: drop each weight's gradient component parallel to the weight before the step (see engine/orthograd.py).
    orthograd: bool = False
    # Parameter names (fnmatch globs, e.g. "layers.0.*" or "*embeddings*") left untrained (engine/freeze.py).
    freeze: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        require(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1) (got {list(self.betas)})")
        require(self.eps > 0, "eps", f"must be > 0 (got {self.eps})")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")
        require(self.warmup >= 0, "warmup", f"must be >= 0 (got {self.warmup})")
        require(self.warmup < 1 or float(self.warmup).is_integer(), "warmup",
                f"must be a fraction < 1 or a whole number of steps (got {self.warmup})")
        require(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}] (got {self.min_lr})")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1) (got {self.momentum})")
        require(0 < self.decay_frac <= 1, "decay_frac", f"must be in (0, 1] (got {self.decay_frac})")
        require(all(self.freeze), "freeze", f"must hold non-empty name patterns (got {self.freeze})")

    def warmup_steps(self, total_steps: int) -> int:
        return round(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)


@dataclass
class GuardConfig:
    """Stability guard: skip updates whose loss is non-finite or spikes far above its recent values.

    With fused AdamW (CUDA, CPU) or Muon, no fp16 scaler, no EMA and one process, the guard judges on the device
    and the optimizer skips the step there (no host sync per step); the host reads the verdicts every
    train.log_every steps, so the LR cool-down, the guard events, the emergency checkpoint and the stop
    after max_bad_steps non-finite steps come up to log_every steps after the bad step (the cool-down
    counts from the bad step). Otherwise each step is judged on the host as it happens."""

    enabled: bool = True
    # A spike is a loss above mean + spike_sigmas * std of the last `window` good losses,
    # above spike_ratio * that mean, and above spike_floor (noise around a near-zero loss, where
    # any ratio to the mean is large, is not a spike).
    spike_sigmas: float = 6.0
    spike_ratio: float = 3.0
    spike_floor: float = 0.1
    window: int = 100
    # Spikes are only judged once this many good steps have been seen.
    min_history: int = 50
    lr_factor: float = 0.5
    cooldown: int = 100
    max_bad_steps: int = 10

    def validate(self) -> None:
        require(self.spike_sigmas > 0, "spike_sigmas", f"must be > 0 (got {self.spike_sigmas})")
        require(self.spike_ratio >= 1, "spike_ratio", f"must be >= 1 (got {self.spike_ratio})")
        require(self.spike_floor >= 0, "spike_floor", f"must be >= 0 (got {self.spike_floor})")
        require(self.window >= 2, "window", f"must be >= 2 (got {self.window})")
        require(2 <= self.min_history <= self.window, "min_history",
                f"must be in [2, window={self.window}] (got {self.min_history})")
        require(0 < self.lr_factor <= 1, "lr_factor", f"must be in (0, 1] (got {self.lr_factor})")
        require(self.cooldown >= 0, "cooldown", f"must be >= 0 (got {self.cooldown})")
        require(self.max_bad_steps >= 1, "max_bad_steps", f"must be >= 1 (got {self.max_bad_steps})")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    # torch.compile's mode: reduce-overhead records CUDA graphs of the forward and backward (for small models,
    # which spend their time launching kernels; shapes must repeat), max-autotune also searches kernels (and
    # records CUDA graphs too), max-autotune-no-cudagraphs searches kernels only (the one to pair with cuda_graph).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # Inductor settings passed to torch.compile as its `options` (torch takes these or a mode, not both), e.g.
    # {coordinate_descent_tuning: true}: each pointwise and reduction kernel's block sizes searched at compile.
    compile_options: dict[str, Any] = field(default_factory=dict)
    # Record the whole update (forward, backward, clipping, guard, optimizer step) as one CUDA graph and
    # replay it, for small models whose step is launch-bound. Needs one CUDA process, optim.name=adamw or muon,
    # grad_accum=1, no fp16, EMA or adaptive clipping, and batches whose shapes repeat
    # (engine/step_graph.py).
    cuda_graph: bool = False
    # The kernels scaled_dot_product_attention may use in training, e.g. [flash] or [cudnn, flash] (torch picks
    # among them; [] leaves it all to torch): to measure one against another (engine/attention.py).
    sdpa_backends: list[Literal["flash", "cudnn", "efficient", "math"]] = field(default_factory=list)
    # Deterministic kernels (torch, cuDNN, cuBLAS workspace): two GPU runs give identical losses, a bit slower.
    deterministic: bool = False
    # Clip the global gradient norm to this value; 0 turns clipping off.
    clip_grad: float = 1.0
    # > 0: clip at this many times the running average of the gradient norm (its EMA with
    # clip_adaptive_beta), after clip_adaptive_warmup steps clipped at clip_grad. 0: off.
    clip_adaptive: float = 0.0
    clip_adaptive_beta: float = 0.98
    clip_adaptive_warmup: int = 100
    log_every: int = 50
    # Evaluate every N steps (0: only at the end).
    eval_every: int = 500
    # > 0: train on the first N training batches over and over and evaluate on them too (overfit/
    # metrics), to prove the model and loss can learn before a real run. 0: off.
    overfit_batches: int = 0
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Keep an exponential moving average of the weights with this decay (0: off); it is
    # evaluated beside the raw weights (metrics prefixed ema_) and saved in every checkpoint.
    ema_decay: float = 0.0
    # Profile this many steps (0: off): a trace in <run>/profile/ and step timings in profile.jsonl.
    profile: int = 0
    # With train.profile: also record the Python lines behind each operator (<run>/profile/stepsA-B.sources.txt).
    # Off by default: recording them slows the host side of the profiled steps, so their timings read high.
    profile_sources: bool = False
    # Seconds of training (summed over resumes, start-up and evaluations included) after which the run
    # ends as if train.steps were reached: final evaluation and checkpoint, status finished, stopped_by
    # time_limit in run.json. The LR schedule still spans train.steps. 0: no limit.
    time_limit: float = 0.0

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, key)
            require(value >= 1, key, f"must be >= 1 (got {value})")
        require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (got {self.seed})")
        require(self.clip_grad >= 0, "clip_grad", f"must be >= 0 (got {self.clip_grad})")
        require(not (self.cuda_graph and self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")),
                "cuda_graph", f"records the whole step itself: use it with train.compile_mode=default or "
                f"max-autotune-no-cudagraphs ({self.compile_mode} records graphs of its own)")
        require(not (self.cuda_graph and self.compile and self.compile_options.get("triton.cudagraphs")),
                "cuda_graph", "records the whole step itself: leave triton.cudagraphs out of train.compile_options "
                "(it records graphs of its own)")
        require(not (self.compile_options and self.compile_mode != "default"), "compile_options",
                f"replaces the mode in torch.compile: use it with train.compile_mode=default (got {self.compile_mode})")
        require(len(set(self.sdpa_backends)) == len(self.sdpa_backends), "sdpa_backends",
                f"names a backend twice (got {self.sdpa_backends})")
        require(self.clip_adaptive >= 0, "clip_adaptive", f"must be >= 0 (got {self.clip_adaptive})")
        require(0 <= self.clip_adaptive_beta < 1, "clip_adaptive_beta",
                f"must be in [0, 1) (got {self.clip_adaptive_beta})")
        require(self.clip_adaptive_warmup >= 1, "clip_adaptive_warmup",
                f"must be >= 1 (got {self.clip_adaptive_warmup})")
        require(not self.clip_adaptive or self.clip_grad > 0, "clip_adaptive",
                "needs train.clip_grad > 0: the norm its warm-up steps are clipped at")
        require(self.overfit_batches >= 0, "overfit_batches", f"must be >= 0 (got {self.overfit_batches})")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0 (got {self.eval_every})")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1) (got {self.ema_decay})")
        require(self.profile >= 0, "profile", f"must be >= 0 (got {self.profile})")
        require(self.time_limit >= 0, "time_limit", f"must be >= 0 seconds (got {self.time_limit})")


@dataclass
class CheckpointConfig:
    # Save every N steps (0: only at the end and on interrupt).
    every: int = 500
    # Keep the last K periodic checkpoints (the best one is kept besides).
    keep: int = 3
    # Eval metric that picks the best checkpoint ("" disables best tracking).
    metric: str = "test/exact_match"
    mode: Literal["max", "min"] = "max"
    # An fsspec URL (s3://bucket/prefix, gs://..., file:///...): the run directory is mirrored to
    # <remote>/<run id>/ after each save, and `latentforge resume <remote>/<run id>` works anywhere.
    remote: str = ""
    # Write checkpoints on a background thread: training waits only for a copy of the state to host
    # memory (one process; the shards of a multi-process run are written synchronously).
    async_save: bool = True

    def validate(self) -> None:
        require(self.every >= 0, "every", f"must be >= 0 (got {self.every})")
        require(self.keep >= 1, "keep", f"must be >= 1 (got {self.keep})")
        require(not self.remote or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://.+", self.remote) is not None, "remote",
                f"must be a URL such as s3://bucket/prefix or file:///path (got {self.remote!r})")


@dataclass
class TrackConfig:
    tensorboard: bool = True
    # The task's figures (if it draws any) every N evaluations and at the end; 0: never.
    figures_every: int = 1
    # Weights & Biases: the same records, the config and the figures, in a W&B run named after
    # the run id (WANDB_MODE, WANDB_API_KEY, WANDB_DIR ... are honoured). Entity "": your default.
    wandb: bool = False
    wandb_project: str = "latentforge"
    wandb_entity: str = ""
    # Upload every saved checkpoint directory as a version of the W&B model artifact.
    wandb_checkpoints: bool = False

    def validate(self) -> None:
        require(self.figures_every >= 0, "figures_every", f"must be >= 0 (got {self.figures_every})")
        require(bool(self.wandb_project), "wandb_project", "must not be empty")
        require(self.wandb or not self.wandb_checkpoints, "wandb_checkpoints", "needs track.wandb=true")


@dataclass
class DistConfig:
    """Data parallelism (see engine/distributed.py); torchrun sets the ranks."""

    # > 1: `latentforge train` starts torchrun with this many processes on this machine.
    nproc: int = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # auto: nccl on CUDA GPUs, gloo on the CPU.
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    def validate(self) -> None:
        require(self.nproc >= 1, "nproc", f"must be >= 1 (got {self.nproc})")


@dataclass
class Config:
    task: Any = field(default_factory=TaskConfig)
    model: Any = None
    data: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- building


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; returns the value in its typed form."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build_dataclass(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items (got {len(value)})")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_type, f"{key} key {k!r}"): _coerce(v, value_type, f"{key}[{k!r}]")
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def build_dataclass(cls: type, values: dict[str, Any] | None, prefix: str) -> Any:
    """Build `cls` from a mapping, refusing unknown keys (with the closest names) and wrong types."""
    values = values or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(f'{prefix}.{c}' for c in close)}?" if close else ""
            raise ConfigError(f"unknown key {full}{hint} (valid keys in {prefix or 'the config'}: "
                              f"{', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    return obj


# ----------------------------------------------------------------------------- loading


def preset_path(name: str) -> Path:
    """`multiply` -> tasks/multiply/configs/default.yaml, `multiply/tiny` -> .../tiny.yaml."""
    task, _, preset = name.partition("/")
    path = PRESET_ROOT / task / "configs" / f"{preset or 'default'}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset or file named {name!r} (presets: {', '.join(list_presets())})")
    return path


def list_presets() -> list[str]:
    presets = []
    for path in PRESET_ROOT.glob("*/configs/*.yaml"):
        task = path.parent.parent.name
        presets.append(task if path.stem == "default" else f"{task}/{path.stem}")
    # A task's default first, then its other presets.
    return sorted(presets, key=lambda name: (name.split("/")[0], "/" in name, name))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _load_layers(source: str, seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The YAML layers of a preset name or file, following `base:` from the bottom up."""
    path = Path(source)
    is_file = source.endswith((".yaml", ".yml")) or path.is_file()
    if is_file and not path.is_file():
        raise ConfigError(f"config file {source} does not exist")
    path = path if is_file else preset_path(source)
    if str(path.resolve()) in seen:
        raise ConfigError(f"config {source} includes itself through base:")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if not is_file:
        data.setdefault("task", {}).setdefault("name", path.parent.parent.name)
    layers = _load_layers(str(base), seen + (str(path.resolve()),)) if base else []
    return layers + [data]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse `a.b=value` strings; values are read as YAML (numbers, true/false, lists)."""
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def merge_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        merged = OmegaConf.merge(*[OmegaConf.create(layer) for layer in layers]) if layers else {}
        return OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot combine config: {str(e).splitlines()[0]}") from None


def section_types(task_cls: Any) -> dict[str, type]:
    return {
        "task": task_cls.TaskConfig, "model": task_cls.ModelConfig, "data": task_cls.DataConfig,
        "optim": OptimConfig, "train": TrainConfig, "checkpoint": CheckpointConfig, "track": TrackConfig,
        "dist": DistConfig,
    }


def _schedule_numbers(value: Any, tp: Any) -> Any:
    """`value` for the dataclass type `tp`, with every number given for a schedule written as its mapping."""
    if not isinstance(value, dict) or not dataclasses.is_dataclass(tp):
        return value
    hints = typing.get_type_hints(tp)
    out = {}
    for key, item in value.items():
        hint = hints.get(key)
        if (dataclasses.is_dataclass(hint) and hasattr(hint, "number") and isinstance(item, (int, float))
                and not isinstance(item, bool)):
            item = hint.number(item)
        out[key] = _schedule_numbers(item, hint)
    return out


def merge_schedule_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge config layers, a number given for a schedule (`task.weights.kl=0.3`) first made the mapping it
    means: a later layer that sets one of the schedule's keys (`task.weights.kl.kind=linear`) then changes
    that key, and the number stays the start and end."""
    from latentforge.tasks import get_task

    tasks = [layer["task"] for layer in layers if isinstance(layer.get("task"), dict)]
    names = [task["name"] for task in tasks if task.get("name")]
    if not names:
        return merge_layers(layers)  # build_config says what is missing
    sections = section_types(get_task(names[-1]))
    return merge_layers([{k: _schedule_numbers(v, sections.get(k)) for k, v in layer.items()} for layer in layers])


def read_config(path: Path) -> Config:
    """A run's config.yaml read back as the run was trained (build_config's `saved`); RunError if damaged."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError:
        raise RunError(f"{path} is not valid YAML; the run's config is damaged") from None
    if not isinstance(raw, dict):
        raise RunError(f"{path} does not hold a config")
    return build_config(raw, saved=True)


def build_config(raw: dict[str, Any], saved: bool = False) -> Config:
    """Validate a merged mapping into a Config with the task's own section types; `saved`: the mapping is a
    run's config.yaml, whose sections lack the keys added since (their classes' old_run_values)."""
    from latentforge.tasks import get_task

    raw = dict(raw)
    for key in raw:
        if key not in {f.name for f in dataclasses.fields(Config)}:
            names = [f.name for f in dataclasses.fields(Config)]
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown section {key}{hint} (sections: {', '.join(names)})")
    task_name = (raw.get("task") or {}).get("name") if isinstance(raw.get("task"), dict) else None
    if not task_name:
        raise ConfigError("task.name is not set: start from a preset or set task.name in your YAML")
    task_cls = get_task(task_name)
    sections = section_types(task_cls)
    built = {}
    for name, cls in sections.items():
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of keys (got {value!r})")
        if saved:
            value = {**getattr(cls, "old_run_values", {}), **value}
        built[name] = build_dataclass(cls, value, name)
    cfg = Config(**built)
    if cfg.checkpoint.metric.startswith("ema_") and not cfg.train.ema_decay:
        raise ConfigError(f"checkpoint.metric={cfg.checkpoint.metric} needs the EMA weights: set train.ema_decay > 0")
    task_cls.validate_config(cfg)
    return cfg


def load_config(source: str | Path, overrides: list[str] | None = None) -> Config:
    """Resolve a preset name or YAML file plus `key=value` overrides into a validated Config."""
    layers = _load_layers(str(source)) + [parse_overrides([item]) for item in overrides or []]
    return build_config(merge_schedule_layers(layers))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A validated copy of `cfg` with `key=value` overrides applied (used by resume)."""
    return build_config(merge_schedule_layers([cfg.to_dict()] + [parse_overrides([item]) for item in overrides]))
