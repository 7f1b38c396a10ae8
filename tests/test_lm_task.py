"""The `lm` task end to end: training on the standard library's source through the CLI, exact resume with and
without loader workers, two ranks against one process, generate, export to transformers, HF weights as the
starting point, the prefix-LM and the z-loss, and bad input as one line."""

import json
from pathlib import Path

import pytest
import torch
from conftest import interrupt_at, latentforge_process, losses, train_refused
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import latentforge
from latentforge.config import load_config
from latentforge.data.corpora import python_stdlib
from latentforge.data.tokenizer import train_tokenizer
from latentforge.engine.checkpoint import load_checkpoint
from latentforge.errors import CheckpointError
from latentforge.nn.lm_loss import IGNORE
from latentforge.tasks.lm.task import LMTask

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> latentforge.api.Run:
    """lm/tiny trained once (with a z-loss weight, so that its share of the loss shows)."""
    runs = tmp_path_factory.mktemp("runs")
    return latentforge.train("lm/tiny", "task.z_loss=0.01", name="tiny", runs_dir=runs)


def task_for(*overrides: str) -> LMTask:
    return LMTask(load_config("lm/tiny", list(overrides)), CPU)


def test_python_stdlib_corpus_is_the_standard_librarys_own_source():
    files = python_stdlib()
    names = {f.name for f in files}
    assert {"os.py", "functools.py", "__init__.py"} <= names and len(files) > 100
    assert not any("test" in f.parts or "site-packages" in f.parts for f in files)


