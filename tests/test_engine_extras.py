"""Engine conveniences, end to end where a user meets them: starting from another run's weights,
overfit mode, deterministic mode, activation checkpointing, adaptive gradient clipping and the
per-rank run log."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO, TINY, interrupt_at, losses, snapshot

import latentforge
from latentforge.config import ModelBase, load_config
from latentforge.engine.activation_checkpointing import checkpoint_blocks
from latentforge.engine.checkpoint import load_checkpoint
from latentforge.engine.clipping import AdaptiveClip
from latentforge.engine.loop import Trainer, build_task_and_model, load_weights
from latentforge.errors import ConfigError
from latentforge.tasks import get_task, task_names
from latentforge.tasks.multiply.task import Multiply


def error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ----------------------------------------------------------------------------- model.init_from


def test_every_task_model_section_has_the_engine_keys():
    for name in task_names():
        assert issubclass(get_task(name).ModelConfig, ModelBase), name


def test_init_from_a_run_takes_its_weights_not_its_step(cli, runs_dir):
    assert cli("train", "multiply/tiny", *TINY, "checkpoint.keep=5", "--name", "src", "--runs-dir", runs_dir,
               "-q").exit_code == 0
    src = latentforge.load_run("src", runs_dir=runs_dir)
    best = src.info["best"]["step"]
    fresh_data = Trainer(load_config("multiply/tiny", TINY), quiet=True).batches.state_dict()
    for spec, step in [("src@4", 4), (f"{src.path}@best", best), ("src", 12)]:
        cfg = load_config("multiply/tiny", [*TINY, f"model.init_from={spec}"])
        trainer = Trainer(cfg, quiet=True, runs_dir=runs_dir)
        weights = load_checkpoint(src.checkpoint_path(step))["model"]
        assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items()), spec
        assert trainer.init_source == {"run": str(src.path.resolve()), "step": step,
                                       "checkpoint": str(src.checkpoint_path(step).resolve())}
        assert trainer.step == 0 and trainer.batches.state_dict() == fresh_data

    result = cli("train", "multiply/tiny", *TINY, "train.steps=4", "model.init_from=src@8", "--name", "dst",
                 "--runs-dir", runs_dir, "-q")
    assert result.exit_code == 0, result.output
    dst = latentforge.load_run("dst", runs_dir=runs_dir)
    assert dst.info["init_from"]["step"] == 8 and dst.info["init_from"]["run"] == str(src.path.resolve())
    assert sorted(losses(dst.path)) == [1, 2, 3, 4]
    # From a trained model, not from scratch: the first loss is well below a fresh model's.
    fresh = latentforge.train("multiply/tiny", *TINY, "train.steps=1", name="fresh", runs_dir=runs_dir)
    assert losses(dst.path)[1] < losses(fresh.path)[1]


def test_init_from_refuses_a_mismatch_unless_told_and_lists_the_keys(cli, runs_dir):
    latentforge.train("multiply/tiny", *TINY, "train.steps=4", name="src", runs_dir=runs_dir)
    before = snapshot(runs_dir)
    result = cli("train", "multiply/tiny", *TINY, "model.n_layer=2", "model.init_from=src", "--runs-dir", runs_dir)
    assert result.exit_code == 2
    line = error_line(result)
    assert "missing keys: transformer.blocks.1." in line and "model.init_strict=false" in line
    # The keys whose values differ are named, so the way to a whole load is plain.
    assert line.endswith("; the source run was trained with model.n_layer=1 (here 2)"), line
    assert snapshot(runs_dir) == before  # nothing created

    result = cli("train", "multiply/tiny", *TINY, "train.steps=2", "model.n_layer=2", "model.init_strict=false",
                 "model.init_from=src", "--name", "partial", "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    missing = [line for line in result.output.splitlines() if "missing keys" in line]
    assert len(missing) == 1 and "8 missing keys (left as initialised): transformer.blocks.1.norm1.weight" in missing[0]
    log = (runs_dir / "partial" / "logs" / "rank0.log").read_text()
    assert "missing keys (left as initialised): transformer.blocks.1.norm1.weight" in log


def test_init_from_errors_are_one_line(cli, runs_dir):
    latentforge.train("multiply/tiny", *TINY, "train.steps=4", name="src", runs_dir=runs_dir)
    result = cli("train", "multiply/tiny", "model.init_from=nowhere", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "is not a run" in error_line(result) and "multiply task" in result.output
    result = cli("train", "multiply/tiny", "model.init_from=src@3", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "no checkpoint at step 3 (have: 4)" in error_line(result)
    result = cli("train", "multiply/tiny", "model.init_frm=src", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "did you mean model.init_from" in error_line(result)


def test_init_from_a_path_the_task_loads(runs_dir, tmp_path, monkeypatch):
    """A path that is not a run goes to the task's init_from_path hook (the lm task loads Hugging
    Face directories there); here the multiply task is taught to read a plain torch file."""
    cfg = load_config("multiply/tiny", TINY)
    _, donor = build_task_and_model(cfg, torch.device("cpu"))
    torch.save(donor.state_dict(), tmp_path / "weights.pt")

    def init_from_path(self, model, path):
        if path.suffix != ".pt":
            return False
        model.load_state_dict(torch.load(path))
        return True

    monkeypatch.setattr(Multiply, "init_from_path", init_from_path)
    run = latentforge.train("multiply/tiny", *TINY, "train.steps=1", "train.seed=1",
                            f"model.init_from={tmp_path / 'weights.pt'}", name="hooked", runs_dir=runs_dir)
    assert run.info["init_from"] == {"path": str(tmp_path / "weights.pt")}
    trainer = Trainer(load_config("multiply/tiny", [*TINY, "train.seed=1", f"model.init_from={tmp_path}/weights.pt"]),
                      quiet=True)
    assert all(torch.equal(v, donor.state_dict()[k]) for k, v in trainer.model.state_dict().items())


# ----------------------------------------------------------------------------- overfit mode


def test_overfit_drives_one_batch_to_zero_loss(cli, runs_dir):
    result = cli("train", "multiply/tiny", *TINY, "train.steps=40", "train.overfit_batches=1", "train.batch_size=8",
                 "model.d_model=64",
                 "optim.lr=1e-2", "optim.schedule=constant", "train.eval_every=20", "--name", "of", "--runs-dir",
                 runs_dir, "-q")
    assert result.exit_code == 0, result.output
    run = latentforge.load_run("of", runs_dir=runs_dir)
    values = losses(run.path)
    evals = {r["step"]: r for r in run.metrics if "overfit/loss" in r}
    assert sorted(evals) == [20, 40] and values[1] > 1.5
    assert evals[40]["overfit/loss"] < 0.05 and evals[40]["overfit/answer_token_acc"] == 1.0
    assert "test/exact_match" in evals[40]  # the task's own evaluation still runs


def test_overfit_resume_is_exact_and_keeps_the_mode(runs_dir, monkeypatch):
    common = [*TINY, "train.overfit_batches=3", "train.batch_size=8", "train.grad_accum=2", "model.dropout=0.1"]
    straight = latentforge.train("multiply/tiny", *common, name="straight", runs_dir=runs_dir)
    interrupt_at(monkeypatch, 5)
    part = latentforge.train("multiply/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted"
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="trained with train.overfit_batches=3"):
        latentforge.resume("part", "train.overfit_batches=0", runs_dir=runs_dir)
    with pytest.raises(ConfigError, match="overfit_batches=2 differs from the checkpoint's"):
        latentforge.resume("part", "train.overfit_batches=2", runs_dir=runs_dir)
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert losses(resumed.path) == losses(straight.path)


# ----------------------------------------------------------------------------- deterministic mode


@pytest.fixture
def restore_determinism():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
    if before[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[3]


def test_deterministic_flag_is_applied(cli, runs_dir, restore_determinism):
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    result = cli("train", "multiply/tiny", *TINY, "train.steps=2", "train.deterministic=true", "--runs-dir",
                 runs_dir, "-q")
    assert result.exit_code == 0, result.output
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_an_op_without_a_deterministic_kernel_is_one_line(cli, runs_dir, monkeypatch, restore_determinism):
    original = Multiply.loss

    def loss(self, model, batch):
        torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))  # no deterministic kernel
        return original(self, model, batch)

    monkeypatch.setattr(Multiply, "loss", loss)
    result = cli("train", "multiply/tiny", *TINY, "train.deterministic=true", "--name", "nd", "--runs-dir", runs_dir,
                 "-q")
    assert result.exit_code == 2
    assert "train.deterministic=true, but put_ does not have a deterministic implementation" in error_line(result)
    assert "error: train.deterministic=true, but put_" in (runs_dir / "nd" / "logs" / "rank0.log").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_deterministic_gpu_runs_give_identical_losses(tmp_path):
    """Each run in its own process, so each starts CUDA and cuBLAS afresh."""
    args = ["multiply/tiny", "train.steps=30", "train.log_every=1", "train.device=cuda", "train.deterministic=true",
            "train.precision=bf16", "model.dropout=0.1", "model.d_model=128", "model.n_layer=2",
            "train.batch_size=64", "--runs-dir", str(tmp_path), "-q"]
    for name in ("a", "b"):
        result = subprocess.run([sys.executable, "-m", "latentforge", "train", *args, "--name", name], cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 31)) and a == b


# ----------------------------------------------------------------------------- activation checkpointing


def test_activation_checkpointing_recomputes_blocks_and_keeps_the_losses(runs_dir, monkeypatch):
    common = [*TINY, "model.n_layer=2", "model.dropout=0.1"]
    plain = latentforge.train("multiply/tiny", *common, name="plain", runs_dir=runs_dir)
    calls = {"n": 0}
    original = Multiply.build_model

    def build_model(self):
        model = original(self)
        for block in model.transformer.blocks:
            block.mlp.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        return model

    monkeypatch.setattr(Multiply, "build_model", build_model)
    ckpt = latentforge.train("multiply/tiny", *common, "model.activation_checkpointing=true", name="ckpt",
                             runs_dir=runs_dir)
    assert ckpt.status == "finished"
    for a, b in zip(losses(plain.path).values(), losses(ckpt.path).values(), strict=True):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7)
    # Per step, each block's MLP ran twice: once forward, once recomputed in the backward pass.
    cfg = load_config("multiply/tiny", [*common, "model.activation_checkpointing=true"])
    trainer = Trainer(cfg, quiet=True)
    calls["n"] = 0
    trainer.train_step()
    assert calls["n"] == 2 * 2


def test_activation_checkpointing_wraps_the_outer_blocks_only():
    inner = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    model = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4), inner), torch.nn.Linear(4, 4)])
    assert checkpoint_blocks(model) == 2
    with pytest.raises(ConfigError, match="no blocks"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


def test_activation_checkpointing_benchmark_runs_on_the_cpu():
    result = subprocess.run([sys.executable, "-m", "bench.activation_ckpt", "--device", "cpu", "--tiny"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| activation checkpointing") and len(rows) == 4  # header, rule, off, on
    assert rows[2].startswith("| off") and rows[3].startswith("| on")


# ----------------------------------------------------------------------------- gradient clipping


def test_fused_adamw_clips_by_its_grad_scale_as_clip_grad_norm_does():
    """With fused AdamW the clipping's factor is the optimizer's grad_scale, not a pass over the gradients:
    the same weights, step for step, as torch's clip_grad_norm_ before the step. A large eps makes Adam's
    update follow the gradients' scale, so skipped clipping would show."""
    overrides = [*TINY, "optim.name=adamw", "optim.eps=0.1", "train.clip_grad=0.05", "train.guard.enabled=false"]
    folded, plain = (Trainer(load_config("multiply/tiny", overrides), quiet=True) for _ in range(2))
    assert folded.clip_in_optimizer and folded.optimizer.defaults["fused"]
    plain.clip_in_optimizer = False
    unclipped = Trainer(load_config("multiply/tiny", [*overrides, "train.clip_grad=0"]), quiet=True)
    assert not unclipped.clip_in_optimizer
    for _ in range(4):
        for trainer in (folded, plain, unclipped):
            trainer.train_step()
        assert float(folded.optimizer.grad_scale) > 1  # the norm is above clip_grad: every step is clipped
    for a, b in zip(folded.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, c) for a, c in zip(folded.model.parameters(), unclipped.model.parameters()))


