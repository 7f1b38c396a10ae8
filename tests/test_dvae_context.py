"""dvae: the context rule, the adaptive context, and the slots laid out where they fail (model.miss_slots)."""

import functools

import numpy as np
import pytest
import torch
from conftest import bench_module

from latentforge.tasks.dvae.context import (
    NEIGHBOURS,
    NO_GUESS,
    PATTERNS,
    AdaptiveContext,
    context_cells,
    context_guesses,
    counts_before,
    fit_context_rule,
    inside_cells,
    interval_run_bound,
    interval_runs,
    miss_layout,
    miss_runs,
    paired_miss_runs,
    pattern_ids,
    symmetry_axes,
)

COPY_LEFT = torch.zeros(PATTERNS, dtype=torch.uint8)  # a rule that always guesses the left neighbour


def test_a_pattern_is_which_neighbours_share_a_colour_and_which_lie_outside():
    K = len(NEIGHBOURS)
    assert K == 8
    a = torch.tensor([3, 3, 5, NO_GUESS, 5, 3, 7, 7])
    recoloured = torch.tensor([1, 1, 0, NO_GUESS, 0, 1, 9, 9])
    other = torch.tensor([3, 5, 5, NO_GUESS, 5, 3, 7, 7])
    ids = pattern_ids(torch.stack([a, recoloured, other]))
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert 0 <= ids.min() and ids.max() < PATTERNS
    every_edge = torch.full((K,), NO_GUESS)
    every_colour = torch.arange(K)
    assert len({int(pattern_ids(x)) for x in (every_edge, every_colour, torch.zeros(K, dtype=torch.long))}) == 3


def test_the_fitted_rule_copies_the_neighbour_that_predicts_the_training_grids():
    # Every row repeats the one above, six different colours: the rule learns to copy the upper cell.
    def stripes(n: int) -> torch.Tensor:
        return torch.stack([torch.randperm(10)[:6] for _ in range(n)]).unsqueeze(1).expand(-1, 6, -1).contiguous()

    torch.manual_seed(0)
    rule = fit_context_rule(stripes(20), torch.full((20, 2), 6))
    assert rule.dtype == torch.uint8 and rule.shape == (PATTERNS,)
    fresh = stripes(5)
    guesses = context_guesses(fresh, torch.full((5, 2), 6), rule).view(5, 6, 6)
    assert torch.equal(guesses[:, 1:], fresh[:, 1:])
    assert (guesses[:, 0, 0] == NO_GUESS).all()  # the first cell has no neighbour


def test_runs_end_at_each_mispredicted_cell_or_after_run_limit_cells():
    grid = torch.full((1, 5, 5), 10)  # padding around a 3 x 4 grid: reading order is not the canvas order
    grid[0, :3, :4] = torch.tensor([[1, 1, 1, 2], [1, 1, 1, 2], [3, 3, 3, 3]])
    slot, offset, end, missed, guess = miss_layout(grid, torch.tensor([[3, 4]]),
                                                   context_guesses(grid, torch.tensor([[3, 4]]), COPY_LEFT), slots=4,
                                                   run_limit=3)[:5]
    inside = torch.arange(25).view(5, 5)[:3, :4].flatten()
    # Copying the left cell misses each row's first cell and the 2s; the last row's run of 3s ends by the limit.
    assert missed[0, inside].nonzero().flatten().tolist() == [0, 3, 4, 7, 8]
    assert end[0, inside].nonzero().flatten().tolist() == [0, 3, 4, 7, 8, 11]
    assert offset[0, inside].tolist() == [0, 0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2]
    # Runs 0..3 have codes; the cells of later runs and those outside the grid read none (slot 4).
    assert slot[0, inside].tolist() == [0, 1, 1, 1, 2, 3, 3, 3, 4, 4, 4, 4]
    outside = torch.ones(25, dtype=torch.bool)
    outside[inside] = False
    assert (slot[0, outside] == 4).all() and (offset[0, outside] == 0).all() and not (end | missed)[0, outside].any()
    assert guess[0, 1] == 1 and guess[0, 0] == NO_GUESS


