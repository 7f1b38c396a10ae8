import json

import pytest
import torch
from conftest import TINY, interrupt_at, losses
from torch import nn

import latentforge
from latentforge.engine.checkpoint import load_checkpoint
from latentforge.engine.ema import build_ema, ema_weights
from latentforge.errors import ConfigError

EMA = [*TINY, "train.ema_decay=0.9"]


def test_ema_is_the_closed_form_of_the_decayed_weights():
    """After N updates: ema = d^(N-1) w_1 + sum_{t=2..N} (1 - d) d^(N-t) w_t; float buffers are
    averaged like weights, integer buffers follow the model (an averaged integer would truncate)."""
    decay, n = 0.8, 6
    model = nn.Linear(3, 2)
    model.register_buffer("scale", torch.zeros(2))
    model.register_buffer("index", torch.zeros(2, dtype=torch.int64))
    ema = build_ema(model, decay)
    history = []
    for t in range(1, n + 1):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3))
            model.scale.fill_(float(t))
            model.index.fill_(t * 7)
        history.append((model.weight.clone(), model.scale.clone()))
        ema.update_parameters(model)
    expected_w = decay ** (n - 1) * history[0][0]
    expected_s = decay ** (n - 1) * history[0][1]
    for t in range(2, n + 1):
        expected_w = expected_w + (1 - decay) * decay ** (n - t) * history[t - 1][0]
        expected_s = expected_s + (1 - decay) * decay ** (n - t) * history[t - 1][1]
    assert torch.allclose(ema.module.weight, expected_w, atol=1e-6)
    assert torch.allclose(ema.module.scale, expected_s, atol=1e-6)
    assert torch.equal(ema.module.index, model.index)
    # The raw weights are untouched and the average is not just the last weights.
    assert not torch.allclose(ema.module.weight, model.weight)


def test_ema_is_evaluated_checkpointed_and_picks_the_best(runs_dir):
    run = latentforge.train("multiply/tiny", *EMA, "checkpoint.metric=ema_test/loss", "checkpoint.mode=min",
                            name="ema", runs_dir=runs_dir)
    evals = [r for r in run.metrics if "test/loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    for record in evals:
        assert {"ema_test/exact_match", "ema_test/loss", "ema_test/token_acc"} <= set(record)
        assert record["ema_test/loss"] != record["test/loss"]
    assert run.info["best"]["metric"] == "ema_test/loss"
    best = min(evals, key=lambda r: r["ema_test/loss"])
    assert run.info["best"]["step"] == best["step"]
    state = load_checkpoint(run.checkpoint_path("latest"))
    weights = ema_weights(state, run.checkpoint_path("latest"))
    assert weights.keys() == state["model"].keys()
    assert int(state["ema"]["n_averaged"]) == 12


def test_resume_with_ema_is_exact(runs_dir, monkeypatch):
    common = [*EMA, "train.steps=14", "model.dropout=0.1", "train.log_every=3", "checkpoint.every=5"]
    straight = latentforge.train("multiply/tiny", *common, name="straight", runs_dir=runs_dir)
    interrupt_at(monkeypatch, 7)
    part = latentforge.train("multiply/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted"
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert losses(straight.path) == losses(resumed.path)
    emas = [{k: v for r in run.metrics for k, v in r.items() if k.startswith("ema_")} for run in (straight, resumed)]
    assert emas[0] and emas[0] == emas[1]
    a = load_checkpoint(straight.checkpoint_path("latest"))["ema"]
    b = load_checkpoint(resumed.checkpoint_path("latest"))["ema"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_and_predict_with_ema(cli, runs_dir):
    latentforge.train("multiply/tiny", *EMA, name="ema", runs_dir=runs_dir)
    raw = json.loads(cli("eval", "ema", "--json", "--runs-dir", runs_dir).stdout)
    result = cli("eval", "ema", "--ema", "--json", "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    ema = json.loads(result.stdout)
    assert ema["step"] == raw["step"] == 12
    assert ema["ema_test/loss"] != raw["test/loss"]
    # The same numbers as the training-time evaluation of the EMA weights.
    last = [r for r in latentforge.load_run(runs_dir / "ema").metrics if "ema_test/loss" in r][-1]
    assert ema["ema_test/loss"] == pytest.approx(last["ema_test/loss"], rel=1e-6)
    assert (runs_dir / "ema" / "artifacts" / "eval_test_step00000012_ema.json").is_file()
    predicted = cli("predict", "ema", "12*34", "--ema", "--runs-dir", runs_dir)
    assert predicted.exit_code == 0, predicted.output


def test_ema_flag_on_a_run_without_ema_is_one_line(cli, runs_dir):
    latentforge.train("multiply/tiny", *TINY, "train.steps=4", name="plain", runs_dir=runs_dir)
    for args in (["eval", "plain", "--ema"], ["predict", "plain", "12*34", "--ema"]):
        result = cli(*args, "--runs-dir", runs_dir)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "has no EMA weights" in lines[0], result.output


@pytest.mark.parametrize("overrides, message", [
    (["train.ema_decay=1.0"], "train.ema_decay must be in [0, 1)"),
    (["train.ema_decay=-0.1"], "train.ema_decay must be in [0, 1)"),
    (["checkpoint.metric=ema_test/exact_match"], "needs the EMA weights"),
])
def test_bad_ema_config(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        latentforge.config.load_config("multiply/tiny", overrides)
