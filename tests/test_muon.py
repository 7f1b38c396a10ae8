"""BatchedMuon (Newton-Schulz on stacks of same-shape matrices) against torch.optim.Muon."""

import copy

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