def test_train_tiny_through_the_cli(cli, runs_dir):
    result = cli("train", "lm/tiny", "task.z_loss=0.01", "--runs-dir", runs_dir, "--name", "cli", "-q")
    assert result.exit_code == 0, result.output
    run = latentforge.load_run("cli", runs_dir=runs_dir)
    assert run.status == "finished" and run.checkpoints() == [4, 8]
    records = run.metrics
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:  # the total is the cross-entropy plus the weighted z-loss, both logged
        assert r["train/loss"] == pytest.approx(r["train/ce_loss"] + 0.01 * r["train/z_loss"], rel=1e-5)
        assert r["train/z_loss"] > 0
    last = [r for r in records if "valid/loss" in r][-1]
    assert last["valid/perplexity"] == pytest.approx(torch.tensor(last["valid/loss"]).exp().item(), rel=1e-5)
    assert 0 <= last["valid/token_accuracy"] <= 1
    # Byte tokenizer: 257 ids in 320 rows (model.vocab_multiple=64); the forward FLOPs of one 32-token row are
    # recorded for throughput.
    assert run.model().cfg.vocab_size == 257 and run.model().tok_embeddings.num_embeddings == 320
    assert run.info["flops_per_example"] > 0 and run.info["best"]["metric"] == "valid/loss"


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_run_matches_the_straight_run(runs_dir, monkeypatch, workers):
    """2N steps straight == N steps, SIGTERM, resume, N steps: the same batches (packed, read mid-file by
    every worker), so identical per-step losses and weights."""
    common = ["train.steps=8", "checkpoint.every=3", "data.pack=true", f"data.workers={workers}", "model.dropout=0.1"]
    straight = latentforge.train("lm/tiny", *common, name="straight", runs_dir=runs_dir)
    interrupt_at(monkeypatch, 4)
    part = latentforge.train("lm/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted" and 4 in part.checkpoints()
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert resumed.status == "finished"
    assert losses(straight.path) == losses(resumed.path) and len(losses(straight.path)) == 8
    a = load_checkpoint(straight.checkpoint_path("latest"))
    b = load_checkpoint(resumed.checkpoint_path("latest"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"]["consumed_shards"] == b["data"]["consumed_shards"]


@pytest.mark.slow
def test_two_ranks_match_one_process_with_two_readers(tmp_path):
    """Rank r of 2 reads as reader r of 2, and so does loader worker r of one process: two gloo ranks with a
    global batch of 8 see the rows one process sees as two micro-batches of 4 (data.workers=2)."""
    base = ["train", "lm/tiny", "train.steps=4", "optim.schedule=constant", "train.device=cpu"]
    one = latentforge_process(tmp_path, *base, "train.batch_size=4", "train.grad_accum=2", "data.workers=2",
                       "--name", "one")
    assert one.returncode == 0, one.stderr
    two = latentforge_process(tmp_path, *base, "train.batch_size=8", "--name", "two", nproc=2)
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


def test_generate_is_deterministic_with_a_seed(cli, tiny_run):
    args = ["generate", tiny_run.path, "def f(x):", "--max-new-tokens", "24", "--temperature", "1.5", "--top-k", "50"]
    first, again = cli(*args, "--seed", "3"), cli(*args, "--seed", "3")
    other = cli(*args, "--seed", "4")
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout and first.stdout.startswith("def f(x):")
    assert other.stdout != first.stdout
    greedy = cli("generate", tiny_run.path, "import os", "--temperature", "0", "--max-new-tokens", "10")
    predicted = cli("predict", tiny_run.path, "import os", "--json")
    assert json.loads(predicted.stdout)["continuation"].startswith(greedy.stdout[len("import os"):].rstrip("\n"))


def test_generate_and_export_refuse_bad_input_in_one_line(cli, tiny_run, tmp_path):
    too_long = cli("generate", tiny_run.path, "x" * 60, "--max-new-tokens", "10")
    assert too_long.exit_code == 2
    assert too_long.stderr.strip().splitlines() == [
        "error: prompt (60 tokens) + max_new_tokens (10) is longer than the model's max_len=64"]
    other = latentforge.train("modadd/tiny", "train.steps=2", name="modadd", runs_dir=tiny_run.path.parent)
    for args in (["generate", other.path, "hello"], ["export", other.path, tmp_path / "hf"]):
        result = cli(*args)
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == [
            f"error: `latentforge {args[0]}` needs a language-model run (task lm); this is a modadd run"]
    result = cli("export", tiny_run.path, tmp_path / "hf", "--format", "onnx")
    assert result.exit_code == 2 and result.stderr.strip() == "error: --format must be hf (got 'onnx')"
    assert not (tmp_path / "hf").exists()


def test_export_loads_in_transformers_with_the_same_logits_and_tokenizer(cli, runs_dir, tmp_path):
    files = python_stdlib()[:20]
    tokenizer = train_tokenizer((f.read_text() for f in files), 300, tmp_path / "tokenizer.json")
    run = latentforge.train("lm/tiny", f"data.tokenizer={tmp_path / 'tokenizer.json'}", "train.steps=2",
                            name="bpe", runs_dir=runs_dir)
    result = cli("export", run.path, tmp_path / "hf")
    assert result.exit_code == 0, result.output
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.config.num_key_value_heads == 1
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, run.model()(ids), atol=1e-5, rtol=1e-5)
    text = "def f(x):\n    return x + 1\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == tokenizer.encode(text)
    # Written again only when asked.
    assert cli("export", run.path, tmp_path / "hf").exit_code == 2
    assert cli("export", run.path, tmp_path / "hf", "--overwrite", "--checkpoint", "2").exit_code == 0


def test_gpt2_preset_exports_as_gpt2(tmp_path):
    task = LMTask(load_config("lm/gpt2", ["model.n_layer=1", "model.d_model=32", "model.n_head=2",
                                          "model.max_len=64", "data.seq_len=32"]), CPU)
    model = task.build_model().eval()
    task.export(model, tmp_path / "hf", overwrite=False)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def _hf_llama(tmp_path: Path, **changes) -> LlamaForCausalLM:
    """A random transformers Llama shaped like lm/tiny's model section, saved to tmp_path/hf."""
    settings = dict(vocab_size=257, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=None, eos_token_id=None)
    torch.manual_seed(1)
    theirs = LlamaForCausalLM(LlamaConfig(**{**settings, **changes})).eval()
    theirs.save_pretrained(tmp_path / "hf")
    return theirs


@pytest.mark.parametrize("overrides", [[], ["model.vocab_multiple=1"]])
def test_init_from_path_loads_a_transformers_checkpoint(tmp_path, overrides):
    """257 ids: padded to our model's rows (320, or 257 unpadded), whatever the checkpoint's config says."""
    task = task_for(*overrides)
    theirs = _hf_llama(tmp_path)
    model = task.build_model().eval()
    assert task.init_from_path(model, tmp_path / "hf") is True
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    # Not a transformers directory: left to the caller to read as something else.
    (tmp_path / "run").mkdir()
    assert task.init_from_path(model, tmp_path / "run") is False


def test_a_run_starts_from_a_transformers_checkpoint_through_model_init_from(cli, runs_dir, tmp_path):
    """model.init_from=DIR: the engine hands a path that is not a run to the task, which loads it."""
    _hf_llama(tmp_path)
    result = cli("train", "lm/tiny", "train.steps=1", f"model.init_from={tmp_path / 'hf'}", "--runs-dir", runs_dir,
                 "--name", "hf", "-q")
    assert result.exit_code == 0, result.output
    run = latentforge.load_run("hf", runs_dir=runs_dir)
    assert run.info["init_from"] == {"path": str(tmp_path / "hf")}
    fresh = latentforge.train("lm/tiny", "train.steps=1", name="fresh", runs_dir=runs_dir)
    # The first step's loss is that of the loaded weights, not of a fresh initialisation.
    assert run.metrics[0]["train/loss"] != fresh.metrics[0]["train/loss"]


def test_init_from_path_names_the_keys_to_set_when_shapes_differ(tmp_path):
    _hf_llama(tmp_path, hidden_size=48, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    task = task_for()
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        task.init_from_path(model, tmp_path / "hf")
    assert str(e.value) == (f"{tmp_path / 'hf'} is a different model than the model section: set model.n_head=4 "
                            "model.d_model=48 model.tie_embeddings=false model.n_kv_heads=4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_run_saved_before_vocab_multiple_existed_loads_evaluates_and_resumes_unpadded(cli, runs_dir):
    """A run's config.yaml holds every key its code knew: an lm run saved before model.vocab_multiple and
    data.lanes lacks them, and was trained unpadded with one lane, so it reads back as 1 and 1 (not the
    default 64, whose 320 rows would not fit its 257-row checkpoint, nor the preset's 8 lanes, which its
    data position does not hold)."""
    run = latentforge.train("lm/tiny", "model.vocab_multiple=1", "data.lanes=1", "train.steps=4", name="old",
                            runs_dir=runs_dir)
    config = run.path / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if "vocab_multiple" not in line and "lanes" not in line))
    assert load_config("lm/tiny").model.vocab_multiple == 64 and load_config("lm/tiny").data.lanes == 8
    assert run.config.data.lanes == 1  # the dataclass's default, which the preset raises
    assert run.config.model.vocab_multiple == 1 and run.model().tok_embeddings.num_embeddings == 257
    result = cli("eval", run.path, "--json")
    assert result.exit_code == 0, result.output
    result = cli("resume", run.path, "train.steps=6", "-q")
    assert result.exit_code == 0, result.output
    assert run.status == "finished" and run.checkpoints()[-1] == 6
    assert run.config.model.vocab_multiple == 1 and "vocab_multiple: 1" in config.read_text()


def test_prefix_lm_scores_no_prefix_token_and_attends_both_ways_over_it():
    task = task_for("task.prefix_len=6")
    plain = task_for()
    batch = task._valid_batches()[0]
    labels = task.labels(batch)
    # Position i is scored on token i + 1: tokens 1..5 (the prefix after its first token) never are.
    assert (labels[:, :5] == IGNORE).all() and torch.equal(labels[:, 5:], batch["labels"][:, 5:])
    assert int(task.loss_weight(batch)) == int((batch["labels"][:, 5:] != IGNORE).sum())
    assert int(plain.loss_weight(batch)) > int(task.loss_weight(batch))
    torch.manual_seed(0)
    model = task.build_model().eval()
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][:, 4] = (changed["input_ids"][:, 4] + 1) % 256
    with torch.no_grad():
        # Within the prefix a token is seen by the positions before it; a causal LM's are not.
        assert not torch.allclose(task.logits(model, batch)[:, 0], task.logits(model, changed)[:, 0])
        torch.testing.assert_close(plain.logits(model, batch)[:, 0], plain.logits(model, changed)[:, 0])


@pytest.mark.parametrize("overrides, message", [
    (["task.prefix_len=32"], "error: task.prefix_len=32 must be below data.seq_len=32 (the tokens after the prefix "
                             "are the ones predicted)"),
    (["model.vocab_size=100"], "error: model.vocab_size=100 is below the tokenizer's 257 ids (data.tokenizer=bytes): "
                               "raise it, or 0 to take the tokenizer's"),
    (["data.seq_len=128"], "error: model.max_len=64 must be >= data.seq_len=128"),
    (["model.vocab_multiple=0"], "error: model.vocab_multiple must be >= 1 (got 0)"),
    (["data.valid_fraction=0"], "error: the held-out set is empty: raise data.valid_fraction or set "
                                "data.valid_sources"),
    (["checkpoint.metric=test/exact_match"], "error: checkpoint.metric must be a metric of an evaluated split "
                                             "['valid'], e.g. valid/loss (got 'test/exact_match')"),
    (["data.sources=[{path: /no/such/corpus}]"], "error: data source /no/such/corpus does not exist"),
])
def test_bad_input_is_one_line_and_leaves_nothing(cli, runs_dir, overrides, message):
    train_refused(cli, runs_dir, "lm/tiny", overrides, message)
