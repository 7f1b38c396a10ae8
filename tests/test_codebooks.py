"""The discrete bottlenecks: forward/backward of every kind, evaluation codes and `embed`, Gumbel's hardness,
ReinMax against the authors' package, VQ's k-means init and dead-code reset, FSQ's code count."""

import math

import pytest
import torch
from reinmax import reinmax as reference_reinmax

from latentforge.nn.codebooks import CODEBOOKS, build_codebook, default_fsq_levels, reinmax

KINDS = list(CODEBOOKS)
CATEGORICAL = ["gumbel", "reinmax", "softmax"]
DIM, SIZE = 16, 64  # 64 codes: fsq's default levels are [8, 8]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs a CUDA GPU")])]


def make(kind: str, device: str = "cpu", **options):
    torch.manual_seed(0)
    return build_codebook(kind, DIM, SIZE, **options).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward(kind, precision, device):
    """Gradients reach the input (and the logits layer of categorical kinds), all finite, under bf16 autocast
    too; codes and logits come out in float32 whatever the precision."""
    codebook = make(kind, device).train()
    encoder = torch.nn.Linear(DIM, DIM).to(device)
    x = torch.randn(4, 6, DIM, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        h = encoder(x)
        h.retain_grad()
        out = codebook(h, temperature=0.7, hardness=1.0)
        loss = (out.z * torch.randn_like(out.z)).sum() + out.loss
    loss.backward()
    assert out.z.shape == (4, 6, DIM) and out.z.dtype == torch.float32
    assert out.codes.shape == (4, 6) and out.codes.dtype == torch.int64
    assert 0 <= out.codes.min() and out.codes.max() < codebook.size == SIZE
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0
    assert torch.isfinite(encoder.weight.grad).all() and encoder.weight.grad.abs().sum() > 0
    if kind in CATEGORICAL:
        assert out.logits.shape == (4, 6, SIZE) and out.logits.dtype == torch.float32
        grad = codebook.to_logits.weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    else:
        assert out.logits is None
    if kind == "vq":
        assert out.loss > 0  # the commitment loss


@pytest.mark.parametrize("kind", KINDS)
def test_eval_codes_are_argmax_or_nearest_and_embed_reproduces_z(kind):
    codebook = make(kind)
    h = torch.randn(16, 8, DIM)
    if kind == "vq":
        codebook.train()(h)  # k-means init and one EMA update
    codebook.eval()
    with torch.no_grad():
        out = codebook(h, temperature=0.5, hardness=0.0)
        first = codebook(h)
        if kind in CATEGORICAL:
            assert torch.equal(out.codes, out.logits.argmax(dim=-1))
            assert torch.equal(out.z, codebook.embedding.weight[out.codes])  # the one-hot row, no noise
        elif kind == "vq":
            distances = torch.cdist(h.view(-1, DIM), codebook.vq.codebook)
            chosen = distances.gather(1, out.codes.view(-1, 1)).squeeze(1)
            assert torch.allclose(chosen, distances.min(dim=-1).values, atol=1e-5)
            assert out.loss == 0
        assert torch.equal(out.codes, first.codes)  # deterministic: no sampling at evaluation
        assert torch.allclose(codebook.embed(out.codes), out.z, atol=1e-6)


def test_gumbel_hardness_goes_from_soft_to_one_hot():
    """With the embedding E = I (K = dim), z = y @ E is the relaxed one-hot y itself."""
    torch.manual_seed(0)
    codebook = build_codebook("gumbel", DIM, DIM).train()
    with torch.no_grad():
        codebook.embedding.weight.copy_(torch.eye(DIM))
    h = torch.randn(8, 5, DIM)
    soft = codebook(h, temperature=1.0, hardness=0.0).z
    assert torch.allclose(soft.sum(-1), torch.ones(8, 5), atol=1e-5)
    assert (soft.max(-1).values < 0.99).all()  # soft rows, not one-hot
    hard = codebook(h, temperature=1.0, hardness=1.0)
    assert torch.allclose(hard.z, torch.nn.functional.one_hot(hard.codes, DIM).float(), atol=1e-6)


def test_gumbel_straight_through_gradient_is_the_soft_samples():
    """hardness only changes the forward value: with the same noise, hardness 0 and 1 give the same gradient."""
    codebook = make("gumbel").train()
    h = torch.randn(4, 3, DIM)
    upstream = torch.randn(4, 3, DIM)
    grads = []
    for hardness in (0.0, 1.0):
        torch.manual_seed(1)
        codebook.zero_grad()
        (codebook(h, hardness=hardness).z * upstream).sum().backward()
        grads.append(codebook.to_logits.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_reinmax_matches_the_package(temperature):
    """Same one-hot sample from the same random state, and the same gradient w.r.t. the logits (float64)."""
    logits = (3 * torch.randn(5, 7, 11, dtype=torch.float64)).requires_grad_()
    upstream = torch.randn(5, 7, 11, dtype=torch.float64)
    torch.manual_seed(3)
    ours, index = reinmax(logits, temperature)
    torch.manual_seed(3)
    theirs, _ = reference_reinmax(logits, temperature)
    assert torch.equal(ours, theirs) and torch.equal(index, theirs.argmax(-1))
    (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), logits)
    (theirs_grad,) = torch.autograd.grad((theirs * upstream).sum(), logits)
    assert torch.allclose(ours_grad, theirs_grad, rtol=1e-10, atol=1e-12)
    assert ours_grad.abs().sum() > 0


def test_reinmax_codebook_matches_the_package():
    """Through the module (float32): same codes, and the gradient w.r.t. h of z = sample @ E agrees."""
    codebook = make("reinmax").train()
    h = torch.randn(4, 6, DIM, requires_grad=True)
    upstream = torch.randn(4, 6, DIM)
    torch.manual_seed(5)
    out = codebook(h, temperature=0.5)
    (ours,) = torch.autograd.grad((out.z * upstream).sum(), h)
    h_ref = h.detach().clone().requires_grad_()
    torch.manual_seed(5)
    sample, _ = reference_reinmax(codebook.to_logits(h_ref), 0.5)
    (theirs,) = torch.autograd.grad(((sample @ codebook.embedding.weight) * upstream).sum(), h_ref)
    assert torch.equal(out.codes, sample.argmax(-1))
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_vq_kmeans_init_happens_on_the_first_batch():
    codebook = make("vq").train()
    assert not codebook.vq._codebook.initted and (codebook.vq.codebook == 0).all()
    center = torch.full((DIM,), 50.0)
    h = center + torch.randn(16, 32, DIM)
    codebook(h)
    assert codebook.vq._codebook.initted
    # Every code now sits among the data (from zeros far away), and the first batch uses many of them.
    assert ((codebook.vq.codebook - center).norm(dim=-1) < 2 * math.sqrt(DIM)).all()
    assert codebook.eval()(h).codes.unique().numel() > SIZE // 2


def test_vq_dead_codes_are_reset():
    """k-means spreads the codes over a wide first batch; the data then moves to a small region that only a few
    codes are near. The codes it never chooses decay below the threshold and are moved into that region."""
    codebook = make("vq", decay=0.8).train()
    codebook(10 * torch.randn(16, 32, DIM))
    center = torch.full((DIM,), 3.0)
    region = center + 0.5 * torch.randn(16, 32, DIM)
    far = (codebook.vq.codebook - center).norm(dim=-1) > 4 * math.sqrt(DIM) * 0.5
    used_before = codebook.eval()(region).codes.unique().numel()
    assert far.sum() > SIZE // 2 and used_before < SIZE // 4
    codebook.train()
    for _ in range(30):
        codebook(center + 0.5 * torch.randn(16, 32, DIM))
    assert ((codebook.vq.codebook - center).norm(dim=-1) < 4 * math.sqrt(DIM) * 0.5).all()
    assert codebook.eval()(region).codes.unique().numel() > SIZE // 2


@pytest.mark.parametrize("reset", ["uniform", "distance"])
def test_vq_distance_reset_restarts_a_dead_code_where_the_codes_serve_the_batch_worst(reset):
    """dead_code_reset=distance: every code sits on A and the batch is 63 vectors at A and one at B, so the one
    vector far from every code is B and the dead code restarts there (k-means++'s rule); uniform draws A but
    once in 64 (seeded here so that it draws A)."""
    torch.manual_seed(0)
    codebook = make("vq", dead_code_reset=reset).train()
    package = codebook.vq._codebook
    a, b = torch.zeros(DIM), torch.full((DIM,), 10.0)
    package.embed.data[0] = a
    batch = torch.cat([a.expand(63, DIM), b[None]])[torch.randperm(64)]
    dead = torch.zeros(1, SIZE, dtype=torch.bool)
    dead[0, 3] = True
    package.replace(batch[None], batch_mask=dead)
    assert torch.equal(package.embed[0, 3], b if reset == "distance" else a)
    assert (package.embed[0, :3] == a).all() and (package.embed[0, 4:] == a).all()


def test_vq_distance_reset_draws_like_kmeans_plus_plus():
    """Two dead codes, every code on A, and three copies of a far vector B in the batch: the first draw is a
    copy of B, which puts every copy of B at distance 0, so the second is not B again (one code per pattern).
    In a training forward with every code dead (a huge threshold) and more vectors than codes, each code
    restarts on its own vector of the batch."""
    torch.manual_seed(0)
    codebook = make("vq", dead_code_reset="distance").train()
    package = codebook.vq._codebook
    a, b = torch.zeros(DIM), torch.full((DIM,), 10.0)
    package.embed.data[0] = a
    batch = torch.cat([a.expand(61, DIM), b.expand(3, DIM)])
    dead = torch.zeros(1, SIZE, dtype=torch.bool)
    dead[0, :2] = True
    package.replace(batch[None], batch_mask=dead)
    assert sorted((package.embed[0, :2] == b).all(-1).tolist()) == [False, True]
    codebook = make("vq", dead_code_reset="distance", threshold_ema_dead_code=1e9).train()
    h = torch.randn(4, 32, DIM)
    codebook(h)
    distance = (codebook.vq.codebook[:, None] - h.reshape(-1, DIM)[None]).norm(dim=-1)
    on = distance.argmin(-1)
    assert (distance.min(-1).values < 1e-5).all() and on.unique().numel() == SIZE


def spread_codebook(split: int):
    """A VQ codebook with split_crowded=split whose codes each sit alive on their own pattern, 10 apart or more,
    but codes 0 and 1: twins 0.01 apart on the first pattern (code 0 the less used)."""
    torch.manual_seed(0)
    codebook = make("vq", dead_code_reset="distance", split_crowded=split).train()
    package = codebook.vq._codebook
    patterns = 10.0 * torch.randn(SIZE - 1, DIM)
    package.embed.data[0] = torch.cat([patterns[:1] + 0.01, patterns])
    package.cluster_size.data.fill_(50.0)
    package.cluster_size.data[0, 0] = 10.0
    package.embed_avg.data.copy_(package.embed * package.cluster_size.unsqueeze(-1))  # the EMA's own state
    return codebook, package, patterns


def test_vq_split_crowded_moves_the_less_used_twin_to_the_pattern_that_shares_a_code():
    """split_crowded=1 with the batch's one unserved pattern B far away: the less used twin moves to B (the
    distance draw) and no other code moves. With split 2 the second pick is not the other twin (that pattern
    keeps a code) but one of the next closest pair."""
    b = torch.full((DIM,), 100.0)
    for split in (1, 2):
        codebook, package, patterns = spread_codebook(split)
        before = package.embed[0].clone()
        package.expire_codes_(torch.cat([patterns, b[None]])[None])
        moved = (package.embed[0] != before).any(-1)
        assert moved.sum() == split and moved[0] and not moved[1]
        assert torch.equal(package.embed[0, 0], b)


def test_vq_split_crowded_runs_in_a_training_forward_and_not_in_evaluation():
    """The package calls the restart in its training forward: a live twin moves there (split 1) and not without
    split_crowded (no code is dead), nor in evaluation."""
    h = torch.full((1, 4, DIM), 100.0)
    moved = []
    for split, train in ((1, True), (0, True), (1, False)):
        codebook, package, _ = spread_codebook(split)
        package.initted.data.fill_(True)  # no k-means start on this batch
        before = package.embed[0].clone()
        codebook.train(train)(h)
        moved.append(bool(((package.embed[0] - before).norm(dim=-1) > 50).any()))
    assert moved == [True, False, False]


def test_vq_split_crowded_leaves_a_dead_codes_live_neighbour_alone():
    """A dead code beside a live one makes no twin: with split 1 the dead code and the less used of the true twins
    restart, the dead code's live neighbour stays."""
    codebook, package, patterns = spread_codebook(1)
    package.embed.data[0, 5] = package.embed[0, 4] + 0.001
    package.cluster_size.data[0, 5] = 0.0  # dead
    before = package.embed[0].clone()
    package.expire_codes_(torch.cat([patterns, torch.full((1, DIM), 100.0), -torch.full((1, DIM), 100.0)])[None])
    moved = (package.embed[0] != before).any(-1)
    assert moved.nonzero().flatten().tolist() == [0, 5]


def _rank_resets(rank: int, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        codebook = make("vq", dead_code_reset="distance").train()  # built in sync across the two processes
        torch.manual_seed(rank)  # the draw must not depend on each process's own random state
        package = codebook.vq._codebook
        a, b = torch.zeros(DIM), torch.full((DIM,), 100.0)
        package.embed.data[0] = a
        # Every code on A. Only the second process's batch (longer than the first's) holds B, far from every code,
        # and vectors scattered around A, each as likely as the next to be drawn after B.
        batch = a.expand(10, DIM) if rank == 0 else torch.cat([a.expand(40, DIM), b[None], torch.randn(23, DIM)])
        dead = torch.zeros(1, SIZE, dtype=torch.bool)
        dead[0, [3, 7]] = True
        package.replace(batch[None], batch_mask=dead)
        codes = [torch.empty_like(package.embed[0]) for _ in range(2)]
        dist.all_gather(codes, package.embed[0].contiguous())
        assert torch.equal(codes[0], codes[1])
        restarted = package.embed[0, [3, 7]]
        assert sorted((restarted == b).all(-1).tolist()) == [False, True] and not (restarted == a).all(-1).any()
        # split_crowded: both processes move the same twin, to B, which only the second process's batch holds.
        codebook, package, patterns = spread_codebook(1)  # the same on both (seeded)
        torch.manual_seed(rank)
        package.expire_codes_((patterns if rank == 0 else torch.cat([patterns, b[None]]))[None])
        dist.all_gather(codes, package.embed[0].contiguous())
        assert torch.equal(codes[0], codes[1]) and torch.equal(package.embed[0, 0], b)
    finally:
        dist.destroy_process_group()


def test_vq_distance_reset_draws_over_every_process_and_agrees_across_them(tmp_path):
    """Two real processes: the far vector is in one process's batch only, yet both restart a dead code on it
    (and, with split_crowded, the same twin), and both codebooks stay the same."""
    # spawn, not fork: a forked child can hang on the thread pool of a parent that has already run torch ops.
    torch.multiprocessing.start_processes(_rank_resets, args=(str(tmp_path / "store"),), nprocs=2,
                                          start_method="spawn")


def test_fsq_code_count_is_the_product_of_levels():
    torch.manual_seed(0)
    codebook = build_codebook("fsq", DIM, 60, levels=[5, 4, 3])
    assert codebook.size == codebook.fsq.codebook_size == 60
    every_code = codebook.embed(torch.arange(60).view(1, 60))
    assert every_code.shape == (1, 60, DIM) and every_code[0].unique(dim=0).shape[0] == 60
    # The package's codes of its own quantized points are the indices back.
    levels = codebook.fsq.indices_to_level_indices(torch.arange(60))
    assert torch.equal(codebook.fsq.codes_to_indices(codebook.fsq._indices_to_codes(torch.arange(60))).long(),
                       torch.arange(60)) and levels.shape == (60, 3)
    # Inputs of scale 3 reach every level (at 100 they saturate at the ends and reach about 30 of the codes).
    codes = codebook.eval()(3 * torch.randn(64, 32, DIM)).codes
    assert codes.min() >= 0 and codes.max() < 60 and codes.unique().numel() > 50


def test_fsq_default_levels():
    assert default_fsq_levels(512) == [8, 8, 8] and math.prod(default_fsq_levels(1000)) == 1000
    assert build_codebook("fsq", DIM, 512).levels == [8, 8, 8]
    with pytest.raises(ValueError, match="give levels explicitly"):
        build_codebook("fsq", DIM, 17)
    with pytest.raises(ValueError, match="not the 64"):
        build_codebook("fsq", DIM, 64, levels=[8, 8, 8])


def test_build_codebook_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown codebook kind 'vqq'"):
        build_codebook("vqq", DIM, SIZE)
    with pytest.raises(ValueError, match="unknown option.*levels.*for codebook 'gumbel'"):
        build_codebook("gumbel", DIM, SIZE, levels=[8, 8])
    with pytest.raises(ValueError, match="decay"):
        build_codebook("vq", DIM, SIZE, decay=1.5)
    with pytest.raises(ValueError, match="dead_code_reset must be uniform or distance"):
        build_codebook("vq", DIM, SIZE, dead_code_reset="kmeans")
    with pytest.raises(ValueError, match="split_crowded must be in"):
        build_codebook("vq", DIM, SIZE, split_crowded=SIZE, dead_code_reset="distance")
    for options in ({}, {"dead_code_reset": "distance", "threshold_ema_dead_code": 0}):
        with pytest.raises(ValueError, match="split_crowded moves codes by the distance draw"):
            build_codebook("vq", DIM, SIZE, split_crowded=1, **options)


def test_vq_cosine_picks_the_code_of_highest_cosine_in_its_projected_space():
    """`cosine` with a `codebook_dim` below dim: codes are unit vectors in the projected space, each slot gets
    the one of highest cosine similarity with its projection, and embed() gives back z."""
    codebook = make("vq", codebook_dim=4, cosine=True)
    h = torch.randn(16, 8, DIM)
    codebook.train()(h)
    codebook.eval()
    with torch.no_grad():
        out = codebook(h)
        codes = codebook.vq.codebook  # (SIZE, 4)
        assert codes.shape == (SIZE, 4) and torch.allclose(codes.norm(dim=-1), torch.ones(SIZE), atol=1e-4)
        projected = torch.nn.functional.normalize(codebook.vq.project_in(h), dim=-1).view(-1, 4)
        similarity = projected @ codes.T
        chosen = similarity.gather(1, out.codes.view(-1, 1)).squeeze(1)
        assert torch.allclose(chosen, similarity.max(dim=-1).values, atol=1e-5)
        assert torch.allclose(codebook.embed(out.codes), out.z, atol=1e-6)
