"""nn.fused_ce: the Triton cross-entropy over a linear head gives lm_loss's loss, metrics and gradients.

On a CUDA GPU the real kernel runs; without one, where Triton is installed, Triton's interpreter runs the same
kernel on the CPU (in a subprocess: TRITON_INTERPRET is read when the kernel is defined). The refusals
need neither."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, losses, train_refused

import latentforge
from latentforge.nn.fused_ce import HAS_TRITON

# Loss, metrics and both gradients against lm_loss over the padded, masked logits: ignored labels, padded head
# rows (which get no gradient), with and without the z-loss, and an outer gradient that is not 1; the kernel's
# own launch and one whose 32-column blocks take several passes over each row's columns.
CHECK = """
import torch
from latentforge.nn.fused_ce import IGNORE, linear_cross_entropy
from latentforge.nn.lm_loss import lm_loss
from latentforge.nn.transformer import vocab_logits

device, dtype, (N, C, R, V), tol = {device!r}, {dtype}, {dims}, {tol}
torch.manual_seed(0)
for z in (0.0, 1e-2):
    h, w = torch.randn(N, C, device=device), torch.randn(R, C, device=device) * C**-0.5
    labels = torch.randint(0, V, (N, 2), device=device)[:, 0]  # a strided view, as a sliced batch gives
    labels[::7] = IGNORE
    out = {{}}
    for name in ("fused", "fused 32x1", "reference"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            if name == "fused":
                loss, m = linear_cross_entropy(hh, ww, labels, V, z)
            elif name == "fused 32x1":
                loss, m = linear_cross_entropy(hh, ww, labels, V, z, block=32, warps=1)
            else:
                loss, m = lm_loss(vocab_logits(hh @ ww.t(), V, padded=True), labels, z)
        (loss * 2.5).backward()
        out[name] = (loss.detach(), m["ce_loss"], m["z_loss"], m["tokens"], hh.grad, ww.grad)
    for fused in ("fused", "fused 32x1"):
        for a, b in zip(out[fused], out["reference"]):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
        assert out[fused][5][V:].abs().max() == 0
print("agree")
"""


def run_agreeing(script: str, interpret: bool) -> None:
    """Run `script` in a fresh interpreter from the repository (TRITON_INTERPRET is read when the kernel is
    defined); it prints "agree" when its checks hold."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900,
                            cwd=REPO)
    assert result.returncode == 0 and "agree" in result.stdout, result.stdout + result.stderr


def run_check(device: str, dtype: str, dims: tuple[int, int, int, int], tol: float, interpret: bool) -> None:
    run_agreeing(CHECK.format(device=device, dtype=dtype, dims=dims, tol=tol), interpret)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_fused_kernel_compiles_for_a_hopper_gpu():
    """The interpreter runs what the compiler refuses (a global read that is not constexpr, say): compile the
    kernel to a cubin for sm_90, which needs no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from latentforge.nn.fused_ce import BLOCK, WARPS, _ce_rows

    signature = {"logits_ptr": "*bf16", "labels_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
                 "lse_ptr": "*fp32", "stride": "i64", "vocab": "i32", "cols": "i32", "z_weight": "fp32",
                 "BLOCK": "constexpr"}
    source = ASTSource(fn=_ce_rows, signature=signature, constexprs={"BLOCK": BLOCK})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS})
    assert kernel.asm["cubin"]


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="needs Triton (and no GPU: there the real "
                                                                         "kernel is tested)")
def test_fused_cross_entropy_matches_lm_loss_in_the_interpreter():
    run_check("cpu", "torch.float32", (40, 16, 128, 100), 1e-5, interpret=True)


# Both tasks that offer task.fused_loss train the same losses with it (three steps, the lm task with a z-loss and
# prefix tokens left unscored), through the whole engine.
TASKS = """
import latentforge
common = {{"bench/configs/gpt2-small.yaml": ["model.n_layer=1", "model.d_model=32", "model.n_head=2",
                                            "model.vocab_size=100", "data.seq_len=16", "train.batch_size=2"],
          "lm/tiny": ["task.z_loss=0.01", "task.prefix_len=3", "train.batch_size=2"]}}
