import math

import pytest

from latentforge.config import OptimConfig
from latentforge.engine.optim import lr_at, param_groups
from latentforge.engine.schedules import ScalarSchedule
from latentforge.nn.transformer import Transformer, TransformerShape


def curve(cfg: OptimConfig, total: int) -> list[float]:
    return [lr_at(s, cfg, total) for s in range(total)]


def test_warmup_in_steps_and_as_fraction_agree():
    steps = curve(OptimConfig(lr=1.0, schedule="constant", warmup=10), 100)
    frac = curve(OptimConfig(lr=1.0, schedule="constant", warmup=0.1), 100)
    assert steps == frac
    assert steps[0] == pytest.approx(0.1) and steps[9] == 1.0 and steps[50] == 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine", "wsd"])
def test_decaying_schedules_end_at_min_lr(schedule):
    lrs = curve(OptimConfig(lr=1.0, min_lr=0.1, schedule=schedule, warmup=5), 100)
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[5:], lrs[6:]))  # never rises after warmup


def test_wsd_is_flat_until_the_decay():
    lrs = curve(OptimConfig(lr=1.0, min_lr=0.0, schedule="wsd", warmup=0, decay_frac=0.2), 100)
    assert lrs[79] == 1.0 and lrs[80] < 1.0 and lrs[99] == pytest.approx(0.0)


def test_cosine_midpoint():
    lrs = curve(OptimConfig(lr=1.0, min_lr=0.0, schedule="cosine", warmup=0), 101)
    assert lrs[49] == pytest.approx(0.5, abs=0.02)


def test_noam_is_inverse_square_root_after_warmup():
    cfg = OptimConfig(lr=1.0, schedule="noam", warmup=100)
    assert lr_at(99, cfg, 10_000) == pytest.approx(1.0)
    assert lr_at(399, cfg, 10_000) == pytest.approx(0.5)
    assert lr_at(49, cfg, 10_000) == pytest.approx(0.5)


@pytest.mark.parametrize("kind, start, end, at, expected", [
    ("constant", 0.3, 0.0, 500, 0.3),
    ("linear", 1.0, 0.0, 150, 0.5),
    ("cosine", 1.0, 0.0, 150, 0.5),
    ("exponential", 1.0, 0.01, 150, 0.1),
    ("linear", 1.0, 0.0, 50, 1.0),  # before start_step
    ("linear", 1.0, 0.0, 900, 0.0),  # after end_step
])
def test_scalar_schedules(kind, start, end, at, expected):
    s = ScalarSchedule(kind=kind, start=start, end=end, start_step=100, end_step=200)
    s.validate()
    assert s.value(at) == pytest.approx(expected)


def test_step_schedule_halves_and_stops_at_end():
    s = ScalarSchedule(kind="step", start=1.0, end=0.2, start_step=10, gamma=0.5, step_size=5)
    assert [s.value(x) for x in (0, 10, 14, 15, 20, 100)] == [1.0, 1.0, 1.0, 0.5, 0.25, 0.2]


def test_weight_decay_only_on_matrices():
    model = Transformer(TransformerShape(vocab_size=14, n_layer=1, d_model=32, n_head=2, tie_embeddings=False))
    decay, no_decay = param_groups(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in decay["params"]}
    for name, p in model.named_parameters():
        expected = p.dim() >= 2 and not name.startswith("embed")
        assert (id(p) in decayed) == expected, name
    with_embed = param_groups(model, OptimConfig(decay_embeddings=True))[0]["params"]
    assert any(p is model.embed.weight for p in with_embed)
    assert not math.isnan(decay["weight_decay"]) and no_decay["weight_decay"] == 0.0


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    import torch

    from latentforge.engine.optim import build_optimizer

    model = Transformer(TransformerShape(vocab_size=14, n_layer=1, d_model=32, n_head=2, tie_embeddings=False))
    opt = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    muon, adamw = opt.optimizers
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(model.head.weight) in adamw_params and id(model.embed.weight) in adamw_params
    assert id(model.blocks[0].attn.qkv.weight) in muon_params
    assert muon_params.isdisjoint(adamw_params)
    assert len(muon_params) + len(adamw_params) == len(list(model.parameters()))
