"""optim.freeze: parameters named by a pattern stay exactly as initialised, through training and resume."""

import json

import pytest
import torch
from conftest import TINY, snapshot

import latentforge
from latentforge.config import load_config
from latentforge.engine.checkpoint import load_checkpoint
from latentforge.engine.freeze import freeze
from latentforge.engine.loop import build_task_and_model
from latentforge.engine.seed import seed_everything
from latentforge.errors import ConfigError
from latentforge.nn.lm import LM, LMConfig

FROZEN = "optim.freeze=[transformer.embed.*,transformer.blocks.0.attn.*]"


def initial_weights(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The weights a run of this config starts from (the Trainer seeds, then builds)."""
    cfg = load_config("multiply/tiny", overrides)
    seed_everything(cfg.train.seed)
    return build_task_and_model(cfg, torch.device("cpu"))[1].state_dict()


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_frozen_weights_do_not_change_through_training_and_resume(cli, runs_dir, optimizer):
    args = [*TINY, "train.steps=4", f"optim.name={optimizer}", FROZEN]
    result = cli("train", "multiply/tiny", *args, "--name", "frozen", "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    # embed (19 x 32) + qkv (96 x 32) + proj (32 x 32)
    frozen = 19 * 32 + 96 * 32 + 32 * 32
    assert f"optim.freeze: {frozen:,} of" in result.output
    assert json.loads((runs_dir / "frozen" / "run.json").read_text())["frozen_params"] == frozen
    resumed = latentforge.resume("frozen", "train.steps=6", runs_dir=runs_dir, quiet=True)
    assert resumed.status == "finished"
    start = initial_weights(args)
    end = load_checkpoint(resumed.checkpoint_path("latest"))["model"]
    for name in start:
        # The output head is tied to the embedding: freezing one freezes both.
        is_frozen = name.startswith(("transformer.embed.", "transformer.head.", "transformer.blocks.0.attn."))
        assert torch.equal(start[name], end[name]) == is_frozen, name


def test_a_pattern_that_matches_nothing_is_one_error_line(cli, runs_dir):
    result = cli("train", "multiply/tiny", *TINY, "optim.freeze=[transformer.embed.*,encoder.*]",
                 "--runs-dir", runs_dir)
    assert result.exit_code == 2
    assert "error: optim.freeze pattern 'encoder.*' matches no parameter" in result.output
    assert "Traceback" not in result.output and snapshot(runs_dir) == {}


def test_freezing_everything_or_nothing():
    model = LM(LMConfig(vocab_size=10, vocab_multiple=1, n_layer=1, n_head=2, d_model=8))
    with pytest.raises(ConfigError, match="freezes every parameter"):
        freeze(model, ["*"])
    assert freeze(model, []) == 0 and all(p.requires_grad for p in model.parameters())
    # A tied weight answers to both of its names.
    assert freeze(model, ["output.weight"]) == 80 and not model.tok_embeddings.weight.requires_grad
    with pytest.raises(ConfigError, match="optim.freeze must hold non-empty"):
        load_config("multiply/tiny", ["optim.freeze=['']"])
