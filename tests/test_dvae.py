"""dvae: the loss terms, the model, and the task end to end through the CLI."""

import json
import math

import pytest
import torch

import latentforge
from latentforge.config import load_config
from latentforge.tasks.dvae import task as dvae_task
from latentforge.tasks.dvae.losses import kl_uniform, reconstruction, tc_decomposition, usage_penalty
from latentforge.tasks.dvae.model import cells_per_code
from latentforge.tasks.dvae.task import DVAE, LOAD_EDGES, LOAD_NAMES

CPU = torch.device("cpu")
TINY = ["train.steps=12", "train.log_every=4", "train.eval_every=6", "checkpoint.every=6"]


def one_hot_logits(codes: torch.Tensor, K: int) -> torch.Tensor:
    logits = torch.full((*codes.shape, K), -30.0)
    return logits.scatter_(-1, codes.unsqueeze(-1), 30.0)


def test_total_correlation_is_zero_for_independent_codes_and_positive_for_correlated_ones():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (2000, 2), generator=g)
    independent = tc_decomposition(one_hot_logits(codes, 4), codes, dataset_size=1)
    assert abs(float(independent["tc"])) < 0.01
    codes[:, 1] = codes[:, 0]  # the second slot copies the first
    correlated = tc_decomposition(one_hot_logits(codes, 4), codes, dataset_size=1)
    # Per slot: the joint has 4 values instead of 16, log 4 nats of total correlation over 2 slots.
    assert float(correlated["tc"]) == pytest.approx(math.log(4) / 2, abs=0.01)


def test_tc_terms_sum_to_the_sampled_kl():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 3, 5, generator=g)
    codes = torch.distributions.Categorical(logits=logits).sample()
    terms = tc_decomposition(logits, codes, dataset_size=1)
    log_q = torch.log_softmax(logits, -1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert float(sum(terms.values())) == pytest.approx(float((log_q + math.log(5)).mean()), abs=1e-5)


def test_kl_and_usage_vanish_for_uniform_codes():
    uniform = torch.zeros(8, 3, 16)
    assert float(kl_uniform(uniform)) == pytest.approx(0.0, abs=1e-6)
    assert float(usage_penalty(uniform)) == pytest.approx(0.0, abs=1e-6)
    collapsed = one_hot_logits(torch.zeros(8, 3, dtype=torch.long), 16)
    assert float(usage_penalty(collapsed)) == pytest.approx(math.log(16), abs=1e-3)


def test_the_padding_weight_reaches_the_loss():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 10, 11, generator=g)
    targets = torch.randint(0, 10, (4, 10), generator=g)
    targets[:, :4] = 10  # padding cells
    losses = [float(reconstruction(logits, targets, pad_id=10, pad_weight=w)) for w in (0.0, 0.5, 1.0)]
    assert len(set(losses)) == 3
    no_pad = reconstruction(logits[:, 4:], targets[:, 4:], pad_id=10, pad_weight=1.0)
    assert losses[0] == pytest.approx(float(no_pad))
    focal = float(reconstruction(logits, targets, pad_id=10, pad_weight=1.0, focal_gamma=2.0))
    assert focal < losses[2]


@pytest.mark.parametrize("codebook", ["gumbel", "reinmax", "softmax", "vq", "fsq"])
def test_every_codebook_trains_end_to_end(runs_dir, codebook):
    options = ["model.codebook_options={levels: [3, 3]}", "model.codebook_size=9"] if codebook == "fsq" else []
    weights = ["task.weights.usage.start=0", "task.weights.usage.end=0"] if codebook in ("vq", "fsq") else []
    run = latentforge.train("dvae/tiny", *TINY, f"model.codebook={codebook}", *options, *weights,
                            name=codebook, runs_dir=runs_dir)
    assert run.status == "finished"
    last = run.info["last_eval"]
    assert 0 <= last["test/token_acc"] <= 1 and 0 < last["test/codes_used"] <= 1
    assert last["test/code_bits"] == pytest.approx(4 * math.log2(9 if codebook == "fsq" else 8))
    figures = {p.name.split("-step")[0] for p in (run.path / "artifacts").glob("*-step*.png")}
    assert figures == {"reconstructions", "code_usage"}


def test_train_metrics_and_resume_is_exact(runs_dir, monkeypatch):
    from conftest import interrupt_at, losses

    common = [*TINY, "task.weights.tc.start=0.5", "task.weights.tc.end=0.5", "task.mask_fraction.start=0.2",
              "task.mask_fraction.end=0.2"]
    straight = latentforge.train("dvae/tiny", *common, name="straight", runs_dir=runs_dir)
    records = [json.loads(line) for line in (straight.path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r][-1]
    for key in ("loss_recon", "loss_kl", "loss_mi", "loss_tc", "loss_dwkl", "batch_perplexity", "temperature",
                "hardness", "mask_fraction", "token_acc"):
        assert f"train/{key}" in train, key
    interrupt_at(monkeypatch, 5)
    part = latentforge.train("dvae/tiny", *common, name="part", runs_dir=runs_dir)
    assert part.status == "interrupted"
    monkeypatch.undo()
    resumed = latentforge.resume("part", runs_dir=runs_dir)
    assert losses(straight.path) == losses(resumed.path)


def test_categorical_weights_are_refused_for_vq(cli, runs_dir):
    result = cli("train", "dvae/tiny", "model.codebook=vq", "task.weights.kl.start=1", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "needs a categorical codebook" in result.output
    assert not runs_dir.exists()


def test_decode_checks_its_codes(cli, runs_dir):
    assert latentforge.train("dvae/tiny", *TINY, name="d", runs_dir=runs_dir).status == "finished"
    ok = cli("decode", "d", "0 1 2 3", "--runs-dir", runs_dir, "--json")
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.stdout)["grid"].strip().splitlines()) == 8
    for bad in ("0 1 2", "0 1 2 99", "a b c d"):
        result = cli("decode", "d", bad, "--runs-dir", runs_dir)
        assert result.exit_code == 2 and "Traceback" not in result.output