@pytest.mark.parametrize("context", ["rule", "adaptive", "adaptive-axes"])
def test_a_cells_run_and_place_depend_only_on_the_cells_before_it(context):
    torch.manual_seed(0)
    grids = torch.randint(0, 3, (4, 5, 5))
    shapes = torch.tensor([[5, 5], [4, 5], [5, 3], [2, 2]])
    fitted_to = torch.randint(0, 3, (64, 5, 5)), torch.full((64, 2), 5)
    if context == "rule":
        rule = fit_context_rule(*fitted_to)
        guesses = functools.partial(context_guesses, rule=rule)
    elif context == "adaptive":
        guesses = AdaptiveContext(colours=10).fit(*fitted_to).guesses
    else:  # the axes are the code's: they stay whatever the cells
        axes = symmetry_axes(grids, shapes)
        guesses = functools.partial(AdaptiveContext(colours=10, axes=True).fit(*fitted_to).guesses, axes=axes)
    slot, offset, end, missed, guess = miss_layout(grids, shapes, guesses(grids, shapes), slots=6, run_limit=3)[:5]
    ends_toggled = 0
    for cell in range(25):
        for colour in range(10):  # the guess among them: a cell turns from missed to predicted and back
            changed = grids.clone()
            changed.view(4, -1)[:, cell] = colour
            after = miss_layout(changed, shapes, guesses(changed, shapes), slots=6, run_limit=3)
            # Its own run, place and guess, and everything about the cells before it, stay.
            for b, a in zip((slot, offset, guess), (after[0], after[1], after[4])):
                assert torch.equal(a[:, :cell + 1], b[:, :cell + 1])
            for b, a in zip((end, missed), after[2:4]):
                assert torch.equal(a[:, :cell], b[:, :cell])
            ends_toggled += int((after[2][:, cell] != end[:, cell]).sum())
    assert ends_toggled > 0


