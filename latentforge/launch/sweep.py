"""Sweep files: a grid of `latentforge train` runs written as YAML, expanded into points.

    name: sparse-scaling          # the sweep directory: <runs-dir>/<name>/ (default: the file's stem)
    config: gssm/sparse           # a preset or YAML file; a list of them is a grid axis named `config`
    overrides: [train.steps=2000] # fixed key=value overrides for every point
    grid:                         # cartesian product in this key order (the last key varies fastest)
      model.d_model: [32, 64, 128]
      data.train_sequences: [1000, 10000]
    report: {metric: test/gap, mode: min, x: [params], curves: config}

Expansion is pure: it creates and launches nothing, and it validates every point's config before it
returns, so any launcher (local processes, Slurm) is only handed sweeps whose every run can start.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from latentforge.config import Config, load_config
from latentforge.errors import ConfigError, LatentforgeError
from latentforge.track.rundir import RUN_ID

SWEEP_KEYS = ("name", "config", "overrides", "grid", "report")
REPORT_KEYS = ("metric", "mode", "x", "curves")
# Report columns that are not config keys: run.json's parameter count and the config the run came from.
PARAMS, CONFIG = "params", "config"
DOTTED_KEY = re.compile(r"^\w+(\.\w+)+$")
MAX_ID_LENGTH = 120


@dataclass(frozen=True)
class ReportSpec:
    """What `sweep report` shows; None means its default."""

    metric: str | None = None
    mode: str | None = None
    x: list[str] | None = None
    curves: str | None = None


@dataclass(frozen=True)
class SweepFile:
    """A sweep file checked for its shape only: its configs are neither resolved nor loaded."""

    path: Path
    name: str
    configs: list[str]  # as written in the file
    config_axis: bool  # `config:` is a list, hence a grid axis
    overrides: list[str]
    grid: dict[str, list[Any]]
    report: ReportSpec

    @property
    def keys(self) -> list[str]:
        """The grid's axes in expansion order: `config` first when it is a list."""
        return ([CONFIG] if self.config_axis else []) + list(self.grid)


@dataclass
class Point:
    """One run of a sweep: what `latentforge train` is given, and the grid values it stands for."""

    run_id: str
    config: str  # a preset name, or the absolute path of a YAML file
    overrides: list[str]
    values: dict[str, Any]  # axis -> value (`config` as written in the sweep file)


