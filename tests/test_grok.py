"""Grokking tools: ⊥Grad, StableMax cross-entropy, float32 losses under bf16, and the modadd task."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at, losses

import latentforge
from latentforge.config import load_config
from latentforge.engine.checkpoint import load_checkpoint
from latentforge.engine.loop import check_distributed
from latentforge.engine.optim import build_optimizer
from latentforge.engine.orthograd import OrthoGrad, orthogonalize_
from latentforge.errors import ConfigError
from latentforge.nn.losses import cross_entropy, log_stablemax, stablemax, stablemax_cross_entropy
from latentforge.tasks.modadd.task import ModAdd, ModAddBatches, split_pairs

TINY = ["train.steps=12", "train.log_every=2", "train.eval_every=6", "checkpoint.every=4"]


# ----------------------------------------------------------------------------- ⊥Grad


def test_orthogonalize_removes_the_parallel_component_and_keeps_the_norm():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 5))
    g = torch.randn(8, 5) + 3 * w.detach()  # strongly parallel to the weight
    w.grad = g.clone()
    orthogonalize_([w])
    assert abs(float((w.grad * w.detach()).sum())) < 1e-4
    assert float(w.grad.norm()) == pytest.approx(float(g.norm()), rel=1e-5)
    # The direction is g's own perpendicular part (the paper's reference formula).
    flat_w, flat_g = w.detach().flatten(), g.flatten()
    perp = flat_g - flat_w.dot(flat_g) / flat_w.dot(flat_w) * flat_w
    assert torch.allclose(w.grad.flatten(), perp * flat_g.norm() / perp.norm(), atol=1e-5)


def test_orthograd_steps_the_inner_optimizer_on_the_projected_gradient():
    cfg = load_config("modadd/tiny", ["optim.orthograd=true", "optim.weight_decay=0"])
    torch.manual_seed(0)
    model = ModAdd(cfg, torch.device("cpu")).build_model()
    twin = ModAdd(cfg, torch.device("cpu")).build_model()
    twin.load_state_dict(model.state_dict())
    wrapped = build_optimizer(model, cfg.optim, torch.device("cpu"))
    plain = build_optimizer(twin, load_config("modadd/tiny", ["optim.weight_decay=0"]).optim, torch.device("cpu"))
    assert isinstance(wrapped, OrthoGrad) and not isinstance(plain, OrthoGrad)
    pairs = torch.tensor([[1, 2], [3, 4], [5, 6]])
    for m in (model, twin):
        F.cross_entropy(m(pairs), pairs.sum(1) % 11).backward()
    orthogonalize_(list(twin.parameters()))
    wrapped.step()
    plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    # Its state is the inner optimizer's: checkpoints with and without it load into each other.
    assert wrapped.state_dict().keys() == plain.state_dict().keys()


def test_orthograd_refuses_fsdp():
    cfg = load_config("modadd/tiny", ["optim.orthograd=true", "dist.strategy=fsdp"])
    with pytest.raises(ConfigError, match="optim.orthograd=true projects whole weight tensors"):
        check_distributed(cfg, 2)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_orthograd_resume_is_exact(runs_dir, monkeypatch, optimizer):
    common = [*TINY, "optim.orthograd=true", "task.loss=stablemax", f"optim.name={optimizer}",
              "data.full_batch=false", "train.batch_size=16"]
    straight = latentforge.train("modadd/tiny", *common, name="straight", runs_dir=runs_dir)
    interrupt_at(monkeypatch, 5)
    part = latentforge.train("modadd/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted"
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert losses(straight.path) == losses(resumed.path) and len(losses(straight.path)) == 6
    assert all(math.isfinite(v) for v in losses(straight.path).values())
    sa = load_checkpoint(straight.checkpoint_path("latest"))["model"]
    sb = load_checkpoint(resumed.checkpoint_path("latest"))["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- losses


def test_stablemax_values_and_probabilities():
    x = torch.tensor([0.0, 2.0, -1.0, -3.0])
    assert torch.equal(stablemax(x), torch.tensor([1.0, 3.0, 0.5, 0.25]))
    log_p = log_stablemax(x)
    assert log_p.dtype == torch.float64
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(log_p[1]) == pytest.approx(math.log(3.0 / 4.75))


def test_stablemax_cross_entropy_matches_its_definition_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 7, requires_grad=True)
    targets = torch.randint(0, 7, (4, 3))
    targets[0, 0] = -100
    loss = stablemax_cross_entropy(logits, targets)
    s = stablemax(logits.detach().double())
    nll = -(s / s.sum(-1, keepdim=True)).log().gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = targets != -100
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(nll[keep].mean()), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad[0, 0].abs().sum()) == 0.0


def test_stablemax_keeps_a_gradient_where_float32_softmax_collapses():
    # Logits this far apart round every float32 softmax loss to exactly 0 ("Softmax Collapse"):
    # no gradient is left. StableMax grows linearly, so its loss and gradient stay.
    logits = torch.tensor([[120.0, 0.0, -5.0]], requires_grad=True)
    target = torch.tensor([0])
    softmax_loss = F.cross_entropy(logits, target)
    assert float(softmax_loss.detach()) == 0.0
    loss = stablemax_cross_entropy(logits, target)
    loss.backward()
    assert float(loss.detach()) > 1e-3 and float(logits.grad.abs().sum()) > 0


def test_cross_entropy_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x, w = torch.randn(64, 32), torch.randn(32, 50)
    targets = torch.randint(0, 50, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = x @ w
        assert logits.dtype == torch.bfloat16
        loss = cross_entropy(logits, targets)
        unsafe = F.log_softmax(logits, -1)  # what a bf16 log-softmax would give
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits.float(), targets)), rel=1e-6)
    assert unsafe.dtype == torch.bfloat16
    per_token = cross_entropy(logits.view(8, 8, 50), targets.view(8, 8), reduction="none")
    assert per_token.shape == (8, 8) and per_token.dtype == torch.float32


# ----------------------------------------------------------------------------- modadd


def test_split_covers_every_pair_once():
    splits = split_pairs(13, 0.3, seed=1)
    train, test = ({tuple(p) for p in s.tolist()} for s in (splits["train"], splits["test"]))
    assert len(train) == round(0.3 * 169) and not train & test and len(train | test) == 169
    assert torch.equal(split_pairs(13, 0.3, seed=1)["train"], splits["train"])
    assert not torch.equal(split_pairs(13, 0.3, seed=2)["train"], splits["train"])


def test_full_batch_and_minibatch_streams():
    pairs = split_pairs(11, 0.5, 0)["train"]
    full = ModAddBatches(pairs, 11, 8, full_batch=True, seed=0)
    assert torch.equal(full.next_batch()["pairs"], pairs)
    mini = ModAddBatches(pairs, 11, 8, full_batch=False, seed=0)
    first = mini.next_batch()
    assert first["pairs"].shape == (8, 2) and torch.equal(first["targets"], first["pairs"].sum(1) % 11)
    mini.curve["test"][6] = 0.5
    again = ModAddBatches(pairs, 11, 8, full_batch=False, seed=0)
    again.load_state_dict(mini.state_dict())
    assert torch.equal(again.next_batch()["pairs"], mini.next_batch()["pairs"]) and again.curve["test"] == {6: 0.5}


def test_modadd_trains_evaluates_and_draws_its_accuracy_curve(cli, runs_dir):
    result = cli("train", "modadd/tiny", *TINY, "--name", "m", "--runs-dir", runs_dir, "-q")
    assert result.exit_code == 0, result.output
    run = latentforge.load_run("m", runs_dir)
    evals = [r for r in run.metrics if "test/accuracy" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0 <= r[f"{s}/accuracy"] <= 1 for r in evals for s in ("train", "test"))
    assert any("train/batch_accuracy" in r for r in run.metrics)
    assert (run.path / "artifacts" / "acc_curve-step00000012.png").stat().st_size > 1000
    assert run.info["best"]["metric"] == "test/accuracy"


def test_modadd_bad_config_is_one_line(cli, runs_dir):
    result = cli("train", "modadd/tiny", "data.train_frac=1.5", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and result.output.strip() == "error: data.train_frac must be in (0, 1) (got 1.5)"
    result = cli("train", "modadd/tiny", "task.loss=sparsemax", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "task.loss must be one of 'softmax', 'stablemax'" in result.output
    assert not runs_dir.exists()