def test_miss_slots_needs_grid_slots_and_an_autoregressive_decoder(cli, runs_dir):
    for extra in ([], ["model.grid_slots=true"], ["model.autoregressive=true"]):
        result = cli("train", "dvae/tiny", "data.dataset=arc", "model.miss_slots=true", *extra, "--runs-dir", runs_dir)
        assert result.exit_code == 2 and "miss_slots" in result.output and "Traceback" not in result.output
    result = cli("train", "dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                 "model.miss_slots=true", "model.miss_run=0", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "miss_run must be >= 1" in result.output
    result = cli("train", "dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                 "model.miss_slots=true", "model.miss_run=1025", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "miss_run must be at most the grid's 1024 cells" in result.output, result.output
    result = cli("train", "dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                 "model.miss_slots=true", "model.miss_run=2", "model.miss_above_cells=100", "model.codebook_size=32",
                 "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "miss_above_cells must be in [0, 1024]" in result.output, result.output
    for bad, message in (("model.miss_context=adaptive", "set model.miss_slots=true too"),
                         ("model.miss_context=learned", "miss_context"),
                         ("model.miss_axes=true", "model.miss_context=adaptive too"),
                         ("model.miss_pair_rank=1", "model.miss_context=adaptive too"),
                         ("model.miss_pair_rank=9", "must be in [0, 8]"),
                         ("model.miss_interval=true", "model.miss_context=adaptive too")):
        result = cli("train", "dvae/tiny", "data.dataset=arc", bad, "--runs-dir", runs_dir)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    result = cli("train", "dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                 "model.miss_slots=true", "model.miss_context=adaptive", "model.miss_axes=true", "model.latents=6",
                 "model.codebook_size=256", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "codebook_size >= 512" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = cli("train", "dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true",
                 "model.miss_slots=true", "model.miss_context=adaptive", "model.miss_interval=true", "model.latents=6",
                 "model.codebook_size=64", "model.miss_run=6", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "miss_run >= 7" in result.output and "Traceback" not in result.output
    result = cli("train", "dvae/tiny", "data.dataset=arc", "model.grid_slots=true", "model.miss_above_cells=10",
                 "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "miss_above_cells" in result.output and "miss_slots=true" in result.output


def test_counts_before_sums_the_earlier_cells_of_the_same_group_in_each_grid():
    groups = torch.tensor([[0, 1, 0, 0, 1], [1, 1, 0, 1, 0]])
    values = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0], [1.0, 2.0, 4.0, 8.0, 16.0]]).unsqueeze(-1)
    assert counts_before(groups, values).squeeze(-1).tolist() == [[0, 0, 1, 5, 2], [0, 1, 0, 3, 4]]


def test_paired_runs_are_the_entropy_coders_paired_codes_and_miss_runs_without_pairs():
    """paired_miss_runs (every cell at once, by a prefix scan) against bench.dvae.entropy.paired_miss_codes (cell by
    cell), on random ranks in grids of random shapes; at pair_rank 0, miss_runs' runs."""
    from latentforge.nn.rope import grid_positions

    paired_miss_codes = bench_module("dvae.entropy").paired_miss_codes
    torch.manual_seed(0)
    rows, cols = grid_positions(6, 6, torch.device("cpu"))
    checked = {0: 0, 1: 0, 2: 0}
    for _ in range(60):
        shapes = torch.randint(1, 7, (4, 2))
        inside = inside_cells(shapes, 6)
        ranks = torch.where(torch.rand(4, 36) < 0.6, 0, torch.randint(1, 10, (4, 36)))
        run_limit, pair_rank, slots = (int(torch.randint(lo, hi, ())) for lo, hi in ((1, 6), (0, 3), (1, 12)))
        slot, offset, end = paired_miss_runs(ranks, inside, slots, run_limit, pair_rank)
        for b in range(4):
            code = paired_miss_codes(ranks[b][inside[b]].numpy(), run_limit, pair_rank)
            assert slot[b][inside[b]].tolist() == np.minimum(code, slots).tolist()
            assert offset[b][inside[b]].tolist() == [int((code[:i] == c).sum()) for i, c in enumerate(code)]
            assert end[b][inside[b]][:-1].tolist() == (code[1:] != code[:-1]).tolist()
            assert (slot[b][~inside[b]] == slots).all() and not end[b][~inside[b]].any()
        checked[pair_rank] += 1
        if pair_rank == 0:
            runs = miss_runs(inside & (ranks > 0), inside, rows * shapes[:, 1:] + cols, slots, run_limit)
            assert all(torch.equal(a, b) for a, b in zip(runs, (slot, offset, end)))
    assert min(checked.values()) > 5


def test_interval_runs_are_the_entropy_benchs_bounded_interval_codes():
    """interval_runs (every cell at once, by a prefix scan over the values left) against
    bench.dvae.entropy.bounded_interval_codes (cell by cell), on random probabilities and ranks in grids of random
    shapes and codes of random sizes; no run is longer than interval_run_bound."""
    bounded_interval_codes = bench_module("dvae.entropy").bounded_interval_codes
    torch.manual_seed(0)
    longest = 0
    for _ in range(20):
        shapes = torch.randint(1, 8, (4, 2))
        inside = inside_cells(shapes, 7)
        probs = (torch.randn(4, 49, 10, dtype=torch.float64) * float(torch.rand(()) * 6)).softmax(-1)
        probs = probs.sort(-1, descending=True).values
        ranks = torch.where(torch.rand(4, 49) < 0.7, 0, torch.randint(1, 10, (4, 49)))
        size, slots = int(torch.randint(10, 80, ())), int(torch.randint(1, 10, ()))
        slot, offset, end, left = interval_runs(probs, ranks, inside, slots, size)
        for b in range(4):
            code, before, ends = bounded_interval_codes(ranks[b][inside[b]].numpy(), probs[b][inside[b]].numpy(), size)
            assert slot[b][inside[b]].tolist() == np.minimum(code, slots).tolist()
            assert offset[b][inside[b]].tolist() == [int((code[:i] == c).sum()) for i, c in enumerate(code)]
            assert end[b][inside[b]].tolist() == ends.tolist() and left[b][inside[b]].tolist() == before.tolist()
            assert (slot[b][~inside[b]] == slots).all() and not end[b][~inside[b]].any()
            assert (left[b][~inside[b]] == 0).all()
        assert int(offset.max()) < interval_run_bound(size, 10)
        longest = max(longest, int(offset.max()))
    assert longest >= 3


def test_an_interval_layout_does_not_hang_on_a_probabilitys_last_bit():
    """Probabilities that are ratios of small counts put floor(p (left - C)) on whole numbers; one bit less in each
    (as another device or batch size may round) leaves the layout as it was."""
    torch.manual_seed(0)
    shapes = torch.full((64, 2), 7)
    counts = torch.randint(0, 4, (64, 49, 10)).double()
    counts[..., 0] += 1
    probs = (counts / counts.sum(-1, keepdim=True)).sort(-1, descending=True).values
    ranks = torch.where(torch.rand(64, 49) < 0.7, 0, torch.randint(1, 10, (64, 49)))
    inside = inside_cells(shapes, 7)
    lower = torch.nextafter(probs, torch.zeros_like(probs))
    assert (lower < probs).any()
    for a, b in zip(interval_runs(probs, ranks, inside, 20, 64), interval_runs(lower, ranks, inside, 20, 64)):
        assert torch.equal(a, b)


def test_the_adaptive_context_guesses_what_the_entropy_coder_finds_most_likely():
    """AdaptiveContext (vectorized, every cell at once) against bench/dvae/entropy.py's coder (cell by cell, its
    plain Bayesian mixture and middle axes), both fitted to the same training grids: the same context cells, the
    same most likely colour in every cell of held-out grids, and the same rank of each cell's own colour."""
    from latentforge.tasks.dvae.data import load_arc
    from latentforge.tasks.dvae.task import unseen

    entropy = bench_module("dvae.entropy")
    train = load_arc("train").select(slice(0, 60))
    test = unseen(load_arc("eval"), load_arc("train")).select(slice(0, 40))
    adaptive = AdaptiveContext(colours=10).fit(train.tokens, train.shapes)
    params = entropy.Params(share=0.0, middle_axes=True)
    counts, prior = entropy.training_counts(train.tokens, train.shapes, params)
    guesses = adaptive.guesses(test.tokens, test.shapes)
    ranks = adaptive.ranks(test.tokens, test.shapes)
    inside = test.tokens.flatten(1) != 10
    assert torch.equal(adaptive.choices(test.tokens, test.shapes)[..., 0][inside], guesses[inside])
    cells = context_cells(test.tokens, test.shapes)
    axes = symmetry_axes(test.tokens, test.shapes)
    axes_cells = context_cells(test.tokens, test.shapes, axes)
    compared = 0
    for b, (h, w) in enumerate(test.shapes.tolist()):
        grid = test.tokens[b, :h, :w].numpy()
        reference_cells = entropy.context_cells(grid, (h - 1, w - 1))
        assert np.array_equal(cells[b].view(32, 32, -1)[:h, :w].reshape(h * w, -1).numpy(), reference_cells)
        # About the grid's own axes (symmetry_axes: the best within reach of the middle) too.
        a, c = axes[b].tolist()
        mirrored = axes_cells[b].view(32, 32, -1)[:h, :w].reshape(h * w, -1).numpy()
        assert np.array_equal(mirrored, entropy.context_cells(grid, (h - 1 + a, w - 1 + c)))
        coder = entropy.Coder(counts, prior, params)
        contexts = entropy.cell_contexts(reference_cells)
        mine = guesses[b].view(32, 32)[:h, :w].flatten().tolist()
        my_ranks = ranks[b].view(32, 32)[:h, :w].flatten().tolist()
        for i, colour in enumerate(grid.flatten().tolist()):
            context = {level: (int(ids[i]), sub[i]) for level, (ids, sub) in contexts.items()}
            p, family_p = coder.predict(context)
            assert int(p.argmax()) == mine[i], (b, i)
            assert entropy.colour_rank(p, colour) == my_ranks[i], (b, i)
            assert (my_ranks[i] == 0) == (colour == mine[i])
            coder.update(colour, context, family_p)
            compared += 1
    assert compared > 5000 and (guesses[~(test.tokens != 10).flatten(1)] == NO_GUESS).all()
    assert (axes != 0).any()  # some of these grids are symmetric about axes off their middle
