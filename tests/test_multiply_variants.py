"""The multiply variants end to end on the CPU, and the schedules that drive them."""

import json

import pytest
import torch
import yaml
from conftest import ICOT, TINY, interrupt_at, losses, ok

import latentforge
from latentforge.config import load_config
from latentforge.engine.loop import Trainer
from latentforge.tasks.multiply.data import Examples, from_digits, pair_keys, read_icot_file
from latentforge.tasks.multiply.layout import (
    ANSWER,
    IGNORE,
    THOUGHT,
    answer_tokens,
    chain_length,
    chain_tokens,
    render,
)
from latentforge.tasks.multiply.task import Multiply

VARIANTS = {
    "nocot": ["task.variant=nocot"],
    "cot": ["task.variant=cot"],
    "icot-si": ["task.variant=icot-si", "task.internalize.stage_steps=3", "task.internalize.remove_per_stage=3",
                "task.internalize.smoothing=2"],
    "pause": ["task.variant=pause", "model.thoughts=2"],
    "pause-continuous": ["task.variant=pause", "model.thoughts=2", "model.continuous=true"],
    "aux-probe": ["task.variant=aux-probe", "model.probe_layers=[1]"],
    "aux-probe-scheduled": ["task.variant=aux-probe", "model.probe_layers=[1]",
                            "task.probe_weight={kind: linear, start: 10.0, end: 1.0, end_step: 9}"],
    "latent": ["task.variant=latent", "model.latents=3", "model.encoder_layers=1", "model.latent_layers=1",
               "task.teacher_forcing.kind=linear", "task.teacher_forcing.end=0.5", "task.teacher_forcing.end_step=8"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_evaluates_and_predicts_through_the_cli(cli, runs_dir, variant):
    ok(cli("train", "multiply/tiny", *TINY, *VARIANTS[variant], "--name", "v", "--runs-dir", runs_dir, "-q"))
    info = json.loads((runs_dir / "v" / "run.json").read_text())
    assert info["status"] == "finished" and info["flops_per_example"] > 0 and info["train_seconds"] > 0
    for key in ("test/loss", "test/exact_match", "test/chain_tokens", "test/exact_match/2x2"):
        assert key in info["last_eval"]
    assert all(v == v for v in losses(runs_dir / "v").values())  # finite, not NaN
    out = ok(cli("predict", "v", "12*34", "--runs-dir", runs_dir, "--json")).output
    result = json.loads(out)
    assert result["question"] == "12 * 34" and result["true"] == "408"
    assert result["correct"] == ("yes" if result["answer"] == "408" else "no")
    assert ("chain" in result) == (variant in ("cot", "icot-si", "pause", "pause-continuous"))


@pytest.mark.parametrize("text", ["12*", "*12", "12+34", "ab*cd", "1.5*2", ""])
def test_predict_refuses_malformed_input(cli, runs_dir, text):
    ok(cli("train", "multiply/tiny", *TINY, "train.steps=1", "--name", "p", "--runs-dir", runs_dir, "-q"))
    result = cli("predict", "p", text, "--runs-dir", runs_dir)
    assert result.exit_code == 2
    assert "write two whole numbers" in result.output and "Traceback" not in result.output


def test_predict_refuses_operands_longer_than_trained(cli, runs_dir):
    ok(cli("train", "multiply/tiny", *TINY, "train.steps=1", "--name", "p", "--runs-dir", runs_dir, "-q"))
    result = cli("predict", "p", "123*4", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "has 3 digits" in result.output and "data.digits_a" in result.output


def test_an_option_of_another_variant_is_refused(cli, runs_dir):
    result = cli("train", "multiply/tiny", "task.variant=nocot", "model.thoughts=4", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "model.thoughts applies to task.variant=pause" in result.output
    assert not runs_dir.exists()


def task_for(*overrides: str) -> Multiply:
    return Multiply(load_config("multiply/tiny", [*TINY, *overrides, "train.device=cpu"]), torch.device("cpu"))


def test_internalization_removes_the_right_tokens_at_the_right_steps():
    task = task_for("task.variant=icot-si", "task.internalize.stage_steps=4", "task.internalize.remove_per_stage=3",
                    "train.steps=40")
    assert [task.removed_at(s) for s in (0, 3, 4, 7, 8, 12)] == [0, 0, 3, 3, 6, 9]
    # The optimizer resets at each stage boundary, and no more once the whole chain is gone.
    full = chain_length(2, 2) + 1
    resets = [s for s in range(40) if task.reset_optimizer(s)]
    assert resets == [s for s in range(4, 40, 4) if task.removed_at(s - 1) < full]
    assert resets == [s for s in range(40) if task.new_stage(s)] and len(resets) >= 2
    kept = task_for("task.variant=icot-si", "task.internalize.stage_steps=4", "task.internalize.reset_optimizer=false")
    assert not any(kept.reset_optimizer(s) for s in range(40)) and kept.new_stage(4)
    ex = Examples.from_ints(torch.tensor([12]), torch.tensor([34]), 2, 2).fixed_width()
    chain = render(chain_tokens(ex, True)[0][0].tolist()).split()
    for step in (0, 4, 8):
        batch = task.make_batch(ex, step)
        scored = render([t for t in batch["targets"][0].tolist() if t != IGNORE]).split()
        assert scored == chain[task.removed_at(step):] + ["####", "8", "0", "4", "0", "<end>"]
    # Past the chain's length there is no chain and no `#`: the answer-only layout.
    late = task.make_batch(ex, 12)
    assert ANSWER not in late["inputs"][0].tolist()


def test_removal_smoothing_removes_extra_tokens_with_geometric_odds():
    task = task_for("task.variant=icot-si", "task.internalize.stage_steps=4", "task.internalize.smoothing=1.0",
                    "data.test_size=100")
    ex = Examples.from_ints(torch.arange(10, 100).repeat(50), torch.arange(10, 100).repeat(50), 2, 2).fixed_width()
    torch.manual_seed(0)
    removed = task.make_batch(ex, 0)["removed"]
    # E[floor(Exp(1))] = 1 / (e - 1) = 0.582: with smoothing the mean removal is above the stage's 0.
    assert 0.5 < float(removed) < 0.67
    assert float(task.make_batch(ex, 0, smooth=False)["removed"]) == 0


def test_optimizer_state_is_reset_at_stage_boundaries():
    cfg = load_config("multiply/tiny", [*TINY, "task.variant=icot-si", "task.internalize.stage_steps=3",
                                        "optim.name=adamw", "train.device=cpu"])
    trainer = Trainer(cfg, quiet=True)
    steps_seen = []
    for _ in range(7):
        trainer.train_step()
        state = next(iter(trainer.optimizer.state.values()))
        steps_seen.append(int(state["step"]))
    assert steps_seen == [1, 2, 3, 1, 2, 3, 1]


def test_teacher_forcing_follows_its_schedule():
    task = task_for(*VARIANTS["latent"])
    ex = Examples.from_ints(torch.tensor([12]), torch.tensor([34]), 2, 2).fixed_width()
    schedule = task.cfg.task.teacher_forcing
    for step in (0, 2, 4, 8, 20):
        assert float(task.make_batch(ex, step)["teacher_forcing"]) == pytest.approx(schedule.value(step))
    assert schedule.value(0) == 1.0 and schedule.value(4) == pytest.approx(0.75) and schedule.value(20) == 0.5


def test_scheduled_sampling_is_logged_per_step(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, *VARIANTS["latent"], name="tf", runs_dir=runs_dir)
    logged = {r["step"]: r["train/teacher_forcing"] for r in run.metrics if "train/teacher_forcing" in r}
    schedule = run.config.task.teacher_forcing
    # log_every=1: the value logged at step s is the one used by the update that ended at s.
    assert logged == {s: pytest.approx(schedule.value(s - 1)) for s in range(1, 13)}


def test_probe_weight_is_a_number_or_a_schedule(runs_dir, cli):
    """A number is that constant weight (the loss reads it from the config); a schedule's value travels in
    each step's batch, and the run logs it as train/probe_weight."""
    constant = task_for("task.variant=aux-probe", "model.probe_layers=[1]", "task.probe_weight=0.5")
    assert constant.cfg.task.probe_weight.value(1000) == 0.5
    examples = Examples.from_ints(torch.tensor([12, 34, 5]), torch.tensor([56, 7, 89]), 2, 2).fixed_width()
    assert "probe_weight" not in constant.make_batch(examples, 0)
    overrides = ["task.variant=aux-probe", "model.probe_layers=[1]",
                 "task.probe_weight={kind: linear, start: 10.0, end: 1.0, end_step: 9}"]
    scheduled = task_for(*overrides)
    assert [float(scheduled.make_batch(examples, s)["probe_weight"]) for s in (0, 3, 9, 20)] == [10.0, 7.0, 1.0, 1.0]
    run = latentforge.train("multiply/tiny", *TINY, *overrides, name="scheduled", runs_dir=runs_dir)
    logged = {r["step"]: r["train/probe_weight"] for r in run.metrics if "train/probe_weight" in r}
    assert logged == {s: pytest.approx(run.config.task.probe_weight.value(s - 1)) for s in range(1, 13)}
    for bad, message in (("task.probe_weight=-1", "task.probe_weight must be >= 0"),
                         ("task.probe_weight=heavy", "task.probe_weight must be a mapping")):
        result = cli("train", "multiply/tiny", "task.variant=aux-probe", "model.probe_layers=[1]", bad,
                     "--runs-dir", runs_dir)
        assert result.exit_code == 2 and message in result.output, result.output


def test_probe_targets_sit_where_each_answer_digit_is_predicted():
    task = task_for("task.variant=aux-probe", "model.probe_layers=[1]")
    ex = Examples.from_ints(torch.tensor([99]), torch.tensor([99]), 2, 2).fixed_width()
    batch = task.make_batch(ex, 0)
    target = batch["probe_targets"][0]
    known = (~target.isnan()).nonzero().squeeze(1).tolist()
    # `9 9 * 9 9 =` is the prompt; the input at position 5 (`=`) predicts answer digit 0.
    assert known == [5, 6, 7, 8]
    assert (target[known] * 81 * 2).round().tolist() == [81, 170, 98, 9]
    assert all(batch["targets"][0, p] != IGNORE for p in known)


def test_evaluation_scores_each_answer_digit_in_the_order_written(monkeypatch):
    """digit_acc/k: how often the k-th digit written (least significant first here) is right. A model that
    writes every answer right but its second digit gets 1 everywhere else, 0 there, and no exact match."""
    task = task_for()
    model = task.build_model()

    def all_but_digit_1(model, ex):
        answers = answer_tokens(ex, task.cfg.data.reverse)
        answers[:, 1] = (answers[:, 1] + 1) % 10
        return answers

    monkeypatch.setattr(task, "generate", all_but_digit_1)
    metrics = task.evaluate(model, "test")
    widest = int(task.eval_examples("test").fixed_width().len_c.max())
    assert {k for k in metrics if k.startswith("test/digit_acc/")} == {f"test/digit_acc/{k}" for k in range(widest)}
    assert metrics["test/digit_acc/1"] == 0 and metrics["test/exact_match"] == 0
    assert all(metrics[f"test/digit_acc/{k}"] == 1 for k in range(widest) if k != 1)


def test_continuous_thoughts_feed_back_the_previous_hidden_state():
    task = task_for("task.variant=pause", "model.thoughts=2", "model.continuous=true")
    model = task.build_model().eval()
    tokens = torch.tensor([[1, 10, 2, 11, THOUGHT, THOUGHT, 2, 12]])
    x = model.embeddings(tokens)
    h, _ = model.transformer.hidden(x)
    assert torch.allclose(x[0, 4], h[0, 3], atol=1e-5) and torch.allclose(x[0, 5], h[0, 4], atol=1e-5)
    assert torch.equal(x[0, :4], model.transformer.embed(tokens[0, :4]))


def test_public_sets_are_evaluated_and_never_trained_on():
    task = task_for("data.digits_a=[4,4]", "data.digits_b=[4,4]", "data.icot_sets=[valid,test]",
                    "data.eval_splits=[icot_valid]", "checkpoint.metric=icot_valid/exact_match", "model.max_len=32")
    assert {"icot_valid", "icot_test"} <= set(task.eval_splits())
    public = task.eval_examples("icot_test")
    batches = task.train_batches()
    keys = set()
    for i in range(50):
        a, b = batches.pairs(i)
        keys |= set(zip(a.tolist(), b.tolist()))
    pairs = set(zip(from_digits(public.a).tolist(), from_digits(public.b).tolist()))
    assert len(pairs) == 1000 and not keys & pairs and not keys & {(b, a) for a, b in pairs}


def test_public_sets_need_a_matching_size(cli, runs_dir):
    result = cli("train", "multiply/tiny", "data.icot_sets=[test]", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "data.icot_sets needs digits_a and digits_b up to the same N" in result.output
    result = cli("train", "multiply/tiny", "data.icot_sets=[test]", "data.digits_a=[1,4]", "data.digits_b=[4,5]",
                 "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "up to the same N" in result.output


def test_a_mix_of_lengths_up_to_n_is_evaluated_on_the_public_n_by_n_set(runs_dir):
    """digits [1, 4] x [1, 4]: shorter products in training, the public 4 x 4 test set as a split, never trained on."""
    run = latentforge.train("multiply/tiny", "data.digits_a=[1,4]", "data.digits_b=[1,4]", "data.icot_sets=[test]",
                            "data.eval_splits=[icot_test]", "checkpoint.metric=icot_test/exact_match",
                            "model.max_len=32", "train.steps=2", "train.eval_every=2", "checkpoint.every=2",
                            "data.test_size=100", "data.train_eval_size=100", "train.batch_size=8",
                            name="mixed", runs_dir=runs_dir)
    assert run.status == "finished" and run.info["last_eval"]["icot_test/examples"] == 1000
    task = task_for("data.digits_a=[1,4]", "data.digits_b=[1,4]", "data.icot_sets=[test]", "model.max_len=32")
    a, b = task.train_batches().pairs(0, 8)
    assert len(set(map(len, map(str, a.tolist())))) == 4  # every length of 1..4 digits is trained on


def test_a_mix_is_evaluated_on_the_public_sets_of_its_shorter_sizes_too(cli, runs_dir):
    """digits [2, 5]: the public 4 x 4 test set is a split beside the 5 x 5 one, laid out at the run's width
    (zeros on the most significant side, or a fixed-width model reads other numbers), and never trained on."""
    mix = ["data.digits_a=[2,5]", "data.digits_b=[2,5]", "data.icot_sets=[test]", "model.max_len=40"]
    task = task_for(*mix)
    assert {"icot_test", "icot_test_4x4"} <= set(task.eval_splits())
    assert "icot_test_4x4" not in task_for(*mix, "data.digits_a=[5,5]").eval_splits()  # no 4-digit operands
    four, file = task.eval_examples("icot_test_4x4"), read_icot_file(ICOT / "4_by_4" / "test.txt")
    assert four.a.shape[1] == four.b.shape[1] == 5 and four.c.shape[1] == 10
    assert not four.a[:, 4:].any() and not four.b[:, 4:].any() and not four.c[:, 8:].any()
    assert all(torch.equal(x, y) for x, y in [(four.len_a, file.len_a), (four.len_b, file.len_b),
                                              (four.len_c, file.len_c)])
    assert all(torch.equal(from_digits(x), from_digits(y)) for x, y in [(four.a, file.a), (four.b, file.b),
                                                                        (four.c, file.c)])
    a, b = from_digits(file.a), from_digits(file.b)
    assert all(torch.isin(pair_keys(x, y), task.data.test_keys).all() for x, y in [(a, b), (b, a)])
    ok(cli("train", "multiply/tiny", *mix, "train.steps=2", "train.eval_every=2", "checkpoint.every=2",
           "data.test_size=100", "data.train_eval_size=100", "train.batch_size=8", "--name", "mix",
           "--runs-dir", runs_dir, "-q"))
    metrics = json.loads(ok(cli("eval", "mix", "--split", "icot_test_4x4", "--json", "--runs-dir", runs_dir)).output)
    assert metrics["icot_test_4x4/examples"] == 1000 and "icot_test_4x4/exact_match/4x4" in metrics


@pytest.mark.parametrize("variant", ["icot-si", "latent", "aux-probe-scheduled"])
def test_variant_resumes_exactly(runs_dir, monkeypatch, variant):
    """Removal smoothing, optimizer resets and scheduled sampling all draw on state the
    checkpoint restores: N steps, SIGTERM, resume == 2N straight."""
    common = [*TINY, *VARIANTS[variant], "train.steps=12", "model.dropout=0.1", "checkpoint.every=5"]
    straight = latentforge.train("multiply/tiny", *common, name="straight", runs_dir=runs_dir)
    interrupt_at(monkeypatch, 5)
    part = latentforge.train("multiply/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted"
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert losses(straight.path) == losses(resumed.path)


def test_flops_per_answer_count_what_the_model_writes():
    flops = {}
    for name, overrides in {"nocot": [], "cot": ["task.variant=cot"],
                            "icot-si": ["task.variant=icot-si", "task.internalize.stage_steps=2"],
                            "pause": ["task.variant=pause", "model.thoughts=4"]}.items():
        task = task_for(*overrides)
        flops[name] = task.flops_per_example(task.build_model())
    # icot-si ends with its chain internalized: it answers at the cost of nocot, not of cot.
    assert flops["nocot"] == flops["icot-si"] < flops["pause"] < flops["cot"]


@pytest.mark.parametrize("variant", ["cot", "latent", "pause-continuous"])
def test_variable_width_layouts_train_and_evaluate(runs_dir, variant):
    """Operands of 1 and 2 digits at their own lengths (no zero padding), most-significant first."""
    run = latentforge.train("multiply/tiny", *TINY, *VARIANTS[variant], "data.fixed_width=false", "data.reverse=false",
                            name="vw", runs_dir=runs_dir)
    buckets = {k for k in run.info["last_eval"] if k.startswith("test/exact_match/")}
    assert run.status == "finished" and buckets == {f"test/exact_match/{a}x{b}" for a in (1, 2) for b in (1, 2)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("digits", [[1, 2], [3, 4]])  # enumerated pairs, and sampled ones
def test_batches_made_in_chunks_are_the_batches_made_one_by_one(variant, digits):
    """data.chunk_batches changes how many batches are made per pass, never which: also when a
    stream resumes mid-chunk."""
    def stream(chunk: int, start: int = 0):
        cfg = load_config("multiply/tiny", [*VARIANTS[variant], "train.batch_size=6", f"data.chunk_batches={chunk}",
                                            f"data.digits_a={digits}", f"data.digits_b={digits}",
                                            "data.test_size=50", "data.train_eval_size=50", "model.max_len=128"])
        s = Multiply(cfg, torch.device("cpu")).train_batches()
        s.load_state_dict({"index": start})
        return s

    def batches(s, n: int) -> list:
        torch.manual_seed(0)  # icot-si's smoothing draws from the global generator
        return [s.next_batch() for _ in range(n)]

    pairs = [(batches(stream(1), 9), batches(stream(4), 9)),
             (batches(stream(1, start=3), 6), batches(stream(4, start=3), 6))]
    for one, chunked in pairs:
        for a, b in zip(one, chunked, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                # probe_targets are NaN where nothing is probed
                torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]), rtol=0, atol=0,
                                           equal_nan=True, msg=key)


def test_the_mix5_preset_scores_the_public_5x5_and_4x4_sets_as_it_trains(cli, runs_dir):
    ok(cli("train", "multiply/mix5", "train.steps=2", "train.eval_every=2", "checkpoint.every=2", "train.compile=false",
           "train.batch_size=8", "data.test_size=50", "data.train_eval_size=50", "--name", "mix5",
           "--runs-dir", runs_dir, "-q"))
    evals = [r for r in map(json.loads, (runs_dir / "mix5" / "metrics.jsonl").read_text().splitlines())
             if "icot_valid/examples" in r]
    assert evals and evals[-1]["icot_valid/examples"] == evals[-1]["icot_valid_4x4/examples"] == 1000
    assert "icot_valid_4x4/exact_match/4x4" in evals[-1] and "icot_valid/exact_match/5x5" in evals[-1]


def test_a_mix_saved_before_the_shorter_sets_existed_resumes_with_its_own_held_out_pairs():
    """Its config.yaml lacks data.icot_shorter: it trained with only the 5 x 5 sets held out, and resumes so
    (holding the 4 x 4 pairs out now would change its batches)."""
    from latentforge.config import build_config

    raw = yaml.safe_load(load_config("multiply/aux-probe", ["data.digits_a=[2,5]", "data.digits_b=[2,5]"]).to_yaml())
    del raw["data"]["icot_shorter"]
    old = build_config(raw, saved=True)
    assert old.data.icot_shorter is False and "icot_test_4x4" not in old.data.files()
    assert "icot_test_4x4" in build_config(raw).data.files()  # a new run from the same keys gets them
