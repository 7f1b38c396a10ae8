"""What this process uses and achieves, logged with every training record: its memory (CPU and
GPU), its throughput and, where the task counts its FLOPs and the GPU is known, its MFU.

Everything here is per process, i.e. per device: under data parallelism each rank trains its
train.batch_size / world_size x train.grad_accum samples per step (train.batch_size is the global
batch), and these numbers are rank 0's (tokens/s is the ranks' mean).
"""

from __future__ import annotations

import os
import re
import resource
import sys

import torch

GB = 1e9

# Peak dense (no 2:4 sparsity) tensor-core FLOP/s from NVIDIA's datasheets and architecture
# whitepapers, by the precision matmuls run in. "tf32" is fp32 training with TF32 matmuls allowed,
# "fp32" without. GeForce cards are listed at their FP32-accumulate rate (what autocast uses).
# Matched against torch.cuda.get_device_name(), first match wins: a GPU not listed gets no MFU.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"\bh100\b.*\bnvl\b", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"\bh100\b.*\bpcie\b", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"\bh100\b.*\b(sxm|hbm3)", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"\bh200\b.*\bnvl\b", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"\bh200\b", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"\ba100\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bl40s\b", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bl4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\ba10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"\brtx 4090\b", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"\brtx 3090\b", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
]


def matmul_precision(precision: str) -> str:
    """The precision the training matmuls run in: fp32 matmuls use TF32 when torch allows it."""
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return precision


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of a GPU (by its CUDA name) in a matmul precision; None if not listed."""
    name = device_name.lower()
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, name):
            return peaks[precision]
    return None


def mfu(flops_per_example: float, samples_per_s: float, peak: float) -> float:
    """Model FLOPs utilization of training: a training step costs a forward and a backward pass,
    the backward twice the forward (the standard 3x of Kaplan et al. and PaLM)."""
    return 3 * flops_per_example * samples_per_s / peak


def cpu_memory_gb() -> dict[str, float]:
    """This process's resident memory now (Linux) and at its peak (Linux and macOS), without psutil."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["sys/cpu_mem_gb"] = int(line.split()[1]) * 1024 / GB
    except OSError:
        pass  # not Linux: only the peak below is known
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["sys/cpu_mem_peak_gb"] = peak / GB if sys.platform == "darwin" else peak * 1024 / GB
    return out


def host_info(device: torch.device) -> dict[str, object]:
    """Hardware the run trains on, for run.json: usable CPUs and the GPUs of this host."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = device.type == "cuda"
    return {"cpus": cpus, "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "gpus": torch.cuda.device_count() if cuda else 0}


class SystemMetrics:
    """Memory and throughput of this process over each log window, as `sys/*` and `train/*` metrics."""

    def __init__(self, device: torch.device, precision: str, samples_per_step: int, step: int,
                 flops_per_example: float | None):
        self.device, self.samples_per_step, self.last_step = device, samples_per_step, step
        self.cuda = device.type == "cuda"
        self.flops_per_example = flops_per_example
        self.peak = peak_flops(torch.cuda.get_device_name(device), matmul_precision(precision)) if self.cuda else None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def window(self, step: int, seconds: float) -> dict[str, float]:
        """Metrics of the steps since the last call, which took `seconds` of training."""
        samples_per_s = (step - self.last_step) * self.samples_per_step / max(seconds, 1e-9)
        self.last_step = step
        metrics = {"train/samples_per_s": samples_per_s, **cpu_memory_gb()}
        if self.cuda:
            metrics["sys/gpu_mem_gb"] = torch.cuda.memory_allocated(self.device) / GB
            metrics["sys/gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            metrics["sys/gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(self.device) / GB
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.flops_per_example and self.peak:
            metrics["train/mfu"] = mfu(self.flops_per_example, samples_per_s, self.peak)
        return metrics
