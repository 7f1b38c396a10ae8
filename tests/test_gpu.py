"""GPU-only checks (skipped without CUDA): bf16 autocast, torch.compile and CUDA RNG in checkpoints."""

import math

import pytest
import torch
from conftest import TINY, losses, sampling_evaluation
from test_multiply_variants import VARIANTS

import latentforge
from latentforge.engine.checkpoint import load_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_compiled_training_on_cuda(runs_dir):
    run = latentforge.train("multiply/tiny", *TINY, "train.steps=30", "train.device=cuda", "train.precision=bf16",
                            "train.compile=true", name="gpu", runs_dir=runs_dir)
    values = losses(run.path)
    assert run.info["device"].startswith("cuda") and all(math.isfinite(v) for v in values.values())
    assert values[30] < values[1]
    state = load_checkpoint(run.checkpoint_path("latest"))
    assert "cuda" in state["rng"]


def test_bf16_matches_fp32_on_cuda(runs_dir):
    fp32 = latentforge.train("multiply/tiny", *TINY, "train.device=cuda", name="fp32", runs_dir=runs_dir)
    bf16 = latentforge.train("multiply/tiny", *TINY, "train.device=cuda", "train.precision=bf16", name="bf16",
                             runs_dir=runs_dir)
    a, b = losses(fp32.path), losses(bf16.path)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2)


def test_compiled_path_matches_eager_on_cuda(runs_dir):
    """The fast path (torch.compile, bf16) follows the eager path's loss curve within bf16 tolerance."""
    common = (*TINY, "train.steps=30", "train.device=cuda", "train.precision=bf16", "optim.name=adamw",
              "optim.lr=1e-3")
    eager = latentforge.train("multiply/tiny", *common, name="eager", runs_dir=runs_dir)
    fast = latentforge.train("multiply/tiny", *common, "train.compile=true", name="fast", runs_dir=runs_dir)
    a, b = losses(eager.path), losses(fast.path)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2, abs=2e-2)


def test_resume_on_cuda_continues(runs_dir):
    latentforge.train("multiply/tiny", *TINY, "train.device=cuda", name="r", runs_dir=runs_dir)
    run = latentforge.resume("r", "train.steps=20", runs_dir=runs_dir)
    assert run.status == "finished" and sorted(losses(run.path)) == list(range(1, 21))


