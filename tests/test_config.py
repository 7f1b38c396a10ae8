import typing
from pathlib import Path

import pytest
import torch

from latentforge.config import apply_overrides, list_presets, load_config
from latentforge.errors import ConfigError
from latentforge.tasks import get_task
from latentforge.tasks.multiply.task import Variant


def test_presets_are_addressed_by_name():
    presets = list_presets()
    assert {"multiply", "multiply/tiny", "multiply/icot-si"} <= set(presets)
    assert presets.index("multiply") < presets.index("multiply/aux-probe")  # a task's default first
    cfg = load_config("multiply")
    tiny = load_config("multiply/tiny")
    assert cfg.task.name == tiny.task.name == "multiply"
    # tiny inherits from the default preset through `base:` and overrides the model.
    assert tiny.model.d_model == 32 and tiny.optim.lr == cfg.optim.lr


def test_overrides_are_typed_and_nested():
    cfg = load_config("multiply/tiny", ["train.steps=7", "optim.lr=0.01", "train.guard.enabled=false",
                                        "data.digits_a=[1,3]", "optim.betas=[0.8,0.9]"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 0.01 and cfg.train.guard.enabled is False
    assert cfg.data.digits_a == (1, 3) and cfg.optim.betas == (0.8, 0.9)


def test_user_yaml_with_base_and_interpolation(tmp_path: Path):
    f = tmp_path / "exp.yaml"
    f.write_text("base: multiply/tiny\ntrain:\n  steps: 40\ncheckpoint:\n  every: ${train.steps}\n")
    cfg = load_config(str(f), ["optim.lr=0.002"])
    assert cfg.train.steps == 40 and cfg.checkpoint.every == 40 and cfg.optim.lr == 0.002


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config("multiply/tiny", ["train.steps=9"])
    f = tmp_path / "config.yaml"
    f.write_text(cfg.to_yaml())
    assert load_config(str(f)) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.stpes=5"], "unknown key train.stpes; did you mean train.steps"),
    (["optim.learning_rate=1"], "unknown key optim.learning_rate"),
    (["trian.steps=5"], "unknown section trian; did you mean train"),
    (["train.steps=abc"], "train.steps must be an integer (got 'abc')"),
    (["train.compile=3"], "train.compile must be true or false"),
    (["optim.lr=-0.1"], "optim.lr must be > 0 (got -0.1)"),
    (["train.batch_size=0"], "train.batch_size must be >= 1 (got 0)"),
    (["train.precision=fp8"], "train.precision must be one of 'fp32', 'bf16', 'fp16'"),
    (["data.test_size=6000"], "data.test_size must be at most half of the 10000 possible pairs"),
    (["data.digits_a=[3,1]"], "data.digits_a must be [min, max]"),
    (["model.d_model=33"], "model.d_model must be divisible by model.n_head"),
    (["data.digits_a=[1,9]", "data.digits_b=[1,9]", "model.max_len=16"], "model.max_len must be >= 39"),
    (["optim.warmup=2.5"], "optim.warmup must be a fraction < 1 or a whole number of steps"),
    (["checkpoint.metric=valid/exact_match"], "checkpoint.metric must be a metric of an evaluated split"),
    (["data.eval_splits=[nope]"], "data.eval_splits: unknown split 'nope'"),
    (["train.steps"], "must look like section.key=value"),
    (["data.eval_files={1: x.txt}"], "data.eval_files key 1 must be a string"),
    (["data.eval_files={a: 5}"], "data.eval_files['a'] must be a string"),
    (["train.seed=5000000000"], "train.seed must be in [0, 2**32)"),
    (["data.seed=-1"], "data.seed must be in [0, 2**32)"),
])
def test_bad_values_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("multiply/tiny", overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="no preset or file named 'multiplyy'.*multiply/tiny"):
        load_config("multiplyy")