def test_clipping_stays_a_pass_of_its_own_where_fused_adamw_cannot_take_it():
    for extra in (["optim.name=muon"], ["train.clip_grad=0"], ["train.clip_adaptive=2"], ["optim.orthograd=true"]):
        trainer = Trainer(load_config("multiply/tiny", [*TINY, "optim.name=adamw", *extra]), quiet=True)
        assert not trainer.clip_in_optimizer, extra


# ----------------------------------------------------------------------------- adaptive gradient clipping


def test_adaptive_clip_follows_the_running_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    clip = AdaptiveClip(k=2.0, beta=0.5, warmup=2, fixed=1.0, device=torch.device("cpu"))

    def step(norm: float) -> tuple[float, float, float]:
        p.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
        raw, metrics = clip.clip_([p])
        return float(raw), float(metrics["train/clip_threshold"]), float(p.grad.norm())

    assert step(3.0) == (3.0, 1.0, pytest.approx(1.0))        # warm-up: the fixed norm
    assert step(5.0) == (5.0, 1.0, pytest.approx(1.0))
    # Bias-corrected EMA of 3 and 5 with beta 0.5: (0.25 * 3 + 0.5 * 5) / 0.75 = 13/3; threshold 26/3.
    _, threshold, after = step(4.0)
    assert threshold == pytest.approx(26 / 3) and after == pytest.approx(4.0)  # below: untouched
    # A non-finite norm leaves the average alone: the next threshold is the same.
    threshold = step(math.inf)[1]
    assert threshold == pytest.approx(2 * (0.5 * 3.25 + 0.5 * 4) / (0.5 * 0.75 + 0.5))
    assert step(100.0)[1:] == (pytest.approx(threshold), pytest.approx(threshold))  # clipped to it