def test_model_shapes_on_arc_sized_grids():
    cfg = load_config("dvae/tiny", ["data.dataset=digits"])
    task = DVAE(cfg, CPU)
    model = task.build_model()
    grids = task.grids("test").tokens[:3]
    logits, out = model(grids)
    assert logits.shape == (3, 64, task.vocab_size) and out.codes.shape == (3, 4)


def test_batches_carry_their_steps_schedules_and_the_loss_reads_them():
    """A compiled loss takes the temperature, hardness, mask fraction and loss weights as tensors of the batch,
    so it compiles once instead of once per value."""
    cfg = load_config("dvae/tiny", ["model.codebook=softmax", "train.grad_accum=2", "train.steps=40",
                                    "task.temperature={kind: linear, start: 1.0, end: 0.1, end_step: 30}",
                                    "task.weights.kl={kind: linear, start: 0.0, end: 2.0, end_step: 30}"])
    task = DVAE(cfg, CPU)
    batch = task.train_batches().batch(14)  # micro-batch 14 of accumulation 2: step 7
    assert float(batch["temperature"]) == pytest.approx(cfg.task.temperature.value(7))
    assert float(batch["weight_kl"]) == pytest.approx(cfg.task.weights.kl.value(7))
    assert batch["temperature"].dim() == 0 and batch["temperature"].device == CPU
    model = task.build_model()
    loss, metrics = task.loss(model, batch)
    assert float(metrics["temperature"]) == float(batch["temperature"])
    assert task.loss(model, {**batch, "weight_kl": torch.tensor(0.0)})[0].item() != loss.item()
    assert task.loss(model, {**batch, "temperature": torch.tensor(0.5)})[0].item() != loss.item()
    plain = {k: batch[k] for k in ("inputs", "targets", "shapes")}  # not from the stream: the last step's values
    assert float(task.loss(model, plain)[1]["temperature"]) == pytest.approx(cfg.task.temperature.value(39))


