"""train.sdpa_backends: the training step runs the attention kernels it names, and refuses in one line what
cannot run."""

import pytest
import torch
from conftest import TINY, train_refused

from latentforge.config import load_config
from latentforge.engine.loop import Trainer


def attention_ops(overrides: list[str]) -> set[str]:
    """The SDPA operators one training step of the tiny multiply model runs."""
    trainer = Trainer(load_config("multiply/tiny", [*TINY, *overrides]), quiet=True)
    with torch.profiler.profile() as profile:
        trainer.train_step()
    return {e.key for e in profile.key_averages() if "scaled_dot_product" in e.key}


def test_named_backends_are_the_ones_the_step_runs():
    default = attention_ops([])
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in default  # torch's choice on a CPU
    math = attention_ops(["train.sdpa_backends=[math]"])
    assert "aten::_scaled_dot_product_attention_math" in math
    assert not any("flash" in op for op in math)


@pytest.mark.parametrize("overrides, message", [
    (["train.sdpa_backends=[cudnn]"],
     "error: train.sdpa_backends=['cudnn']: cpu has flash and math only (cudnn and efficient need a CUDA device)"),
    (["train.sdpa_backends=[flash,flash]"],
     "error: train.sdpa_backends names a backend twice (got ['flash', 'flash'])"),
])
def test_backends_a_run_cannot_use_are_refused_in_one_line(cli, runs_dir, overrides, message):
    train_refused(cli, runs_dir, "multiply/tiny", ["train.device=cpu", *overrides], message)


def test_backends_that_cannot_run_the_attention_stop_the_run_in_one_line(cli, runs_dir):
    """A CPU's flash kernel takes no dropout: the first step stops with one line, not torch's traceback."""
    result = cli("train", "multiply/tiny", "train.device=cpu", "model.dropout=0.1", "train.sdpa_backends=[flash]",
                 "--runs-dir", runs_dir, "--name", "flash")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.sdpa_backends=['flash']: none of them can run this model's attention (torch's warnings say "
        "why); add math, or leave the list empty for torch's choice")
    assert "Traceback" not in result.output
