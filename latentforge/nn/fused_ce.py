"""Cross-entropy over a linear head, its gradient made in the same pass over the logits (CUDA, Triton).

A compiled cross-entropy reads the logits once in the forward (the log-sum-exp) and once more in the
backward (the softmax gradient), from memory: for GPT-2's 16,384 x 50,304 logits that is 3.3 GB of
reads besides the 1.6 GB the gradient writes. Here one Triton program per row finds the row's
log-sum-exp and then overwrites the row with its gradient, while the row is still in L2; the head's two
gradient matmuls run in the forward too, so the backward only scales them by the incoming gradient
(Liger-Kernel's fused linear cross-entropy does the same). The loss and gradients are those of
`lm_loss(vocab_logits(h @ weight.T, vocab_size, padded=True), labels, z_loss)`.

`linear_cross_entropy` needs a CUDA tensor and Triton (`fused_available`); on the CPU, Triton's
interpreter (TRITON_INTERPRET=1) runs the same kernel, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

IGNORE = -100
# Columns a program handles at once, and its warps. Small programs win: on an H200 a GPT-2 head's forward
# and backward (16,384 x 50,304 logits) took 7.11 ms at 2,048 x 4 against 7.89 ms at Liger-Kernel's
# 8,192 x 32 (`python -m bench.lm_head_loss --fused-configs ...`, docs/benchmarks.md, eighth measurement).
BLOCK, WARPS = 2048, 4

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    _IGNORE = tl.constexpr(IGNORE)  # a compiled kernel reads only constexpr globals

    @triton.jit
    def _ce_rows(logits_ptr, labels_ptr, scale_ptr, loss_ptr, lse_ptr, stride, vocab, cols, z_weight,
                 BLOCK: tl.constexpr):
        """Row r of the logits -> its loss and log-sum-exp; the row is overwritten with the gradient of
        scale * (loss + z_weight * lse^2) (zero for an unscored row and for the padded columns)."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        label = tl.load(labels_ptr + row)
        scored = label != _IGNORE
        target = tl.where(scored, label, 0)
        # Online log-sum-exp over the vocabulary's columns (the padded ones are not part of the softmax).
        m = tl.full((), float("-inf"), tl.float32)
        d = tl.full((), 0.0, tl.float32)
        for start in tl.range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
            m = new_m
        lse = m + tl.log(d)
        target_logit = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(scored, lse - target_logit, 0.0))
        tl.store(lse_ptr + row, lse)
        scale = tl.where(scored, tl.load(scale_ptr), 0.0)
        coef = 1.0 + 2.0 * z_weight * lse  # d/dx of lse + z * lse^2 is softmax * (1 + 2 z lse)
        for start in tl.range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < cols, other=0.0).to(tl.float32)
            grad = tl.where(offs < vocab, tl.exp(x - lse) * coef, 0.0) - tl.where(offs == target, 1.0, 0.0)
            tl.store(base + offs, (grad * scale).to(logits_ptr.dtype.element_ty), mask=offs < cols)


def fused_available(device: torch.device) -> bool:
    """Whether linear_cross_entropy can run on `device`: Triton on a CUDA device (or its interpreter)."""
    return HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                z_weight: float, block: int, warps: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        hc, wc = h.to(dtype), weight.to(dtype)
        logits = hc @ wc.t()  # (N, R): overwritten below by its own gradient
        scored = labels != IGNORE
        tokens = scored.sum()
        scale = 1.0 / tokens.clamp(min=1).float()
        rows = logits.new_empty(len(logits), dtype=torch.float32)
        lse = torch.empty_like(rows)
        _ce_rows[(len(logits),)](logits, labels, scale, rows, lse, logits.stride(0), vocab_size, logits.shape[1],
                                 float(z_weight), BLOCK=block, num_warps=warps)
        ctx.save_for_backward(logits @ wc, logits.t() @ hc)  # dL/dh and dL/dweight, before the outer gradient
        ctx.dtypes = h.dtype, weight.dtype
        ce = rows.sum() * scale
        z = (lse.square() * scored).sum() * scale
        ctx.mark_non_differentiable(ce, z, tokens)
        return ce + z_weight * z, ce, z, tokens

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *unused: torch.Tensor):
        grad_h, grad_weight = ctx.saved_tensors
        h_dtype, weight_dtype = ctx.dtypes
        grads = (grad_h * grad_loss).to(h_dtype), (grad_weight * grad_loss).to(weight_dtype)
        return *grads, None, None, None, None, None


@torch.compiler.disable  # run as it is inside a compiled loss: Triton, three matmuls, no graph of its own
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         z_loss: float = 0.0, block: int = BLOCK, warps: int = WARPS,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """h (..., C) hidden states, weight (R, C) the head (R >= vocab_size rows: the padded ones never score),
    labels (...) with IGNORE for unscored tokens -> (mean loss over the scored tokens, metrics), as lm_loss
    gives them: ce_loss, z_loss (unweighted) and tokens, device tensors. Not for fp16: the gradients are made
    in the forward, before a grad scaler's factor could keep them above fp16's smallest value. block and warps
    are the kernel's columns per iteration (a power of 2) and warps per row: `python -m bench.lm_head_loss
    --fused-configs` times choices of them."""
    loss, ce, z, tokens = _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight,
                                                    labels.reshape(-1).contiguous(), vocab_size, z_loss, block, warps)
    return loss, {"ce_loss": ce, "z_loss": z, "tokens": tokens.float()}