def test_malformed_yaml_names_file_and_line(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml line \d+"):
        load_config(str(f))


def test_yaml_without_task_is_refused(tmp_path: Path):
    f = tmp_path / "notask.yaml"
    f.write_text("train:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="task.name is not set"):
        load_config(str(f))


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        load_config("multiply/tiny", ["task.name=nope"])


def test_task_outside_the_package_is_imported_from_the_current_directory(tmp_path: Path, monkeypatch, cli):
    """task.name=module:Class trains a researcher's own task: here a copy of the benchmark's random-token task
    in a file of the current directory, run through the CLI."""
    source = Path(__file__).parents[1] / "bench" / "random_lm.py"
    (tmp_path / "my_lm.py").write_text(source.read_text())
    (tmp_path / "my.yaml").write_text("task:\n  name: my_lm:RandomLM\nmodel: {n_layer: 1, n_head: 2, d_model: 16, "
                                      "vocab_size: 32}\ndata: {seq_len: 8, eval_rows: 2}\n"
                                      "checkpoint: {metric: valid/loss, mode: min}\n")
    monkeypatch.chdir(tmp_path)
    result = cli("train", "my.yaml", "train.steps=3", "train.batch_size=2", "train.device=cpu", "--name", "mine")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "mine" / "checkpoints").is_dir()


@pytest.mark.parametrize("name, message", [
    ("no_such_module:Task", "cannot import no_such_module"),
    ("latentforge.config:Config", "has no Task subclass named 'Config'"),
    ("latentforge.config:Missing", "has no Task subclass named 'Missing'"),
])
def test_bad_external_task(name: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config("multiply/tiny", [f"task.name={name}"])


def test_apply_overrides_revalidates():
    cfg = load_config("multiply/tiny")
    assert apply_overrides(cfg, ["train.steps=99"]).train.steps == 99
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        apply_overrides(cfg, ["optim.lr=0"])


def test_eval_file_paths_are_saved_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("multiply/tiny", ["data.eval_files={mine: data/x.txt}"])
    assert cfg.data.eval_files["mine"] == str(tmp_path / "data" / "x.txt")


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_builds_its_task(preset):
    cfg = load_config(preset, ["train.device=cpu"])
    task = get_task(cfg.task.name)(cfg, torch.device("cpu"))
    assert sum(p.numel() for p in task.build_model().parameters()) > 0
    name = preset.partition("/")[2]
    if name in typing.get_args(Variant):
        assert cfg.task.variant == name  # multiply/cot trains the cot variant


def test_a_number_for_a_schedule_is_that_constant():
    cfg = load_config("dvae/tiny", ["task.weights.usage=0.25", "task.temperature=0.5"])
    usage, temperature = cfg.task.weights.usage, cfg.task.temperature
    assert (usage.kind, usage.value(0), usage.value(10**6)) == ("constant", 0.25, 0.25)
    assert temperature.value(123) == 0.5
    with pytest.raises(ConfigError, match="task.weights.usage must be a mapping"):
        load_config("dvae/tiny", ["task.weights.usage=true"])


def test_a_schedule_number_stays_when_a_later_layer_sets_its_keys(tmp_path):
    """`kl=0.3` then `kl.kind=linear ...` is a linear schedule from 0.3, not from the class default."""
    kl = load_config("dvae/tiny", ["task.weights.kl=0.3", "task.weights.kl.kind=linear", "task.weights.kl.end=0",
                                   "task.weights.kl.end_step=100"]).task.weights.kl
    assert (kl.kind, kl.start, kl.end, kl.value(50)) == ("linear", 0.3, 0.0, pytest.approx(0.15))
    preset = tmp_path / "pw.yaml"
    preset.write_text("base: multiply/aux-probe\ntask: {probe_weight: 5.0}\n")
    pw = load_config(preset, ["task.probe_weight.kind=linear", "task.probe_weight.end=0",
                              "task.probe_weight.end_step=1000"]).task.probe_weight
    assert (pw.start, pw.end) == (5.0, 0.0)
    resumed = apply_overrides(load_config(preset), ["task.probe_weight=2", "task.probe_weight.kind=cosine",
                                                    "task.probe_weight.end_step=10"]).task.probe_weight
    assert (resumed.kind, resumed.start, resumed.end) == ("cosine", 2.0, 2.0)