def test_encode_and_decode_an_arc_grid(cli, runs_dir, tmp_path):
    run = latentforge.train("dvae/tiny", "data.dataset=arc", "train.steps=2", "train.eval_every=2",
                            "data.eval_grids=16", "train.batch_size=4", name="arc", runs_dir=runs_dir)
    assert run.status == "finished" and run.info["last_eval"]["test/examples"] == 16
    grid = tmp_path / "grid.json"
    grid.write_text("[[1, 2, 0], [0, 3, 4]]")
    result = cli("encode", "arc", grid, "--runs-dir", runs_dir, "--json")
    assert result.exit_code == 0, result.output
    encoded = json.loads(result.stdout)
    assert encoded["grid"] == "2 x 3" and len(encoded["codes"].split()) == 4
    decoded = cli("decode", "arc", encoded["codes"], "--runs-dir", runs_dir, "--json")
    assert decoded.exit_code == 0, decoded.output
    bad = tmp_path / "bad.json"
    bad.write_text("[[1, 2], [3]]")
    result = cli("encode", "arc", bad, "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "bad.json" in result.output and "Traceback" not in result.output


def test_patch_slots_tile_the_grid(cli, runs_dir):
    from latentforge.tasks.dvae.model import patch_slot_map

    slots = patch_slot_map(32, 128).view(32, 32)
    assert slots.max() == 127 and set(slots.flatten().bincount().tolist()) == {8}
    assert (slots[:4, :2] == 0).all() and slots[0, 2] == 1 and slots[4, 0] == 16
    run = latentforge.train("dvae/tiny", *TINY, "model.patch_slots=true", name="patch", runs_dir=runs_dir)
    assert run.status == "finished"
    result = cli("train", "dvae/tiny", "model.patch_slots=true", "model.latents=7", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "cannot tile" in result.output


def test_grid_slots_split_the_grid_itself_in_reading_order():
    from latentforge.tasks.dvae.model import grid_slot_layout

    slot, offset = grid_slot_layout(torch.tensor([[2, 3], [4, 4], [1, 2]]), grid_size=4, slots=3)
    canvas = slot.view(3, 4, 4)
    # 2 x 3 = 6 cells over 3 slots: runs of 2 in reading order; outside the grid: slot 3.
    assert canvas[0].tolist() == [[0, 0, 1, 3], [1, 2, 2, 3], [3, 3, 3, 3], [3, 3, 3, 3]]
    assert offset.view(3, 4, 4)[0, :2].tolist() == [[0, 1, 0, 0], [1, 0, 1, 0]]
    # 16 cells over 3 slots: runs as even as can be, 6, 5 and 5, each offset counting from its run's start.
    assert canvas[1].flatten().bincount().tolist() == [6, 5, 5]
    assert offset.view(3, 16)[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    # Fewer cells than slots: one cell a slot, spread over the slots.
    assert canvas[2, 0, :2].tolist() == [0, 1] and (offset.view(3, 16)[2] == 0).all()
    # Every slot is used once a grid has as many cells, and no run is longer than it must be.
    for h in range(1, 5):
        for w in range(1, 5):
            s, _ = grid_slot_layout(torch.tensor([[h, w]]), grid_size=4, slots=3)
            runs = s[s < 3].bincount(minlength=3)
            assert (runs > 0).sum() == min(3, h * w) and runs.max() == -(-h * w // 3)


def test_grid_slots_store_the_shape_and_pin_padding():
    cfg = load_config("dvae/tiny", ["data.dataset=arc", "model.grid_slots=true", "model.latents=6",
                                    "model.codebook_size=32"])
    task = DVAE(cfg, CPU)
    model = task.build_model()
    grids = task.grids("test").tokens[:3]
    logits, out = model(grids)
    assert out.codes.shape == (3, 4) and model.latents == 6
    shapes = task.grids("test").shapes[:3]
    sequence = model.code_sequence(grids, out.codes)
    assert sequence[:, :2].tolist() == (shapes - 1).tolist()
    # Untrained, the decoder still gets every padding cell right and never puts padding inside a grid.
    predicted = logits.argmax(-1).view_as(grids)
    assert ((predicted == task.pad_id) == (grids == task.pad_id)).all()
    assert torch.equal(model.decode_codes(sequence), logits.argmax(-1))
    # Same codes, another shape: the decoder draws the grid that shape says.
    other = sequence.clone()
    other[:, :2] = torch.tensor([1, 2])
    drawn = model.decode_codes(other).view_as(grids)
    assert ((drawn != task.pad_id).sum((1, 2)) == 2 * 3).all()


def test_run_cells_lay_each_slots_run_side_by_side():
    from latentforge.tasks.dvae.model import grid_slot_layout, run_cells

    slot, offset = grid_slot_layout(torch.tensor([[2, 3], [1, 2]]), grid_size=4, slots=3)
    cells = run_cells(slot, offset, slots=3, run_length=6).view(2, 3, 6)  # runs of up to ceil(16 / 3) cells
    # 2 x 3 grid: runs of 2 in reading order, canvas cells (0, 1), (2, 4), (5, 6); 16 marks an empty place.
    assert cells[0].tolist() == [[0, 1, 16, 16, 16, 16], [2, 4, 16, 16, 16, 16], [5, 6, 16, 16, 16, 16]]
    # 1 x 2 grid over 3 slots: one cell a slot, the last slot empty.
    assert cells[1].tolist() == [[0] + [16] * 5, [1] + [16] * 5, [16] * 6]
    # The decoder's place of each cell (slot * run_length + offset) is where run_cells put it, for every shape.
    for h in range(1, 7):
        for w in range(1, 7):
            for slots in (1, 3, 5, 7, 40):
                run_length = -(-36 // slots)
                slot, offset = grid_slot_layout(torch.tensor([[h, w]]), grid_size=6, slots=slots)
                cells = run_cells(slot, offset, slots, run_length)[0]
                inside = slot[0] < slots
                places = (slot[0] * run_length + offset[0])[inside]
                assert torch.equal(cells[places], torch.arange(36)[inside])
                assert (cells < 36).sum() == h * w


def packing_run(pack: bool) -> float:
    """Cell accuracy of a tiny grid-slot VQ model after 300 steps on random 4 x 4 grids, 2 cells per code."""
    from latentforge.tasks.dvae.model import GridDVAE

    torch.manual_seed(0)
    model = GridDVAE(vocab_in=11, vocab_out=11, grid_size=4, d_model=32, n_head=2, mlp_ratio=2, dropout=0.0,
                     encoder_layers=1, pool_layers=1, decoder_layers=1, latents=2 + 8, codebook="vq",
                     codebook_size=128, codebook_options={}, rope_base_row=20.0, rope_base_col=20.0,
                     grid_slots=True, pack_slots=pack, pad_id=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        grids = torch.randint(0, 10, (64, 4, 4))
        logits, out = model(grids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), grids.flatten()) + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        grids = torch.randint(0, 10, (512, 4, 4))
        return float((model(grids)[0].argmax(-1).view_as(grids) == grids).float().mean())


def test_packed_slots_learn_two_cells_per_code_where_the_mean_cannot():
    """100 pairs of colours fit a code of 128, but a slot that starts from the mean of its two cells cannot
    tell (a, b) from (b, a): it stays near 55% of the cells. Packed, the same model gets every cell."""
    assert packing_run(pack=True) > 0.99
    assert packing_run(pack=False) < 0.7


def test_pack_slots_needs_grid_slots(cli, runs_dir):
    result = cli("train", "dvae/tiny", "model.pack_slots=true", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "grid_slots" in result.output and "Traceback" not in result.output


def test_cells_per_code_is_the_longest_run_a_slot_gets():
    shapes = torch.tensor([[1, 1], [2, 2], [3, 3], [30, 30]])
    assert cells_per_code(shapes, 4).tolist() == [1, 1, 3, 225]
    assert cells_per_code(shapes, 126).tolist() == [1, 1, 1, 8]


def small_arc_task(*overrides: str) -> tuple[DVAE, torch.nn.Module]:
    """The tiny preset on ARC grids in grid slots (6 codes of 32), evaluated 16 grids at a time, and its model."""
    cfg = load_config("dvae/tiny", ["data.dataset=arc", "model.grid_slots=true", "model.latents=6",
                                    "model.codebook_size=32", "data.eval_batch_size=16", *overrides])
    task = DVAE(cfg, CPU)
    return task, task.build_model()


def test_exact_match_is_reported_per_cells_per_code(monkeypatch):
    """The held-out exact match split by how many cells each code carries: the buckets count every grid once,
    and their exact matches add up to the overall one. The decoder here returns the right cells for the grids
    of even height, so some buckets are exact and some are not."""
    task, model = small_arc_task("data.eval_grids=64")
    forward = model.forward

    def half_right(grids):
        logits, out = forward(grids)
        even = model.grid_shapes(grids)[:, 0] % 2 == 0
        right = one_hot_logits(grids.flatten(1), logits.shape[-1])
        return torch.where(even[:, None, None], right, logits), out

    monkeypatch.setattr(model, "forward", half_right)
    metrics = task.evaluate(model, "test")
    shapes = task.grids("test").shapes
    load = cells_per_code(shapes, 4)
    names = [k.split("/")[-1] for k in metrics if k.startswith("test/grids/")]
    assert len(names) >= 2 and sum(metrics[f"test/grids/{n}"] for n in names) == metrics["test/examples"] == 64
    assert metrics["test/grids/1_cell_per_code"] == float((load == 1).sum())
    exact = sum(metrics[f"test/exact_match/{n}"] * metrics[f"test/grids/{n}"] for n in names) / 64
    assert exact == pytest.approx(metrics["test/exact_match"]) and 0 < exact < 1
    even = (shapes[:, 0] % 2 == 0).float()
    assert metrics["test/exact_match"] == pytest.approx(float(even.mean()))
    assert metrics["test/exact_match/1_cell_per_code"] == pytest.approx(float(even[load == 1].mean()))
    assert metrics["test/exact_match/over_8_cells_per_code"] == pytest.approx(float(even[load > 8].mean()))
    # The token accuracy too: each bucket's, weighted by its cells, adds up to the overall one.
    cells = shapes.prod(1).float()
    buckets = {n: cells[torch.bucketize(load, torch.tensor(LOAD_EDGES)) == i].sum() for i, n in enumerate(LOAD_NAMES)}
    weighted = sum(metrics[f"test/token_acc/{n}"] * float(buckets[n]) for n in names) / float(cells.sum())
    assert weighted == pytest.approx(metrics["test/token_acc"])
    assert "test/forced_token_acc" not in metrics  # not autoregressive: decoding is the argmax


def test_an_autoregressive_decoder_reports_its_teacher_forced_accuracy_beside_the_decoded_one(monkeypatch):
    """Teacher-forced, every cell reads the true earlier cells; decoded, its own guesses. A decoder whose forward
    pass is right everywhere is right teacher-forced, while greedy decoding runs the untrained decoder."""
    task, model = small_arc_task("data.eval_grids=32", "model.autoregressive=true")
    forward = model.forward

    def right(grids):
        logits, out = forward(grids)
        return one_hot_logits(grids.flatten(1), logits.shape[-1]), out

    monkeypatch.setattr(model, "forward", right)
    metrics = task.evaluate(model, "test")
    assert metrics["test/forced_token_acc"] == 1.0
    assert metrics["test/token_acc"] < 1.0
    names = [k.split("/")[-1] for k in metrics if k.startswith("test/grids/")]
    assert all(metrics[f"test/forced_token_acc/{n}"] == 1.0 for n in names)


def test_grids_a_batch_leaves_unsettled_are_decoded_together_as_each_batch_alone_would(monkeypatch):
    """The evaluation gives each batch SETTLE_PASSES Jacobi passes of greedy decoding, then finishes the grids
    still changing, of every batch, together. The metrics are those of decoding each batch to its end, which are
    the model's own greedy reconstructions. Here each cell's colour is its earlier neighbour's in reading order plus
    one plus the grid's height, so a grid settles about a cell a pass, every batch leaves grids unsettled, and
    grids of other heights decode to other colours."""
    task, model = small_arc_task("data.eval_grids=32", "data.eval_batch_size=5", "model.autoregressive=true")
    model.eval()
    grids = task.grids("test").tokens
    colours = model(grids)[0].shape[-1]

    def chained(z, shapes=None, context=None, axes=None):
        earlier = torch.roll(context.flatten(1), 1, dims=1)
        earlier[:, 0] = 0
        return one_hot_logits((earlier + 1 + shapes[:, :1]) % 10, colours)  # each grid's own, by its height

    monkeypatch.setattr(model, "decode", chained)
    with torch.no_grad():
        logits, out = model(grids)
        unsettled = model.advance(model.decoding(grids, logits, out.z), 1)
        decoded = model.reconstruction(grids, logits, out.z)
    assert set((unsettled // 5).tolist()) == set(range(7))
    monkeypatch.setattr(dvae_task, "SETTLE_PASSES", 10**6)
    alone = task.evaluate(model, "test")
    monkeypatch.setattr(dvae_task, "SETTLE_PASSES", 1)
    assert task.evaluate(model, "test") == alone
    targets = grids.flatten(1)
    real = targets != task.pad_id
    assert alone["test/token_acc"] == pytest.approx(float((decoded == targets)[real].float().mean()))
    assert alone["test/exact_match"] == float((decoded == targets).all(1).float().mean())


@pytest.mark.parametrize("pack", ["false", "true"])
def test_grid_slots_encode_and_decode_through_the_cli(cli, runs_dir, tmp_path, pack):
    run = latentforge.train("dvae/tiny", "data.dataset=arc", "model.grid_slots=true", f"model.pack_slots={pack}",
                            "model.latents=6",
                            "model.codebook_size=64", "train.steps=2", "train.eval_every=2", "data.eval_grids=16",
                            "train.batch_size=4", name="arcgrid", runs_dir=runs_dir)
    assert run.status == "finished" and run.info["last_eval"]["test/code_bits"] == 6 * 6
    grid = tmp_path / "grid.json"
    grid.write_text("[[1, 2, 0], [0, 3, 4]]")
    encoded = json.loads(cli("encode", "arcgrid", grid, "--runs-dir", runs_dir, "--json").stdout)
    codes = encoded["codes"].split()
    assert len(codes) == 6 and codes[:2] == ["1", "2"]
    decoded = cli("decode", "arcgrid", encoded["codes"], "--runs-dir", runs_dir, "--json")
    assert decoded.exit_code == 0, decoded.output
    # The decoder drawing from codes alone is the one the training forward pass uses.
    def same_logits(task, model):
        grids = task.grids("test").tokens[:4]
        model.eval()
        with torch.no_grad():
            logits, out = model(grids)
            return torch.equal(model.decode_codes(model.code_sequence(grids, out.codes)), logits.argmax(-1))

    assert latentforge.api._with_model("arcgrid", "latest", runs_dir, "cpu", False, same_logits)
    assert [len(row.split()) for row in json.loads(decoded.stdout)["grid"].strip().splitlines()] == [3, 3]
    result = cli("decode", "arcgrid", "31 40 " + " ".join(codes[2:]), "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "height - 1 and width - 1" in result.output
    for bad in (["model.patch_slots=true"], ["model.latents=2"], ["model.codebook_size=16"]):
        result = cli("train", "dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.codebook_size=32",
                     *bad, "--runs-dir", runs_dir)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def autoregressive_model(grid_size: int = 4, slots: str = "pack", miss_above_cells: int = 8):
    """A tiny model with an autoregressive decoder, in float64 (no ties between colours); slots: pack (packed grid
    slots), grid (grid slots), miss (grid slots where a context rule fails, runs of at most 3 cells), miss-pack
    (those, packed), miss-even (miss-pack for grids of more than 8 cells, even runs for the others), miss-adaptive
    (miss-pack with the adaptive context in place of the rule), miss-axes (that, mirrored about each grid's own
    symmetry axes), miss-pairs (miss-adaptive with codes that name ranks, two misses to a code where the first is
    the context's second choice), miss-interval (miss-adaptive with interval codes: runs of up to 7 cells split by the
    context's probabilities), patch (patch slots) or none."""
    from latentforge.tasks.dvae.context import AdaptiveContext, fit_context_rule
    from latentforge.tasks.dvae.model import GridDVAE

    torch.manual_seed(0)
    adaptive_slots = slots in ("miss-adaptive", "miss-axes", "miss-pairs", "miss-interval")
    grid_slots = slots in ("grid", "pack", "miss", "miss-pack", "miss-even") or adaptive_slots
    fitted_to = torch.randint(0, 3, (64, grid_size, grid_size)), torch.full((64, 2), grid_size)
    rule = fit_context_rule(*fitted_to) if slots.startswith("miss") and not adaptive_slots else None
    adaptive = AdaptiveContext(colours=10, axes=slots == "miss-axes").fit(*fitted_to) if adaptive_slots else None
    model = GridDVAE(vocab_in=12, vocab_out=11, grid_size=grid_size, d_model=32, n_head=2, mlp_ratio=2,
                     dropout=0.0, encoder_layers=1, pool_layers=1, decoder_layers=2,
                     latents=2 + 4 if grid_slots else 4, codebook="vq",
                     codebook_size=64, codebook_options={}, rope_base_row=20.0, rope_base_col=20.0,
                     grid_slots=grid_slots,
                     pack_slots=slots in ("pack", "miss-pack", "miss-even") or adaptive_slots,
                     patch_slots=slots == "patch", autoregressive=True, miss_slots=slots.startswith("miss"),
                     miss_run=7 if slots == "miss-interval" else 3,
                     miss_above_cells=miss_above_cells if slots == "miss-even" else 0,
                     context_rule=rule, adaptive_context=adaptive, miss_axes=slots == "miss-axes",
                     miss_pair_rank=1 if slots == "miss-pairs" else 0, miss_interval=slots == "miss-interval",
                     pad_id=10).double().eval()
    # Larger weights than the init's, so that each cell's colour depends on the cells before it.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("slots", ["pack", "grid", "miss", "miss-pack", "miss-even", "miss-adaptive", "miss-pairs",
                                   "miss-interval", "patch", "none"])
def test_the_autoregressive_decoder_reads_only_earlier_cells(slots):
    model = autoregressive_model(slots=slots)
    z = torch.randn(3, model.slots, 32, dtype=torch.float64)
    shapes = torch.tensor([[4, 4], [3, 4], [4, 2]])
    context = torch.randint(0, 10, (3, 4, 4))
    before = model.decode(z, shapes, context)
    for cell in (0, 5, 9, 15):
        changed = context.clone()
        changed.view(3, -1)[:, cell] = (changed.view(3, -1)[:, cell] + 1) % 10
        after = model.decode(z, shapes, changed)
        assert torch.equal(after[:, :cell + 1], before[:, :cell + 1])
        if cell < 15:
            assert not torch.allclose(after[0, cell + 1:], before[0, cell + 1:])


@pytest.mark.parametrize("slots", ["miss", "miss-pack", "miss-even", "miss-adaptive", "miss-pairs", "miss-interval"])
def test_miss_slots_cells_read_the_code_of_their_run(slots):
    model = autoregressive_model(slots=slots)
    shapes = torch.tensor([[4, 4], [2, 4]])  # miss-even: the second grid keeps even runs
    context = torch.randint(0, 3, (2, 4, 4))
    slot = model.layout(context, shapes)[0]
    queries = []  # the decoder's cell queries, before attention mixes the cells (and reads every code as memory)
    model.decoder[0].register_forward_pre_hook(lambda module, args: queries.append(args[0]))
    z = torch.randn(2, model.slots, 32, dtype=torch.float64)
    model.decode(z, shapes, context)
    for k in range(model.slots):
        changed = z.clone()
        changed[:, k] = torch.randn(2, 32, dtype=torch.float64)
        model.decode(changed, shapes, context)
        moved = (queries[-1] - queries[0]).abs().amax(-1) > 1e-9
        assert torch.equal(moved, slot == k)
    assert (slot < model.slots).any(1).all()


def test_miss_above_cells_keeps_even_runs_for_the_smaller_grids():
    """miss-even: grids of at most 8 cells get grid_slot_layout's runs (each ending at its last cell), the larger
    ones miss_layout's, whatever their cells."""
    from latentforge.tasks.dvae.context import context_guesses, miss_layout
    from latentforge.tasks.dvae.model import grid_slot_layout

    model = autoregressive_model(slots="miss-even")
    shapes = torch.tensor([[4, 4], [2, 4], [3, 3], [1, 3]])
    grids = torch.randint(0, 3, (4, 4, 4))
    slot, offset, end = model.layout(grids, shapes)[:3]
    even_slot, even_offset = grid_slot_layout(shapes, 4, model.slots)
    miss = miss_layout(grids, shapes, context_guesses(grids, shapes, model.context_rule), model.slots, model.miss_run)
    for b, expected in ((0, miss), (1, (even_slot, even_offset)), (2, miss), (3, (even_slot, even_offset))):
        assert torch.equal(slot[b], expected[0][b]) and torch.equal(offset[b], expected[1][b])
    assert torch.equal(end[[0, 2]], miss[2][[0, 2]])
    # The 2 x 4 grid: four runs of two cells, each ending at its second; the 1 x 3 grid: three runs of one cell.
    assert end[1].view(4, 4)[:2].tolist() == [[False, True, False, True]] * 2 and not end[1].view(4, 4)[2:].any()
    assert end[3].view(4, 4)[0].tolist() == [True, True, True, False] and end[3].sum() == 3
    # Even runs must fit the packed places: 4 slots of at most miss_run = 3 cells hold grids of up to 12.
    autoregressive_model(slots="miss-even", miss_above_cells=12)
    with pytest.raises(ValueError, match="miss_above_cells must be in"):
        autoregressive_model(slots="miss-even", miss_above_cells=13)


def test_paired_codes_name_ranks_that_the_contexts_choices_turn_into_colours():
    """miss-pairs: the head's logit for rank r becomes the logit of the context's r-th choice in each cell; a run
    ends at a miss ranked above 1 and holds at most two misses, the first of them the context's second choice."""
    from latentforge.tasks.dvae.context import inside_cells

    model = autoregressive_model(slots="miss-pairs")
    shapes = torch.tensor([[4, 4], [3, 4], [4, 4]])
    context = torch.randint(0, 4, (3, 4, 4))
    heads = []
    model.head.register_forward_hook(lambda module, args, out: heads.append(out))
    logits = model.decode(torch.randn(3, model.slots, 32, dtype=torch.float64), shapes, context)
    layout = model.layout(context, shapes)
    inside = inside_cells(shapes, 4)
    assert torch.equal(logits[..., :10].gather(-1, layout.choices)[inside], heads[0][..., :10][inside])
    ranks = model.adaptive_context.ranks(context, shapes)
    assert torch.equal(layout.missed, inside & (ranks > 0)) and (ranks > 1).any()
    assert layout.end[ranks > 1].all()
    pairs = 0
    for b in range(3):
        for k in range(model.slots):
            misses = ranks[b][(layout.slot[b] == k) & layout.missed[b]].tolist()
            assert len(misses) <= 2 and (len(misses) < 2 or misses[0] == 1)
            pairs += len(misses) == 2
    assert pairs > 0


def test_interval_codes_split_what_is_left_by_the_contexts_probabilities():
    """miss-interval: each run starts with the codebook's 64 values, every cell keeps its rank's share of what is left
    (the split the cell reads: log shares of the values left), and a run ends at the cell that leaves fewer than the
    10 colours; the head names ranks, as the pairs' does."""
    from latentforge.tasks.dvae.context import inside_cells

    model = autoregressive_model(slots="miss-interval")
    shapes = torch.tensor([[4, 4], [3, 4], [4, 4]])
    context = torch.randint(0, 4, (3, 4, 4))
    layout = model.layout(context, shapes)
    inside = inside_cells(shapes, 4)
    ranks = model.adaptive_context.ranks(context, shapes)
    shares = layout.split.exp() * layout.left.unsqueeze(-1)
    assert torch.allclose(shares.sum(-1)[inside], layout.left[inside].double())
    assert torch.allclose(shares, shares.round()) and (shares[inside] >= 1 - 1e-9).all()
    kept = shares.gather(-1, ranks.unsqueeze(-1)).squeeze(-1).round().long()
    assert torch.equal(layout.end, inside & (kept < 10))
    starts = inside & (layout.offset == 0)
    assert (layout.left[starts] == 64).all() and (layout.left[inside & ~starts] < 64).all()
    following = inside[:, 1:] & ~layout.end[:, :-1] & ~starts[:, 1:]
    assert torch.equal(layout.left[:, 1:][following], kept[:, :-1][following])
    assert layout.end.sum() >= 3 and (layout.offset > 0).any()
    heads = []
    model.head.register_forward_hook(lambda module, args, out: heads.append(out))
    logits = model.decode(torch.randn(3, model.slots, 32, dtype=torch.float64), shapes, context)
    assert torch.equal(logits[..., :10].gather(-1, layout.choices)[inside], heads[0][..., :10][inside])
    with pytest.raises(ValueError, match="miss_run >= 7"):
        grid_dvae_with(model, miss_run=6)


def grid_dvae_with(model, **changes):
    """A GridDVAE built as `model` was (autoregressive_model's miss-interval), with `changes` to its arguments."""
    from latentforge.tasks.dvae.model import GridDVAE

    arguments = dict(vocab_in=12, vocab_out=11, grid_size=4, d_model=32, n_head=2, mlp_ratio=2, dropout=0.0,
                     encoder_layers=1, pool_layers=1, decoder_layers=2, latents=6, codebook="vq", codebook_size=64,
                     codebook_options={}, rope_base_row=20.0, rope_base_col=20.0, grid_slots=True, pack_slots=True,
                     autoregressive=True, miss_slots=True, miss_run=7, adaptive_context=model.adaptive_context,
                     miss_interval=True, pad_id=10)
    return GridDVAE(**{**arguments, **changes})


def test_miss_axes_ride_in_the_shape_codes_and_the_codes_alone_decode_the_reconstruction():
    """miss-axes: the shape codes carry each grid's symmetry axes, and decoding a code sequence alone decodes its
    codes about those axes (about others the layout differs); a decoder without the axes refuses to guess."""
    from latentforge.tasks.dvae.context import AXIS_REACH, symmetry_axes

    model = autoregressive_model(slots="miss-axes").float()
    grids = torch.full((3, 4, 4), 10)
    grids[0] = torch.tensor([[1, 2, 2, 1], [3, 4, 4, 3], [3, 4, 4, 3], [1, 2, 2, 1]])  # axes at the middle
    grids[1, :3, :4] = torch.tensor([[5, 1, 1, 2], [5, 1, 1, 2], [0, 0, 0, 0]])  # rows 0 and 1 mirror: axis 1
    grids[2, :2, :3] = torch.tensor([[1, 2, 3], [4, 5, 6]])
    shapes = model.grid_shapes(grids)
    axes = symmetry_axes(grids, shapes)
    assert axes[0].tolist() == [0, 0] and axes[1, 0] == 1 - (3 - 1)
    codes = torch.randint(0, 64, (3, model.slots))
    sequence = model.code_sequence(grids, codes)
    assert torch.equal(sequence[:, :2] % 4 + 1, shapes) and torch.equal(sequence[:, :2] // 4 - AXIS_REACH, axes)
    z = model.codebook.embed(codes)
    assert torch.equal(model.decode_codes(sequence), model.generate(z, shapes, axes=axes))
    assert not torch.equal(model.layout(grids, shapes, axes)[4], model.layout(grids, shapes, axes - 1)[4])
    with pytest.raises(ValueError, match="symmetry axes"):
        model.decode(z, shapes, grids)


@pytest.mark.parametrize("slots", ["pack", "miss", "miss-pack", "miss-even", "miss-adaptive", "miss-pairs",
                                   "miss-interval"])
def test_generate_is_greedy_decoding_and_its_grid_is_a_fixed_point_of_teacher_forcing(slots):
    model = autoregressive_model(slots=slots)
    z = torch.randn(5, 4, 32, dtype=torch.float64)
    shapes = torch.tensor([[4, 4], [3, 4], [4, 2], [1, 1], [2, 3]])
    generated = model.generate(z, shapes)
    # One cell at a time, in reading order, each from the cells decoded before it.
    greedy = torch.full((5, 16), 10)
    for cell in range(16):
        greedy[:, cell] = model.decode(z, shapes, greedy.view(5, 4, 4))[:, cell].argmax(-1)
    assert torch.equal(generated, greedy)
    # The fixed point does not depend on the first guess.
    assert torch.equal(model.generate(z, shapes, torch.randint(0, 11, (5, 4, 4))), greedy)
    assert len(generated.unique()) > 2 and ((generated != 10).sum(1) == shapes.prod(1)).all()
    # Teacher-forced on the grid it generates, the decoder predicts that grid: a grid is exact under teacher
    # forcing if and only if greedy decoding reconstructs it, so exact match needs no sequential decoding.
    assert torch.equal(model.decode(z, shapes, generated.view(5, 4, 4)).argmax(-1), generated)


@pytest.mark.parametrize("slots", [["model.pack_slots=true"], ["model.miss_slots=true", "model.miss_run=8"],
                                   ["model.miss_slots=true", "model.miss_run=8", "model.miss_above_cells=16"],
                                   ["model.miss_slots=true", "model.miss_run=8", "model.miss_context=adaptive"],
                                   ["model.miss_slots=true", "model.miss_run=8", "model.miss_context=adaptive",
                                    "model.miss_axes=true", "model.codebook_size=512"],
                                   ["model.miss_slots=true", "model.miss_run=8", "model.miss_context=adaptive",
                                    "model.miss_axes=true", "model.codebook_size=512", "model.miss_pair_rank=1"],
                                   ["model.miss_slots=true", "model.miss_run=8", "model.miss_context=adaptive",
                                    "model.miss_interval=true"]])
def test_an_autoregressive_run_trains_evaluates_encodes_and_decodes(cli, runs_dir, tmp_path, slots):
    run = latentforge.train("dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                            "model.latents=6", "model.codebook_size=64", "train.steps=4", "train.eval_every=4",
                            "data.eval_grids=16", "train.batch_size=4", *slots, name="ar", runs_dir=runs_dir)
    assert run.status == "finished" and 0 < run.info["last_eval"]["test/token_acc"] < 1
    grid = tmp_path / "grid.json"
    grid.write_text("[[1, 2, 0], [0, 3, 4]]")
    encoded = json.loads(cli("encode", "ar", grid, "--runs-dir", runs_dir, "--json").stdout)
    decoded = cli("decode", "ar", encoded["codes"], "--runs-dir", runs_dir, "--json")
    assert decoded.exit_code == 0, decoded.output
    assert [len(row.split()) for row in json.loads(decoded.stdout)["grid"].strip().splitlines()] == [3, 3]


def test_the_paired_miss_layout_trains_compiled_on_the_cpu(runs_dir):
    """torch.compile traces the miss layout (the GPU runs compile it): a run with paired codes, the adaptive context
    and its axes trains compiled and evaluates (tests/test_gpu.py compares it with eager on CUDA)."""
    run = latentforge.train("dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                            "model.latents=6", "model.codebook_size=512", "model.miss_slots=true", "model.miss_run=8",
                            "model.miss_context=adaptive", "model.miss_axes=true", "model.miss_pair_rank=1",
                            "model.miss_above_cells=8", "train.compile=true", "train.steps=2", "train.eval_every=2",
                            "data.eval_grids=8", "train.batch_size=4", name="compiled", runs_dir=runs_dir)
    assert run.status == "finished" and 0 < run.info["last_eval"]["test/token_acc"] < 1


def test_a_loaded_or_resumed_run_takes_its_adaptive_context_from_the_checkpoint(runs_dir, monkeypatch):
    from latentforge.api import evaluate_all_checkpoints
    from latentforge.tasks.dvae.context import AdaptiveContext

    run = latentforge.train("dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                            "model.latents=6", "model.codebook_size=512", "train.steps=4", "train.eval_every=4",
                            "data.eval_grids=16", "train.batch_size=4", "model.miss_slots=true", "model.miss_run=8",
                            "model.miss_context=adaptive", "model.miss_axes=true", "checkpoint.every=2",
                            "checkpoint.keep=3", name="adaptive", runs_dir=runs_dir)
    fitted = run.model().adaptive_context.state_dict()
    assert sum(len(table) for name, table in fitted.items() if name.startswith("keys")) > 100

    def refit(self, grids, shapes):
        raise AssertionError("refitted where a checkpoint holds the tables")

    monkeypatch.setattr(AdaptiveContext, "fit", refit)
    loaded = run.model(checkpoint=2).adaptive_context.state_dict()
    assert fitted.keys() == loaded.keys() and all(torch.equal(fitted[k], loaded[k]) for k in fitted)
    assert [row["step"] for row in evaluate_all_checkpoints("adaptive", runs_dir=runs_dir, device="cpu")] == [2, 4]
    # Resumed from step 2 with the checkpoint's tables, it ends where the run ended, bit for bit.
    ended = run.model().state_dict()
    resumed = latentforge.resume("adaptive", checkpoint=2, runs_dir=runs_dir).model().state_dict()
    assert all(torch.equal(ended[k], resumed[k]) for k in ended)
    with pytest.raises(AssertionError, match="refitted"):  # a fresh run does fit
        latentforge.train("dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                          "model.latents=6", "model.codebook_size=512", "train.steps=1", "model.miss_slots=true",
                          "model.miss_context=adaptive", name="fresh", runs_dir=runs_dir)