def test_a_stop_during_an_evaluation_on_cuda_resumes_exactly(runs_dir, monkeypatch):
    """An evaluation that draws from the CUDA generator, abandoned by SIGTERM and redone on resume: it hands the
    CUDA generator back as it found it, so dropout's masks, and the losses, are the straight run's."""
    common = (*TINY, "model.dropout=0.1", "train.device=cuda", "train.deterministic=true")
    sampling_evaluation(monkeypatch, device="cuda")
    straight = latentforge.train("multiply/tiny", *common, name="straight", runs_dir=runs_dir)
    sampling_evaluation(monkeypatch, 6, device="cuda")
    part = latentforge.train("multiply/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted" and part.info["step"] == 6
    sampling_evaluation(monkeypatch, device="cuda")
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert resumed.status == "finished" and losses(resumed.path) == losses(straight.path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_in_bf16_on_cuda(runs_dir, variant):
    """bf16 autocast through every model: cross-attention biases, continuous thoughts, probes."""
    run = latentforge.train("multiply/tiny", *TINY, *VARIANTS[variant], "train.steps=20", "train.device=cuda",
                            "train.precision=bf16", name=variant, runs_dir=runs_dir)
    values = losses(run.path)
    assert run.status == "finished" and all(math.isfinite(v) for v in values.values())
    assert "test/exact_match" in run.info["last_eval"]


def test_gssm_sequences_and_optimum_are_the_same_on_cuda():
    """The counter-based generator gives the GPU the CPU's sequences, and the filter agrees."""
    from latentforge.config import load_config
    from latentforge.tasks.gssm.data import generate
    from latentforge.tasks.gssm.graph import Graph

    graph = Graph(load_config("gssm/dense").data.nodes, seed=0)
    cpu = generate(graph, key=3, first=100, n=64, length=64, device=torch.device("cpu"), optimum=True)
    gpu = generate(graph, key=3, first=100, n=64, length=64, device=torch.device("cuda"), optimum=True)
    assert torch.equal(cpu.tokens, gpu.tokens.cpu()) and torch.equal(cpu.states, gpu.states.cpu())
    assert torch.allclose(cpu.optimal, gpu.optimal.cpu(), rtol=1e-9)


def test_gssm_trains_on_cuda_in_bf16(runs_dir):
    run = latentforge.train("gssm/tiny", "train.steps=40", "train.device=cuda", "train.precision=bf16",
                            "train.compile=true", name="gssm", runs_dir=runs_dir)
    last = run.info["last_eval"]
    assert last["test/gap"] > -3 * last["test/gap_se"] and values_finite(losses(run.path))


def test_each_sdpa_backend_trains_as_torchs_choice_on_cuda(runs_dir):
    """train.sdpa_backends on the GPU: flash, cuDNN and the memory-efficient kernel each train the compiled bf16
    step as torch's own choice does."""
    common = (*TINY, "train.steps=20", "train.device=cuda", "train.precision=bf16", "train.compile=true")
    reference = losses(latentforge.train("multiply/tiny", *common, name="auto", runs_dir=runs_dir).path)
    for backend in ("flash", "cudnn", "efficient"):
        run = latentforge.train("multiply/tiny", *common, f"train.sdpa_backends=[{backend}]", name=backend,
                                runs_dir=runs_dir)
        values = losses(run.path)
        assert sorted(values) == list(range(1, 21))
        for step in values:
            assert values[step] == pytest.approx(reference[step], rel=2e-2, abs=2e-2), backend


SMALL_ARC = ("model.grid_slots=true", "model.patch_slots=false", "model.d_model=64", "model.n_head=4",
             "model.encoder_layers=1", "model.pool_layers=1", "model.decoder_layers=1", "train.batch_size=16",
             "train.steps=20", "train.log_every=1", "train.eval_every=20", "checkpoint.every=20", "data.eval_grids=64",
             "train.device=cuda", "train.precision=bf16", "train.deterministic=true")


MISS_SPLIT = ("model.autoregressive=true", "model.miss_slots=true", "model.miss_above_cells=64",
              "model.codebook_options.split_crowded=1")


@pytest.mark.parametrize("preset, extra", [("dvae/arc", ()), ("dvae/arc-reinmax", ()), ("dvae/arc-vq", ()),
                                           ("dvae/arc-fsq", ()), ("dvae/arc-vq", MISS_SPLIT),
                                           ("dvae/arc-vq", (*MISS_SPLIT, "model.miss_context=adaptive")),
                                           ("dvae/arc-vq", (*MISS_SPLIT, "model.miss_context=adaptive",
                                                            "model.miss_axes=true")),
                                           ("dvae/arc-vq-pairs", ()), ("dvae/arc-vq-interval", ())],
                         ids=["arc", "arc-reinmax", "arc-vq", "arc-fsq", "arc-vq-miss-split", "arc-vq-miss-adaptive",
                              "arc-vq-miss-axes", "arc-vq-pairs", "arc-vq-interval"])
def test_dvae_codebooks_train_compiled_as_eager_on_cuda(runs_dir, preset, extra):
    """Every codebook kind compiles (VQ's package lookup runs eagerly inside the compiled loss) and trains as
    the eager path does; so does VQ with split_crowded under the miss layout (autoregressive, both layouts), with
    the fitted rule or the adaptive context (about the middle or each grid's axes), and with codes that name
    the adaptive context's ranks, two misses to a code (dvae/arc-vq-pairs) or interval codes (dvae/arc-vq-interval)."""
    eager = latentforge.train(preset, *SMALL_ARC, *extra, name="eager", runs_dir=runs_dir)
    fast = latentforge.train(preset, *SMALL_ARC, *extra, "train.compile=true", name="fast", runs_dir=runs_dir)
    a, b = losses(eager.path), losses(fast.path)
    assert sorted(a) == sorted(b) == list(range(1, 21)) and values_finite(b)
    assert b[20] < b[1]
    # Nearest-code assignments that flip under bf16 rounding make later steps drift apart: compare the first
    # steps each, and the last five on average.
    for step in range(1, 6):
        assert b[step] == pytest.approx(a[step], rel=5e-2, abs=2e-2)
    assert sum(b[s] for s in range(16, 21)) == pytest.approx(sum(a[s] for s in range(16, 21)), rel=0.2)
    assert "test/token_acc" in fast.info["last_eval"]


def values_finite(values: dict[int, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())


def steps_without_host_sync(trainer, steps: int) -> None:
    """Training steps during which any host-device sync raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_train_step_never_syncs_with_the_host_on_cuda(optimizer):
    """The hot loop with the device-side guard and fused AdamW (or BatchedMuon): any host-device sync in
    train_step raises."""
    from latentforge.config import load_config
    from latentforge.engine.loop import Trainer

    cfg = load_config("bench/configs/gpt2-small.yaml", ["model.n_layer=2", "model.d_model=64", "model.n_head=2",
                                                        "model.vocab_size=256", "data.seq_len=32",
                                                        "train.batch_size=4", "train.device=cuda",
                                                        f"optim.name={optimizer}"])
    trainer = Trainer(cfg, quiet=True)
    assert type(trainer.guard).__name__ == "DeviceGuard"
    for _ in range(3):  # warm-up: lazy optimizer state, allocator
        trainer.train_step()
    steps_without_host_sync(trainer, 5)
    assert trainer.guard.read() == []


def test_async_save_from_pinned_buffers_on_cuda(runs_dir):
    """The snapshot is the live state at save time, in pinned buffers that the next save reuses; an
    async-saving CUDA run resumes from its checkpoint."""
    from latentforge.engine.async_checkpoint import snapshot

    model = torch.nn.Linear(8, 8).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.randn(4, 8, device="cuda")).sum().backward()
    optimizer.step()
    pinned: dict = {}
    first = snapshot({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, pinned)
    assert pinned and all(buffer.is_pinned() for buffer in pinned.values())
    assert torch.equal(first["model"]["weight"], model.weight.detach().cpu())
    assert torch.equal(first["optimizer"]["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"].cpu())
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on after the save
    second = snapshot({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, pinned)
    assert second["model"]["weight"].data_ptr() == first["model"]["weight"].data_ptr()  # the buffer is reused
    assert torch.equal(second["model"]["weight"], model.weight.detach().cpu())

    common = (*TINY, "train.device=cuda", "optim.name=adamw", "checkpoint.async_save=true")
    run = latentforge.train("multiply/tiny", *common, name="async", runs_dir=runs_dir)
    assert run.status == "finished" and load_checkpoint(run.checkpoint_path())["step"] == 12
    extended = latentforge.resume("async", "train.steps=16", runs_dir=runs_dir)
    assert extended.status == "finished" and sorted(losses(extended.path))[-1] == 16


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_cuda_graph_replays_the_eager_update_on_cuda(runs_dir, optimizer):
    """train.cuda_graph records the update once and replays it: the same losses as the eager update, step
    for step, and an exact resume (the graph is recorded anew after it). Deterministic kernels: cuDNN's
    attention backward otherwise rounds differently from run to run. Fused AdamW takes the graph's tensor LR
    in the same arithmetic as a float one; BatchedMuon's decay and update round differently with it."""
    common = (*TINY, "train.steps=24", "train.device=cuda", "train.precision=bf16", f"optim.name={optimizer}",
              "optim.lr=1e-3", "train.compile=true", "checkpoint.every=12", "checkpoint.keep=2",
              "train.deterministic=true")
    eager = latentforge.train("multiply/tiny", *common, name="eager", runs_dir=runs_dir)
    graph = latentforge.train("multiply/tiny", *common, "train.cuda_graph=true", name="graph", runs_dir=runs_dir)
    whole = losses(graph.path)
    assert sorted(whole) == list(range(1, 25))
    if optimizer == "adamw":
        assert whole == losses(eager.path)
    else:
        assert whole == pytest.approx(losses(eager.path), rel=1e-3)
    resumed = latentforge.resume("graph", checkpoint=12, runs_dir=runs_dir)
    assert losses(resumed.path) == whole


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_cuda_graph_step_skips_a_bad_update_and_never_syncs_on_cuda(optimizer):
    """Inside the recorded update the device guard still judges each step (a non-finite loss leaves the
    weights and the optimizer's step count alone), and a replayed step never waits for the GPU."""
    from latentforge.config import load_config
    from latentforge.engine.loop import Trainer

    cfg = load_config("multiply/tiny", ["train.device=cuda", f"optim.name={optimizer}", "train.cuda_graph=true",
                                        "train.precision=bf16"])
    trainer = Trainer(cfg, quiet=True)
    for _ in range(4):  # two eager warm-up steps, the recording, one replay
        trainer.train_step()
    assert trainer.step_graph.graph is not None and trainer.guard.read() == []
    steps_without_host_sync(trainer, 5)
    head = trainer.model.transformer.head.weight
    with torch.no_grad():
        head[0, 0] = math.nan
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    steps = trainer.optimizer.state[head]["step"].item()
    trainer.train_step()
    bad = trainer.guard.read()
    assert [b.step for b in bad] == [trainer.step] and "non-finite" in bad[0].reason
    assert trainer.optimizer.state[head]["step"].item() == steps
    for name, p in trainer.model.named_parameters():
        assert torch.allclose(p.detach(), before[name], rtol=0, atol=0, equal_nan=True), name


def test_padded_vocabulary_trains_compiled_in_a_cuda_graph(runs_dir):
    """The GPT-2 bench's path: a vocabulary padded to a multiple of 64, the loss compiled with the model and
    the whole update in a CUDA graph, following the eager padded run within bf16 tolerance."""
    common = ("model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.vocab_size=1000",
              "model.vocab_multiple=64", "data.seq_len=64", "train.batch_size=8", "train.steps=20",
              "train.log_every=1", "train.device=cuda")
    eager = latentforge.train("bench/configs/gpt2-small.yaml", *common, name="eager", runs_dir=runs_dir)
    fast = latentforge.train("bench/configs/gpt2-small.yaml", *common, "train.compile=true", "train.cuda_graph=true",
                             name="fast", runs_dir=runs_dir)
    assert eager.model().embed.weight.shape[0] == 1024
    a, b = losses(eager.path), losses(fast.path)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("preset", ["multiply/tiny", "lm/tiny"])
def test_an_autocast_residual_follows_the_fp32_stream_compiled_on_cuda(runs_dir, preset):
    """model.residual=autocast (the GPT-2 bench's fastest setting): the compiled bf16 run with a bf16 residual
    stream follows the one with an fp32 stream within bf16 tolerance, in both transformers."""
    common = (*(TINY if preset.startswith("multiply") else ()), "train.steps=30", "train.log_every=1",
              "train.device=cuda", "train.precision=bf16", "train.compile=true")
    fp32 = latentforge.train(preset, *common, name="fp32", runs_dir=runs_dir)
    bf16 = latentforge.train(preset, *common, "model.residual=autocast", name="bf16", runs_dir=runs_dir)
    a, b = losses(fp32.path), losses(bf16.path)
    assert sorted(a) == sorted(b) == list(range(1, 31)) and a != b
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2, abs=2e-2)


def test_adaptive_context_fitted_on_cuda_equals_the_cpu_fit():
    """The task fits the context's tables on the run's device: the same tables as on the CPU."""
    from latentforge.tasks.dvae.context import AdaptiveContext
    from latentforge.tasks.dvae.data import load_arc

    grids = load_arc("train").select(slice(0, 300))
    cpu = AdaptiveContext(10, axes=True).fit(grids.tokens, grids.shapes)
    cuda = AdaptiveContext(10, axes=True).fit(grids.tokens.cuda(), grids.shapes.cuda())
    for name, value in cpu.state_dict().items():
        assert torch.equal(cuda.state_dict()[name].cpu(), value), name


def test_interval_layout_on_cuda_equals_the_cpus():
    """A code sequence encoded on a GPU decodes on a CPU: the interval layout (floors of the context's probabilities
    times the values left) of held-out grids is the same on both devices."""
    from latentforge.tasks.dvae.context import AdaptiveContext, colour_ranks, inside_cells, interval_runs, symmetry_axes
    from latentforge.tasks.dvae.data import load_arc

    train, test = load_arc("train").select(slice(0, 300)), load_arc("eval").select(slice(0, 256))
    cpu = AdaptiveContext(10, axes=True).fit(train.tokens, train.shapes)
    cuda = AdaptiveContext(10, axes=True).cuda()
    cuda.load_state_dict(cpu.state_dict())
    layouts = []
    for context, device in ((cpu, "cpu"), (cuda, "cuda")):
        tokens, shapes = test.tokens.long().to(device), test.shapes.long().to(device)
        probs, choices = context.ranked(tokens, shapes, symmetry_axes(tokens, shapes))
        inside = inside_cells(shapes, tokens.shape[-1])
        runs = interval_runs(probs, colour_ranks(choices, tokens.flatten(1)), inside, 126, 512)
        layouts.append([r.cpu() for r in runs])
    for a, b in zip(*layouts):
        assert torch.equal(a, b)