for preset, overrides in common.items():
    losses = {{}}
    for fused in ("false", "true"):
        run = latentforge.train(preset, *overrides, "train.steps=3", "train.log_every=1", "train.guard.enabled=false",
                                {device_args}, f"task.fused_loss={{fused}}", name=f"fused-{{fused}}",
                                runs_dir={runs!r} + "/" + preset.replace("/", "_"))
        losses[fused] = [m["train/loss"] for m in run.metrics if "train/loss" in m]
    assert len(losses["true"]) == 3, losses
    for a, b in zip(losses["true"], losses["false"]):
        assert abs(a - b) <= {tol} * abs(b), (preset, losses)
print("agree")
"""


def run_tasks(device_args: str, tol: float, runs: str, interpret: bool) -> None:
    run_agreeing(TASKS.format(device_args=device_args, tol=tol, runs=runs), interpret)


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="needs Triton (and no GPU: there the real "
                                                                         "kernel is tested)")
def test_fused_loss_trains_both_tasks_as_the_plain_loss_in_the_interpreter(tmp_path):
    run_tasks('"train.device=cpu", "train.precision=fp32"', 1e-5, str(tmp_path), interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and Triton")
def test_fused_cross_entropy_matches_lm_loss_on_cuda():
    """GPT-2's vocabulary and padding (50,257 of 50,304 rows, more than one block per row), in float32 and in
    bf16 autocast (the bench's precision; bf16 logits in both, so the tolerance is bf16's)."""
    run_check("cuda", "torch.float32", (512, 64, 50304, 50257), 1e-4, interpret=False)
    run_check("cuda", "torch.bfloat16", (512, 64, 50304, 50257), 2e-2, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and Triton")
def test_fused_loss_trains_both_tasks_as_the_plain_loss_compiled_on_cuda(tmp_path):
    run_tasks('"train.device=cuda", "train.precision=bf16", "train.compile=true"', 2e-2, str(tmp_path),
              interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and Triton")
def test_fused_loss_trains_the_gpt2_bench_compiled_in_a_cuda_graph(runs_dir):
    common = ("model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.vocab_size=1000", "data.seq_len=64",
              "train.batch_size=8", "train.steps=20", "train.log_every=1", "train.device=cuda", "train.compile=true",
              "train.cuda_graph=true")
    plain = latentforge.train("bench/configs/gpt2-small.yaml", *common, name="plain", runs_dir=runs_dir)
    fused = latentforge.train("bench/configs/gpt2-small.yaml", *common, "task.fused_loss=true", name="fused",
                              runs_dir=runs_dir)
    a, b = losses(plain.path), losses(fused.path)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("overrides, message", [
    (["task.fused_loss=true", "train.device=cpu"],
     "error: task.fused_loss needs Triton and a CUDA device (this run trains on cpu)"),
    (["task.fused_loss=true", "train.precision=fp16"],
     "error: task.fused_loss makes its gradients in the forward, before fp16's loss scale could keep them from "
     "underflowing; use train.precision=bf16 or fp32"),
    (["task.fused_loss=true", "dist.strategy=fsdp"],
     "error: task.fused_loss reads the head's weight outside the model's forward, which FSDP shards; use "
     "dist.strategy=ddp or task.fused_loss=false"),
])
@pytest.mark.parametrize("preset", ["bench/configs/gpt2-small.yaml", "lm/tiny"])
def test_fused_loss_refusals_are_one_line_and_leave_nothing(cli, runs_dir, overrides, message, preset):
    train_refused(cli, runs_dir, str(REPO / preset) if preset.endswith(".yaml") else preset, overrides, message)