@dataclass
class Sweep:
    name: str
    file: Path
    keys: list[str]
    points: list[Point]
    report: ReportSpec


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'d_model': 32}} -> {'model.d_model': 32}; lists are values, not levels."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def override(key: str, value: Any) -> str:
    """`key=value` as one types it after `latentforge train`: strings verbatim (so `1e-3` is read as a
    number, as on the command line), anything else as JSON, which the config loader reads back as YAML."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def point_id(index: int, width: int, values: dict[str, Any]) -> str:
    """`000-d_model=32-train_sequences=1000`: the index keeps ids unique, the values make them readable."""
    pieces = [f"{index:0{width}d}"]
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        pieces.append(f"{key.rsplit('.', 1)[-1]}={re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('_')}")
    return "-".join(pieces)[:MAX_ID_LENGTH]


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"sweep {path}: {message}")


def _unknown(path: Path, where: str, key: Any, allowed: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    return _fail(path, f"unknown key {where}{key}{hint} (allowed: {', '.join(allowed)})")


def _string_list(path: Path, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(path, f"{key} must be a key or a non-empty list of keys (got {value!r})")
    return value


def _read_report(path: Path, raw: Any) -> ReportSpec:
    if raw is None:
        return ReportSpec()
    if not isinstance(raw, dict):
        raise _fail(path, f"report must be a mapping with {', '.join(REPORT_KEYS)} (got {raw!r})")
    for key in raw:
        if key not in REPORT_KEYS:
            raise _unknown(path, "report.", key, REPORT_KEYS)
    metric, mode, curves = raw.get("metric"), raw.get("mode"), raw.get("curves")
    if metric is not None and not (isinstance(metric, str) and metric):
        raise _fail(path, f"report.metric must be a metric name such as test/loss (got {metric!r})")
    if mode not in (None, "min", "max"):
        raise _fail(path, f"report.mode must be min or max (got {mode!r})")
    if curves is not None and not (isinstance(curves, str) and curves):
        raise _fail(path, f"report.curves must be one key (got {curves!r})")
    x = _string_list(path, "report.x", raw["x"]) if raw.get("x") is not None else None
    return ReportSpec(metric, mode, x, curves)


def read_sweep_file(path: str | Path) -> SweepFile:
    """Read a sweep file and check its shape; every problem is one ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in sweep {path}{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "must be a mapping with config: and grid: (see latentforge sweep --help)")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise _unknown(path, "", key, SWEEP_KEYS)

    name = path.stem if raw.get("name") is None else str(raw["name"])
    if not RUN_ID.match(name):
        raise _fail(path, f"name {name!r} may only hold letters, digits, '.', '_', '=' and '-'")
    configs = raw.get("config")
    if configs is None:
        raise _fail(path, "config: is missing (a preset, a YAML file, or a list of them)")
    config_axis = isinstance(configs, list)
    configs = configs if config_axis else [configs]
    if not configs or not all(isinstance(c, str) and c for c in configs):
        raise _fail(path, f"config must be a preset, a YAML file or a non-empty list of them (got {raw['config']!r})")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise _fail(path, f"overrides must be a list of key=value strings (got {overrides!r})")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise _fail(path, f"grid must be a mapping of config keys to lists of values (got {grid!r})")
    for key, values in grid.items():
        if key == CONFIG:
            raise _fail(path, "grid.config: list the configs in config: instead")
        if not isinstance(key, str) or not DOTTED_KEY.match(key):
            raise _fail(path, f"grid key {key!r} must be a config key such as model.d_model")
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid.{key} must be a non-empty list of values (got {values!r})")
    return SweepFile(path, name, configs, config_axis, overrides, grid, _read_report(path, raw.get("report")))


def _resolve_source(spec: SweepFile, source: str) -> str:
    """Presets stay names; YAML files are read relative to the sweep file's folder and handed on as
    absolute paths, so a run starts the same whatever directory launches it."""
    path = Path(source).expanduser()
    candidate = path if path.is_absolute() else spec.path.parent / path
    if source.endswith((".yaml", ".yml")) or candidate.is_file():
        if not candidate.is_file():
            raise _fail(spec.path, f"config file {candidate} does not exist "
                                   "(relative paths are read from the sweep file's folder)")
        return str(candidate.resolve())
    return source


def _check_report(spec: SweepFile, cfg: Config) -> None:
    """Report keys must exist, and a metric other than checkpoint.metric needs its mode spelled out."""
    known = (PARAMS, CONFIG, *flatten(cfg.to_dict()))
    report = spec.report
    for key in (report.x or []) + ([report.curves] if report.curves else []):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise _fail(spec.path, f"report: unknown key {key}{hint} (params, config or a config key)")
    if report.metric and report.mode is None and report.metric != cfg.checkpoint.metric:
        raise _fail(spec.path, f"report.mode is needed: is a lower or a higher {report.metric} better (min or max)?")


def expand_sweep(path: str | Path) -> Sweep:
    """The sweep's points in grid order, each one's config validated; raises ConfigError naming the
    file (and the point) on the first problem."""
    spec = read_sweep_file(path)
    sources = {config: _resolve_source(spec, config) for config in spec.configs}
    axes = ([spec.configs] if spec.config_axis else []) + list(spec.grid.values())
    combos = list(itertools.product(*axes))
    width = max(3, len(str(len(combos) - 1)))
    points = []
    for index, combo in enumerate(combos):
        values = dict(zip(spec.keys, combo))
        grid = [override(key, value) for key, value in values.items() if key != CONFIG]
        source = sources[values.get(CONFIG, spec.configs[0])]
        points.append(Point(point_id(index, width, values), source, spec.overrides + grid, values))
    first = None
    for point in points:
        try:
            cfg = load_config(point.config, point.overrides)
        except LatentforgeError as e:
            raise ConfigError(f"sweep {spec.path}, point {point.run_id}: {e}") from None
        first = first or cfg
    _check_report(spec, first)
    return Sweep(spec.name, spec.path, spec.keys, points, spec.report)
