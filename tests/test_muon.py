"""BatchedMuon (Newton-Schulz on stacks of same-shape matrices) against torch.optim.Muon."""

import copy
import math

import pytest
import torch

from latentforge.engine.muon import BatchedMuon


def matrices() -> list[torch.nn.Parameter]:
    """Wide, tall and square matrices, two of each shape and one transposed pair (8x16 and 16x8)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 16), (8, 16), (16, 8), (12, 12), (12, 12), (4, 20)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original", None])
@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_follows_torch_muon(adjust_lr_fn, nesterov):
    ours, theirs = matrices(), matrices()
    kwargs = dict(lr=0.1, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt_ours, opt_theirs = BatchedMuon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        # Both run Newton-Schulz in bf16; batched and single matmuls may round differently.
        assert torch.allclose(a, b, atol=2e-3, rtol=0), (a - b).abs().max()
    # The update moved the parameters well beyond that tolerance: the comparison is not vacuous.
    assert min((a - b).abs().max() for a, b in zip(ours, matrices())) > 0.05


def test_batched_muon_state_loads_into_torch_muon():
    params = matrices()
    opt = BatchedMuon(params, lr=0.02)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    other = torch.optim.Muon(copy.deepcopy(params), lr=0.02)
    other.load_state_dict(opt.state_dict())
    assert all(torch.equal(other.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
               for p, q in zip(params, other.param_groups[0]["params"]))


def stepped(found_inf: torch.Tensor | None, lr: float | torch.Tensor = 0.1, grads=None):
    """Parameters and momentum after two BatchedMuon steps; the second one with `found_inf` and `grads`."""
    params = matrices()
    opt = BatchedMuon(params, lr=0.1, weight_decay=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        if step == 1:
            if grads is not None:
                for p in params:
                    p.grad = grads(p)
            opt.found_inf = found_inf
            opt.param_groups[0]["lr"] = lr
        opt.step()
    return [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params]


def test_found_inf_skips_the_step_on_the_device():
    """The device guard's flag: 1 leaves weights and momentum as they were, NaN gradients included; 0 gives
    exactly the unguarded step."""
    def first_step_only():
        params = matrices()
        opt = BatchedMuon(params, lr=0.1, weight_decay=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params]

    before = first_step_only()
    skipped = stepped(torch.tensor(1.0), grads=lambda p: torch.full_like(p, math.nan))
    assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], skipped[0] + skipped[1]))
    kept, plain = stepped(torch.tensor(0.0)), stepped(None)
    assert all(torch.equal(a, b) for a, b in zip(kept[0] + kept[1], plain[0] + plain[1]))
    assert not all(torch.equal(a, b) for a, b in zip(kept[0], before[0]))


def test_a_tensor_learning_rate_steps_as_the_float_one():
    """train.cuda_graph replays the step with the LR in a 0-d tensor; the update is the float LR's."""
    floats, tensors = stepped(None, lr=0.05), stepped(None, lr=torch.tensor(0.05))
    for a, b in zip(floats[0], tensors[0]):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