def test_adaptive_clipping_logs_clips_and_resumes_exactly(runs_dir, monkeypatch):
    common = [*TINY, "train.clip_adaptive=0.5", "train.clip_adaptive_warmup=3", "model.dropout=0.1"]
    straight = latentforge.train("multiply/tiny", *common, name="straight", runs_dir=runs_dir)
    records = [r for r in straight.metrics if "train/clipped" in r]
    assert [r["train/clip_threshold"] for r in records[:3]] == [1.0, 1.0, 1.0]
    # At half the running average, every step after the warm-up is clipped.
    assert all(r["train/clipped"] == 1.0 and r["train/clip_threshold"] < r["train/grad_norm"] for r in records[3:])
    interrupt_at(monkeypatch, 6)
    latentforge.train("multiply/tiny", *common, name="part", runs_dir=runs_dir)
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert losses(resumed.path) == losses(straight.path)
    assert [r["train/clip_threshold"] for r in resumed.metrics if "train/clipped" in r] == \
        [r["train/clip_threshold"] for r in records]


def test_adaptive_clipping_config_errors(cli, runs_dir):
    result = cli("train", "multiply/tiny", "train.clip_adaptive=2", "train.clip_grad=0", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "train.clip_adaptive needs train.clip_grad > 0" in error_line(result)
    result = cli("train", "multiply/tiny", "train.clip_adaptive_beta=1", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "train.clip_adaptive_beta must be in [0, 1)" in error_line(result)


# ----------------------------------------------------------------------------- run logs


def test_run_log_holds_the_console_lines_and_grows_on_resume(cli, runs_dir, monkeypatch):
    result = cli("train", "multiply/tiny", *TINY, "train.steps=6", "checkpoint.metric=test/nothing", "--name", "r",
                 "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    log = runs_dir / "r" / "logs" / "rank0.log"
    text = log.read_text()
    assert "started run r at step 0" in text and "train 6/6  loss " in text and "step 6: test/loss" in text
    assert "warning: checkpoint.metric 'test/nothing' is not among the eval metrics" in text
    assert text.rstrip().endswith("finished at step 6")
    original = Multiply.loss
    monkeypatch.setattr(Multiply, "loss", lambda self, model, batch: (original(self, model, batch)[0] * math.inf, {}))
    result = cli("resume", "r", "train.steps=10", "train.guard.max_bad_steps=2", "--runs-dir", runs_dir)
    assert result.exit_code == 1
    text = log.read_text()
    assert text.count("started run r") == 1 and "resumed run r at step 6" in text
    assert "step 7: skipped update, non-finite loss" in text
    assert "stopped: training stopped at step 8: 2 bad steps in a row" in text.splitlines()[-1]


@pytest.mark.slow
def test_two_ranks_fsdp_with_clipping_and_checkpointing_match_one_and_init_from_the_shards(tmp_path):
    """FSDP (sharded gradients, sharded checkpoint) with adaptive clipping and activation checkpointing
    gives one process's losses; each rank keeps its log; model.init_from reads the dcp/ shards."""
    common = ["multiply/tiny", *TINY, "train.device=cpu", "optim.name=adamw", "train.clip_adaptive=0.8",
              "train.clip_adaptive_warmup=2", "model.activation_checkpointing=true", "--runs-dir", str(tmp_path),
              "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    for name, extra in [("one", []), ("two", ["dist.nproc=2", "dist.strategy=fsdp"])]:
        result = subprocess.run([sys.executable, "-m", "latentforge", "train", *common, *extra, "--name", name],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    assert all("train 12/12" in (tmp_path / "two" / "logs" / f"rank{r}.log").read_text() for r in (0, 1))

    checkpoint = tmp_path / "two" / "checkpoints" / "step_00000012"
    assert (checkpoint / "dcp").is_dir()
    cfg = load_config("multiply/tiny", [*TINY, f"model.init_from={tmp_path / 'two'}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # as `python -W default` shows them
        trainer = Trainer(cfg, quiet=True)
    assert not caught, [str(w.message) for w in caught]  # torch's one-process load warning is silenced
    _, reference = build_task_and_model(cfg, torch.device("cpu"))
    load_weights(reference, checkpoint, load_checkpoint(checkpoint))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in trainer.model.state_dict().items())
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2


def test_metrics_logged_per_position_are_gathered_for_a_heatmap():
    from latentforge.track.plots import indexed_metrics

    records = [{"step": 5, "test/digit_acc/0": 1.0, "test/digit_acc/1": 0.5, "test/exact_match/4x4": 0.2,
                "test/lone/0": 0.3, "train/part/0": 0.1, "train/part/1": 0.2},
               {"step": 10, "test/digit_acc/0": 1.0, "test/digit_acc/1": 0.9, "test/digit_acc/2": 0.1,
                "test/digit_acc/3": None},
               {"test/digit_acc/0": 0.5}]  # no step: nothing to place it at
    assert indexed_metrics(records) == {"test/digit_acc": {5: {0: 1.0, 1: 0.5}, 10: {0: 1.0, 1: 0.9, 2: 0.1}}}
