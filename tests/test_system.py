"""Per-process system metrics: memory, samples/s, MFU arithmetic and the peak FLOP/s table."""

import pytest
import torch
from conftest import TINY

import latentforge
from latentforge.track.system import SystemMetrics, matmul_precision, mfu, peak_flops


def test_a_cpu_run_logs_memory_and_throughput_but_no_mfu(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, "train.steps=4", name="s", runs_dir=runs_dir)
    train = [r for r in run.metrics if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert 0 < r["sys/cpu_mem_gb"] < 1000 and r["sys/cpu_mem_peak_gb"] > 0
        assert r["train/samples_per_s"] > 0
        # One step per window (log_every=1), both counted over the same seconds: the ratio is
        # the tokens in one example.
        assert r["train/tokens_per_s"] / r["train/samples_per_s"] == pytest.approx(
            round(r["train/tokens_per_s"] / r["train/samples_per_s"]))
        assert not any(k == "train/mfu" or k.startswith("sys/gpu") for k in r)
    info = run.info
    assert info["cpus"] >= 1 and info["gpus"] == 0 and info["gpu"] is None and info["flops_per_example"] > 0


def test_samples_per_s_counts_the_steps_of_each_window():
    system = SystemMetrics(torch.device("cpu"), "fp32", samples_per_step=32, step=10, flops_per_example=1e6)
    assert system.window(14, 2.0)["train/samples_per_s"] == 4 * 32 / 2.0
    assert system.window(15, 0.5)["train/samples_per_s"] == 32 / 0.5
    assert "train/mfu" not in system.window(16, 1.0)  # a CPU has no listed peak


def test_mfu_is_three_forward_passes_over_the_peak():
    peak = peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak == 989e12
    # 1 GFLOP forward per example at 100k examples/s: 3e14 FLOP/s of training, 30% of the peak.
    assert mfu(1e9, 1e5, peak) == pytest.approx(3e14 / 989e12)


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "tf32", 495e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5e12),
    ("NVIDIA L4", "fp16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("NVIDIA A10", "bf16", 125e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
    # Not listed: no MFU rather than a guess (A10G: no NVIDIA datasheet; GH200 is not an H200).
    ("NVIDIA A10G", "bf16", None),
    ("NVIDIA GH200 480GB", "bf16", None),
    ("NVIDIA L40", "bf16", None),
    ("Tesla T4", "fp16", None),
])
def test_peak_flops_by_device_name(name, precision, expected):
    assert peak_flops(name, precision) == expected


def test_fp32_matmuls_count_as_tf32_when_torch_allows_it():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision("fp32") == "fp32"
        torch.set_float32_matmul_precision("high")
        assert matmul_precision("fp32") == "tf32" and matmul_precision("bf16") == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)
