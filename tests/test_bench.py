"""The benchmark scripts stay runnable: they import, and the side-by-side script trains,
evaluates and compares a spec file end to end (tiny runs on the CPU)."""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, bench_module

import latentforge
from latentforge.config import load_config


@pytest.mark.parametrize("module", ["bench.multiply_speed", "bench.multiply_sweep", "bench.train_speed"])
def test_bench_modules_import(module):
    sys.path.insert(0, str(REPO))
    try:
        importlib.import_module(module)
    finally:
        sys.path.remove(str(REPO))


def test_gpt2_bench_pads_the_head_and_counts_the_true_vocabulary():
    """bench/configs/gpt2-small.yaml pads GPT-2's 50,257 ids to 50,304 rows; the logits and the model FLOPs
    (MFU's numerator) are those of the 50,257 (at small widths here, the vocabulary of the benchmark)."""
    sys.path.insert(0, str(REPO))
    try:
        from bench.random_lm import RandomLM
        from bench.train_speed import GPT2_CONFIG
    finally:
        sys.path.remove(str(REPO))
    cfg = load_config(GPT2_CONFIG, ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "data.seq_len=8"])
    task = RandomLM(cfg, torch.device("cpu"))
    model = task.build_model()
    assert model.embed.num_embeddings == model.head.out_features == 50304
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 50257)
    assert model.pos_embed.weight.shape == (8, 16)  # GPT-2's learned positions, as the peers have them
    weights = sum(p.numel() for p in model.parameters()) - (50304 - 50257) * 16 - 8 * 16
    assert task.flops_per_example(model) == 8 * (2 * weights + 4 * 1 * 16 * 8)


def test_side_by_side_script_trains_evaluates_and_compares(tmp_path: Path):
    spec = tmp_path / "spec.txt"
    spec.write_text("# a comment line\n"
                    "one multiply/tiny train.steps=2 data.test_size=50 train.device=cpu\n"
                    "two multiply/tiny train.steps=2 data.test_size=50 train.device=cpu task.variant=cot\n")
    env = {**os.environ, "LATENTFORGE_RUNS": str(tmp_path / "runs"), "SPLIT": "test",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "bench" / "side_by_side.sh"), str(spec), "120"],
                            env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "one" in result.stdout and "cot" in result.stdout
    assert list((tmp_path / "runs" / "compare").glob("compare-*.csv"))
    assert list((tmp_path / "runs" / "one" / "artifacts").glob("eval_test_step*.json"))


def test_train_speed_runs_every_path_on_the_cpu(tmp_path: Path):
    """Every trainer path of the speed benchmark trains (tiny dims, compile off) and reports positive
    numbers, and the data path and checkpoint times are measured; a broken path fails here."""
    out = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, "-m", "bench.train_speed", "--device", "cpu", "--no-compile",
                             "--steps", "2", "--warmup", "1", "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    assert results["ceiling_flops"] > 0
    assert set(results["shapes"]) == {"small", "gpt2"}
    for name, shape in results["shapes"].items():
        rows = {r["name"]: r for r in shape["rows"]}
        assert set(rows) == {"latentforge", "hf eager", "lightning"}, name
        for row in rows.values():
            assert row["error"] == "", (name, row)
            for key in ("steps_per_s", "tokens_per_s", "mfu", "first_step_s", "loss", "ratio"):
                assert row[key] > 0, (name, row["name"], key)
            assert f"| {row['name']} | " in result.stdout
        assert rows["latentforge"]["ratio"] == 1.0
        assert 0 < rows["latentforge"]["extra"]["data_share_of_step"]
    extra = results["shapes"]["gpt2"]["rows"][0]["extra"]
    assert extra["ckpt_save_blocked_s"] > 0 and extra["ckpt_restore_s"] > 0 and extra["ckpt_gib"] > 0
    assert extra["ckpt_write_s"] >= extra["ckpt_save_blocked_s"] and extra["ckpt_sync_save_s"] > 0
    assert "an asynchronous save blocks train_step" in result.stdout


@pytest.mark.parametrize("spec", sorted((REPO / "bench").glob("*/*.txt")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_spec_line_is_a_valid_config(spec: Path):
    """The spec files behind docs/results: each run's preset and overrides load (a typo in a key fails here,
    not minutes into a device call)."""
    lines = [line.split() for line in spec.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines
    for name, preset, *overrides in lines:
        assert load_config(preset, overrides).task.name, name


def test_the_arc_vq_miss_preset_is_the_run_that_docs_results_reports():
    """docs/results/dvae.md's 94.5% run is the last line of bench/dvae/miss-adaptive.txt; the preset must train
    exactly that configuration (checkpoint and compile settings aside)."""
    import dataclasses

    line = (REPO / "bench" / "dvae" / "miss-adaptive.txt").read_text().strip().splitlines()[-1].split()
    assert line[0] == "arc-vq-miss-axes-run16-large-6k"
    spec = load_config(line[1], line[2:])
    preset = load_config("dvae/arc-vq-miss", ["train.compile=true", "checkpoint.every=500"])
    assert dataclasses.asdict(preset) == dataclasses.asdict(spec)


def test_lm_head_loss_variants_agree_in_loss_and_gradients():
    """bench/lm_head_loss.py times ways of writing the head and cross-entropy that must be the same
    function: the padded columns masked, a head without padding, the rows in chunks."""
    sys.path.insert(0, str(REPO))
    from bench.lm_head_loss import VARIANTS

    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(128, 16)  # 128 head rows for a vocabulary of 100
    targets = torch.randint(0, 100, (40,))
    results = []
    for fn in VARIANTS.values():
        hidden, weight = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fn(hidden, weight, targets, 100)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for loss, grad_h, grad_w in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad_h, results[0][1])
        torch.testing.assert_close(grad_w, results[0][2])
    assert results[0][2][100:].abs().max() == 0  # the padded rows get no gradient


def test_lm_head_loss_fused_configs_parse_and_refuse_bad_launches():
    sys.path.insert(0, str(REPO))
    from bench.lm_head_loss import fused_configs

    assert fused_configs("8192x32,4096X8") == [(8192, 32), (4096, 8)]
    for bad in ("8192", "8192x", "1000x32", "131072x32", "8192x64", "8192x3", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            fused_configs(bad)
    result = subprocess.run([sys.executable, "-m", "bench.lm_head_loss", "--fused-configs", "8192x3"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "WARPS one of" in result.stderr and "Traceback" not in result.stderr


def test_train_speed_traces_latentforge_steps(tmp_path: Path):
    """--trace profiles a few more steps of latentforge's row: their table on disk, and per step the wall
    time split into the time in ops (kernels on a GPU) and the rest."""
    out = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, "-m", "bench.train_speed", "--device", "cpu", "--no-compile",
                             "--shape", "small", "--no-peers", "--steps", "1", "--warmup", "1", "--json", str(out),
                             "--trace", str(tmp_path / "trace")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    extra = json.loads(out.read_text())["shapes"]["small"]["rows"][0]["extra"]
    assert extra["trace_step_ms"] >= extra["trace_kernel_ms"] > 0
    assert extra["trace_gap_ms"] == pytest.approx(extra["trace_step_ms"] - extra["trace_kernel_ms"])
    table = (tmp_path / "trace" / "small.txt").read_text()
    assert table.startswith("5 steps:") and "aten::mm" in table
    assert "5 steps profiled" in result.stdout


def test_train_speed_without_peers_runs_latentforge_alone(tmp_path: Path):
    out = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, "-m", "bench.train_speed", "--device", "cpu", "--no-compile",
                             "--shape", "small", "--no-peers", "--steps", "1", "--warmup", "1", "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["shapes"]["small"]["rows"]
    assert [r["name"] for r in rows] == ["latentforge"] and rows[0]["steps_per_s"] > 0


def test_train_speed_no_eager_leaves_out_the_uncompiled_row(monkeypatch):
    """--no-eager: the compiled latentforge row alone (the rows' training itself is the test above)."""
    from bench import train_speed

    compiled = []
    monkeypatch.setattr(train_speed, "run_latentforge",
                        lambda shape, device, compile, overrides, extras, trace=None: compiled.append(compile) or
                        train_speed.Row(name="", steps_per_s=1.0))
    shape = train_speed.shapes(tiny=True)["small"]
    for eager, expected in ((True, [True, False]), (False, [True])):
        compiled.clear()
        rows = train_speed.bench_shape(shape, torch.device("cpu"), True, 1e12, [], peers=False, eager=eager)
        assert compiled == expected and len(rows) == len(expected)


def test_dvae_capacity_counts_the_cells_each_code_carries(capsys):
    """bench/dvae/capacity.py: patch slots give every code 8 canvas cells; grid slots give small grids fewer,
    and the fractions grow to every grid."""
    sys.path.insert(0, str(REPO))
    try:
        from bench.dvae.capacity import main
    finally:
        sys.path.remove(str(REPO))
    from bench.dvae.capacity import (
        context_misses,
        fewest_runs,
        fits_list,
        fits_runs,
        fitted_segments,
        local_code_bound,
        run_hits,
    )

    main([])
    cells, runs = capsys.readouterr().out.split("runs of one colour")
    runs, local = runs.split("commonest training runs")
    local, fitted = local.split("fitted to the content")
    fitted, context = fitted.split("context rule mispredicts")
    context, reach = context.split("miss layout, every cell within the codes right", 1)
    reach, paired = reach.split("two to a code where the first is cheap")
    paired, tunstall = paired.split("a Tunstall dictionary")
    tunstall, interval = tunstall.split("split at each cell by the probabilities of its ranks")
    # The token accuracy in the miss layout's reach: 1 - the rule's misses past the last code over all cells.
    accuracy = float(reach.split("held-out token accuracy ")[1].split(";")[0])
    counts = re.findall(r"mispredicts ([\d,]+) cells.*of the ([\d,]+)\)", reach)[0]
    past, total = (int(x.replace(",", "")) for x in counts)
    assert 0.85 < accuracy < 0.99 and accuracy == pytest.approx(1 - past / total, abs=1e-3)
    adaptive_accuracy, axes_accuracy = (float(reach.split("held-out token accuracy ")[i].split(";")[0])
                                        for i in (2, 3))
    assert accuracy < adaptive_accuracy < axes_accuracy < 0.995
    # Codes spent only on the cells a context rule misses: per grid slot's run, per missed cell, or either.
    layouts = [[float(x) for x in line.split("|")[2:7]] for line in context.splitlines()
               if line.startswith("| ") and "codes" not in line]
    assert len(layouts) == 6 and all(row[1:3] == [1.0, 1.0] or row[0] > 0.85 for row in layouts)
    assert layouts[0][0] < layouts[1][0] <= layouts[2][0] and layouts[2][3] > layouts[0][3]
    # The rule fitted to the training grids (model.miss_slots) misses fewer cells than the fixed one.
    assert layouts[3][0] > layouts[1][0] and layouts[3][4] > layouts[0][4]
    # The adaptive context (model.miss_context=adaptive) misses fewer still, most on the largest grids.
    assert layouts[4][0] > layouts[3][0] and layouts[4][4] > layouts[3][4]
    assert layouts[5][0] >= layouts[4][0] and layouts[5][4] > layouts[4][4]  # about each grid's own axes
    # Counted again from the context's ranks, one miss per code is that layout; two where the first is cheap fit more.
    pairs = [[float(x) for x in line.split("|")[4:6]] for line in paired.splitlines() if line.startswith("| ")
             and "runs" not in line]
    assert len(pairs) == 3 and pairs[0] == [layouts[5][0], pytest.approx(axes_accuracy, abs=1e-3)]
    assert all(row[0] > pairs[0][0] and row[1] > pairs[0][1] for row in pairs[1:])
    # The best fixed dictionary for independent ranks fits more grids than the pairs within the same 512 codes.
    row = [line.split("|")[1:4] for line in tunstall.splitlines() if line.startswith("| 505")][0]
    assert float(row[1]) > max(p[0] for p in pairs) and float(row[2]) > pairs[0][1]
    # Interval codes split by fixed rank frequencies are near that dictionary; by each cell's confidence class, or by
    # the context's own probabilities, they fit more grids than any fixed dictionary.
    splits = [[float(x) for x in line.split("|")[2:4]] for line in interval.splitlines() if line.startswith("| ")
              and "split by" not in line]
    assert len(splits) == 5 and abs(splits[0][0] - float(row[1])) < 0.01
    assert float(row[1]) < splits[1][0] <= splits[2][0] and float(row[2]) < splits[1][1] <= splits[2][1]
    # Without the escape value (model.miss_interval's layout, which a decoder can follow) they fit fewer grids than
    # with it, more than the dictionary, and keep 0.99 of the cells from their own guesses.
    own = [float(line.split("|")[4]) for line in interval.splitlines() if line.startswith("| ")
           and "split by" not in line]
    assert float(row[1]) < splits[3][0] < splits[2][0] and 0.99 < own[3] < own[2]
    # An arithmetic coder with the same probabilities bounds them all; from its own guesses each keeps less.
    assert splits[4][0] >= splits[2][0] and splits[4][1] >= splits[2][1] and own[1] <= own[2] <= own[4]
    assert all(o < t for o, (_, t) in zip(own, splits))
    for table in (local, fitted):
        bound = [line.split("|")[1:4] for line in table.splitlines() if line.startswith("| ") and "K" not in line]
        assert [int(k) for k, _, _ in bound] == [512, 4096]
        assert all(0.5 < float(exact) < 1.0 and 0.5 < float(covered) < 1.0 for _, exact, covered in bound)
    # Per load bucket: codes of 1 or 2 cells name any run in training; past that the dictionary falls short.
    by_load = [[float(x) for x in line.split("|")[4:8]] for line in local.splitlines() if line.startswith("| 512")]
    assert by_load[0][:2] == [1.0, 1.0] and 0.3 < by_load[0][2] < 0.8 and by_load[0][3] < by_load[0][2]
    # Fitted segments: runs of one colour per row; over the budget, the shortest adjacent pair of a row merges.
    assert fitted_segments([[1, 1, 2], [3, 3, 3]], slots=3) == [(1, 1), (2,), (3, 3, 3)]
    assert fitted_segments([[1, 1, 2], [3, 4, 4]], slots=3) == [(1, 1, 2), (3,), (4, 4)]
    assert fitted_segments([[1, 2], [3, 4]], slots=1) == [(1, 2), (3, 4)]
    assert local_code_bound([[(1,), (2, 3)]], [[(2, 3)], [(1,)]], k=1, by_length=False) == (0.5, 0.5)
    # Runs (1,) and (2, 3) seen in training; a test grid with an unseen run fails, with K = 1 per length too.
    train = [[(1,), (2, 3)], [(1,), (4, 5)]]
    assert local_code_bound(train, [[(1,), (2, 3)], [(1,), (9, 9)]], k=2) == (0.5, 0.75)
    assert local_code_bound(train, [[(1,), (4, 5)]], k=1) == (0.0, 0.5)
    assert [all(h) for h in run_hits(train, [[(1,), (2, 3)], [(1,), (9, 9)]], k=2, by_length=True)] == [True, False]
    rows = [line.split("|")[1:4] for line in cells.splitlines() if line.startswith("| <=")]
    patch = [float(p) for _, p, _ in rows]
    grid = [float(g) for _, _, g in rows]
    assert patch == [0.0] * 7 + [1.0] and grid == sorted(grid) and 0.4 < grid[0] < 0.6 and grid[-1] == 1.0
    by_runs = [float(line.split("|")[2]) for line in runs.splitlines() if line.startswith("| <=")]
    assert len(by_runs) == 3 and by_runs == sorted(by_runs) and 0.5 < by_runs[1] < 1.0
    # The context rule: the upper cell where left and upper-left agree, else the left one.
    assert context_misses([[1, 1, 2], [1, 1, 2], [3, 1, 2]]) == [True, False, True, False, False, False,
                                                                 True, True, False]
    # 4 cells in 2 runs of 2 (K = 19: a run holds one miss, 1 + 2 * 9 cases) or as a list of misses.
    assert fits_runs([True, False, False, True], slots=2, codebook_size=19)
    assert not fits_runs([True, True, False, False], slots=2, codebook_size=19)
    assert fits_list([True, True, False, False], slots=2, codebook_size=19)
    # A gap longer than K // colours - 1 cells costs a code of its own.
    assert fits_list([True] + [False] * 9 + [True], slots=2, codebook_size=100)
    assert not fits_list([True] + [False] * 10 + [True], slots=2, codebook_size=100)
    # Two rows of one colour each: 2 runs along the rows, 3 along the columns of the 2 x 3 grid.
    assert fewest_runs(torch.tensor([[1, 1, 1], [2, 2, 2]])) == 2
    assert fewest_runs(torch.tensor([[1, 2, 1], [1, 2, 1]])) == 3


def test_dvae_summary_tables_exact_match_by_load(tmp_path, capsys):
    """bench/dvae/summary.py: the results table, and the exact match per load with each bucket's grid count."""
    sys.path.insert(0, str(REPO))
    try:
        from bench.dvae.summary import main
    finally:
        sys.path.remove(str(REPO))
    run = tmp_path / "r"
    (run / "artifacts").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"params": 1234, "train_seconds": 5.0}))
    (run / "config.yaml").write_text("model:\n  codebook: vq\n")
    metrics = {"test/token_acc": 0.9, "test/exact_match": 0.75, "test/codes_used": 0.5, "test/perplexity": 9.0,
               "test/dead_codes": 3, "test/bits_per_grid": 800, "test/code_bits": 1152,
               "test/exact_match/1_cell_per_code": 1.0, "test/grids/1_cell_per_code": 10,
               "test/exact_match/2_cells_per_code": 0.5, "test/grids/2_cells_per_code": 4}
    (run / "artifacts" / "eval_test_step00000007.json").write_text(json.dumps({"step": 7, "metrics": metrics}))
    main(tmp_path, ["r"])
    table, loads = capsys.readouterr().out.split("Exact match by how many")
    assert "| r | vq | 1,234 | 7 | 5 s | 0.9000 | 0.7500 | 0.500 | 9.0 | 3 | 800 (1152) |" in table
    assert "| r | 1.000 (10) | 0.500 (4) |  |  |  |" in loads
    assert "training grids" not in loads  # no metrics.jsonl with a training-grid evaluation
    assert "Token accuracy by the same buckets" not in loads  # an evaluation from before that was logged
    metrics.update({"test/token_acc/1_cell_per_code": 1.0, "test/token_acc/2_cells_per_code": 0.875,
                    "test/forced_token_acc/1_cell_per_code": 1.0, "test/forced_token_acc/2_cells_per_code": 0.96875})
    (run / "artifacts" / "eval_test_step00000007.json").write_text(json.dumps({"step": 7, "metrics": metrics}))
    main(tmp_path, ["r"])
    tokens = capsys.readouterr().out.split("Token accuracy by the same buckets")[1]
    assert "| r | 1.0000 (1.0000) | 0.8750 (0.9688) |  |  |  |" in tokens
    # A run that evaluates the training grids too: their last evaluation (step 8) beside the held-out one.
    # The training log's own train/token_acc (augmented batches) comes after the evaluation at step 8 here, and
    # the held-out grids have a bucket (2 cells) that the training grids lack.
    records = [{"step": 4, "train/loss": 1.0}, {"step": 4, "test/token_acc": 0.5, "test/exact_match": 0.1},
               {"step": 4, "train/token_acc": 0.6, "train/exact_match": 0.2},
               {"step": 8, "test/token_acc": 0.7, "test/exact_match": 0.3, "test/exact_match/1_cell_per_code": 0.9,
                "test/exact_match/2_cells_per_code": 0.5},
               {"step": 8, "train/token_acc": 0.8, "train/exact_match": 0.4, "train/exact_match/1_cell_per_code": 1.0},
               {"step": 8, "train/loss": 0.7, "train/token_acc": 0.1},
               {"step": 9, "train/loss": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    main(tmp_path, ["r"])
    fitted = capsys.readouterr().out.split("On the training grids")[1]
    assert "| r | 8 | 0.800 / 0.700 | 0.400 / 0.300 | 1.000 / 0.900 |  |  |  |  |" in fitted


def test_multiply_speed_settings_keep_list_values_whole():
    sys.path.insert(0, str(REPO))
    try:
        from bench.multiply_speed import split_overrides
    finally:
        sys.path.remove(str(REPO))
    assert split_overrides("data.digits_a=[5,5],train.compile=true,x={a: 1, b: 2},") == [
        "data.digits_a=[5,5]", "train.compile=true", "x={a: 1, b: 2}"]


def test_dvae_misses_counts_a_miss_slots_runs_errors_by_kind_of_cell(runs_dir):
    """bench/dvae/misses.py on a tiny trained miss_slots run: the four kinds of cells add up to every cell of the
    grids read, and the runs' classes are counted; a run without miss_slots is one clear line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = ["data.dataset=arc", "model.grid_slots=true", "model.autoregressive=true", "model.latents=6",
              "model.codebook_size=64", "train.steps=2", "train.eval_every=0", "data.eval_grids=4",
              "train.batch_size=4"]
    latentforge.train("dvae/tiny", *common, "model.miss_slots=true", "model.miss_run=8", name="miss", runs_dir=runs_dir)
    result = subprocess.run([sys.executable, "-m", "bench.dvae.misses", str(runs_dir), "miss", "--grids", "20",
                             "--device", "cpu"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "20 test grids" in result.stdout
    counts = [int(line.split("|")[2].replace(",", "")) for line in result.stdout.splitlines()
              if line.startswith(("| rule", "| past"))]
    task, _, _ = latentforge.load_run("miss", runs_dir).load()
    assert len(counts) == 4 and counts[0] > 0 and counts[1] > 0
    assert sum(counts) == int(task.test_grids.shapes[:20].prod(1).sum())
    # Both layouts: the grids of at most 30 cells keep even runs and are left out.
    latentforge.train("dvae/tiny", *common, "model.miss_slots=true", "model.miss_run=8", "model.miss_above_cells=30",
                      name="both", runs_dir=runs_dir)
    result = subprocess.run([sys.executable, "-m", "bench.dvae.misses", str(runs_dir), "both", "--grids", "20",
                             "--device", "cpu"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    shapes = task.test_grids.shapes[:20]
    laid_out = shapes.prod(1) > 30
    assert f"({int((~laid_out).sum())} with even runs left out" in result.stdout and laid_out.any()
    counts = [int(line.split("|")[2].replace(",", "")) for line in result.stdout.splitlines()
              if line.startswith(("| rule", "| past"))]
    assert sum(counts) == int(shapes[laid_out].prod(1).sum())
    latentforge.train("dvae/tiny", *common, name="even", runs_dir=runs_dir)
    result = subprocess.run([sys.executable, "-m", "bench.dvae.misses", str(runs_dir), "even", "--device", "cpu"],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode != 0 and "does not lay its codes out by model.miss_slots" in result.stderr


def test_dvae_misses_apart_is_the_distance_of_two_class_means_over_their_spread():
    """Two classes of a code: means 0 and (3, 4) (distance 5), each spread as +-1 along one axis (RMS 1): 5.0."""
    from collections import Counter

    from bench.dvae.misses import apart

    a, b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[3.0, 5.0], [3.0, 3.0]])
    vectors = {(7, cls): [2, x.sum(0), float(x.square().sum())] for cls, x in (("a", a), ("b", b))}
    assert apart(vectors, 7, Counter({"a": 2, "b": 2, "c": 1})) == pytest.approx(5.0)


def test_dvae_predictor_trains_and_counts_the_cells_each_predictor_misses():
    """bench/dvae/predictor.py, a few steps on a few held-out grids: both rows, shares within [0, 1]; a bad width
    is one clear line."""
    result = subprocess.run([sys.executable, "-m", "bench.dvae.predictor", "--d-model", "16", "--layers", "1",
                             "--steps", "2", "--batch", "2", "--eval-grids", "40"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "40 held-out grids" in result.stdout
    rows = [line.split("|")[2:5] for line in result.stdout.splitlines() if line.startswith(("| the", "| causal"))]
    assert len(rows) == 2
    for missed, fits, accuracy in rows:
        assert 0 <= float(missed) <= 1 and 0 <= float(fits.split()[0]) <= 1 and 0 <= float(accuracy) <= 1
    bad = subprocess.run([sys.executable, "-m", "bench.dvae.predictor", "--d-model", "30"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert bad.returncode != 0 and "multiple of 4" in bad.stderr and "Traceback" not in bad.stderr


def test_dvae_dictionary_toy_lays_out_known_patterns_and_reports_the_runs(capsys, monkeypatch):
    """bench/dvae/dictionary.py: grids made of known 3-cell patterns in reading order, the one-pattern-per-code
    bound, and a short training whose table has every quarter's row; bad sizes are one line."""
    sys.path.insert(0, str(REPO))
    try:
        from bench.dvae import dictionary
    finally:
        sys.path.remove(str(REPO))
    patterns = dictionary.make_patterns(50, torch.Generator().manual_seed(0))
    assert patterns.shape == (50, 3) and len({tuple(p) for p in patterns.tolist()}) == 50
    grids, index = dictionary.sample(patterns, torch.ones(50), 4, torch.Generator().manual_seed(1))
    assert grids.shape == (4, 6, 6) and index.shape == (4, 12)
    assert grids[2, 1].tolist() == patterns[index[2, 2]].tolist() + patterns[index[2, 3]].tolist()
    assert dictionary.dictionary_bound(200, 512) == 1.0
    assert dictionary.dictionary_bound(700, 512) == pytest.approx(0.956, abs=1e-3)
    monkeypatch.setattr(sys, "argv", ["dictionary", "--patterns", "20", "--codebook-size", "32", "--steps", "8"])
    dictionary.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [int(r[0]) for r in rows[1:]] == [2, 4, 6, 8]
    assert all(0.0 <= float(x) <= 1.0 for r in rows[1:] for x in r[1:4])
    assert all(1 <= float(r[4]) <= 32 for r in rows[1:])
    monkeypatch.setattr(sys, "argv", ["dictionary", "--patterns", "2000"])
    with pytest.raises(SystemExit, match="at most 1000"):
        dictionary.main()


def _entropy_module():
    return bench_module("dvae.entropy")


@pytest.fixture(scope="module")
def entropy_counts():
    """bench/dvae/entropy.py's training counts over 40 ARC training grids (the real ones, in their 8 variants)."""
    from latentforge.tasks.dvae.data import load_arc

    train = load_arc("train").select(slice(0, 40))
    entropy = _entropy_module()
    return entropy.training_counts(train.tokens, train.shapes, entropy.Params())


def test_dvae_entropy_context_cells_are_the_rules_neighbours_and_the_earlier_mirrored_cells():
    """The first eight context cells are context.neighbour_colours' and their pattern ids context.pattern_ids';
    the mirrored cells are present exactly where they come earlier in reading order."""
    from latentforge.tasks.dvae.context import neighbour_colours, pattern_ids

    entropy = _entropy_module()
    grid = torch.randint(0, 10, (5, 4), generator=torch.Generator().manual_seed(0))
    cells = entropy.context_cells(grid.numpy())
    canvas = torch.full((1, 32, 32), 10)
    canvas[0, :5, :4] = grid
    rule_cells = neighbour_colours(canvas, torch.tensor([[5, 4]]))[0].view(32, 32, -1)[:5, :4].reshape(20, -1)
    assert (torch.from_numpy(cells[:, :8]) == rule_cells).all()
    assert (torch.from_numpy(entropy.patterns(cells[:, :8])) == pattern_ids(rule_cells)).all()
    for i, (r, c) in enumerate((r, c) for r in range(5) for c in range(4)):
        assert cells[i, 8] == (grid[4 - r, c] if 4 - r < r else entropy.MISSING)
        assert cells[i, 9] == (grid[r, 3 - c] if 3 - c < c else entropy.MISSING)
        assert cells[i, 10] == (grid[4 - r, 3 - c] if (4 - r) * 4 + 3 - c < i else entropy.MISSING)
        assert cells[i, 11] == entropy.MISSING  # not square: no diagonal
    square = entropy.context_cells(grid[:4].numpy())
    assert [square[r * 4 + c, 11] for r, c in ((2, 1), (1, 2))] == [grid[1, 2], entropy.MISSING]


def test_dvae_entropy_coder_is_a_prefix_code_and_pays_for_what_it_cannot_predict(entropy_counts):
    """Over every 1 x 3 grid the code lengths (axes given) satisfy Kraft's equality (the model's probabilities sum
    to one); a uniform grid costs a few bits, a random one about log2(10) a cell, one whose lower half mirrors its
    upper half about half of that, also about an axis off the middle; a grid within the budget comes back whole."""
    import itertools
    import math

    import numpy as np

    entropy = _entropy_module()
    train, prior = entropy_counts
    params = entropy.Params()
    shape_bits = 2 * math.log2(30)
    header = shape_bits + entropy.axes_bits((1, 3))
    kraft = sum(2 ** -(entropy.code_grid(np.array([g]), 1e9, train, prior, params, axes=(0, 2))["bits"] - header)
                for g in itertools.product(range(10), repeat=3))
    assert kraft == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(0)
    random = rng.integers(0, 10, (20, 20))
    mirrored = np.concatenate([random[:10], random[:10][::-1]])
    bits = {name: entropy.code_grid(g, 1e9, train, prior, params)["bits"]
            for name, g in (("uniform", np.zeros((20, 20), dtype=np.int64)), ("random", random),
                            ("mirrored", mirrored))}
    assert bits["uniform"] < 30
    assert 0.95 * 400 * math.log2(10) < bits["random"] < 1.2 * 400 * math.log2(10)
    assert bits["mirrored"] < 0.65 * bits["random"]
    offset = np.concatenate([random[:2], random[2:10], random[2:10][::-1], random[10:14]])  # row axis 2 + 17
    assert entropy.symmetry_axes(offset)[0] == 19
    middle = entropy.code_grid(offset, 1e9, train, prior, params, axes=(21, 19))["bits"]
    assert entropy.code_grid(offset, 1e9, train, prior, params)["bits"] < 0.75 * middle
    unnamed = entropy.code_grid(offset, 1e9, train, prior, entropy.Params(middle_axes=True))["bits"]
    assert unnamed == pytest.approx(middle - entropy.axes_bits(offset.shape))  # the middle axes, not named
    whole = entropy.code_grid(mirrored, 1e9, train, prior, params)
    assert whole["coded"] == whole["guessed_true"] == whole["guessed_free"] == 400
    cut = entropy.code_grid(random, 200.0, train, prior, params)
    assert 0 < cut["coded"] < 100 and cut["guessed_free"] < 200  # the rest of a random grid is mostly guessed wrong


def test_dvae_entropy_reports_the_grids_within_the_budget():
    """python -m bench.dvae.entropy on a few held-out grids: the table's row, shares within [0, 1]."""
    result = subprocess.run([sys.executable, "-m", "bench.dvae.entropy", "--grids", "12", "--workers", "1"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "12 held-out grids" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 1152 bits"))
    assert all(0 <= float(x) <= 1 for x in row.strip("| ").split(" | ")[1:] if x)
    assert next(line for line in result.stdout.splitlines() if line.startswith("the miss layout (126 codes"))
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| one run per code", "| 1 bits"))]
    assert len(rows) == 2 and all(0 <= float(x) <= 1 for row in rows for x in row.strip("| ").split(" | ")[1:])
    paired = [line.strip("| ").split(" | ") for line in result.stdout.splitlines() if line.startswith("| 8 | at most")]
    assert len(paired) == 2 and all(0 <= float(x) <= 1 for row in paired for x in row[3:])


def test_dvae_entropy_miss_layout_counts_the_misses_past_the_last_code_and_packs_cheap_runs(capsys):
    """One run per code: a grid whose 200 cells all miss has 74 misses past its 126 codes. Runs packed until
    they cost 1 bit: at half a bit a miss, two runs a code, 100 codes, and it fits; a cheap run followed by a
    costly one (8.5 bits together, over log2(512 - 32 * 11) bits) share a code that cannot be exact."""
    import numpy as np

    entropy = _entropy_module()
    cheap = {"missed": np.ones(200, dtype=bool), "costs": np.full(200, 0.5), "cells": 200}
    costly = {"missed": np.array([True, True, False, False]), "costs": np.array([0.5, 8.0, 0.0, 0.0]), "cells": 4}
    entropy.report_miss_layout([cheap, costly], 126, 32, 512)
    out = capsys.readouterr().out
    assert f"cells mispredicted {202 / 204:.4f}" in out
    assert f"| one run per code | 0.500 | 0.000 | {1 - 74 / 204:.4f} |" in out
    assert f"| 1 bits | 0.500 | {1 / 102:.3f} | {1 - 2 / 204:.4f} |" in out


def test_dvae_entropy_pairs_a_cheap_miss_with_the_next_and_counts_every_kind_of_code():
    """A code ends at a miss ranked above pair_rank, at its second miss, or after run_limit cells; the kinds counted
    are exactly the first codes that every rank sequence of run_limit cells can start with."""
    import itertools

    import numpy as np

    entropy = _entropy_module()
    ranks = np.array([0, 1, 0, 3, 0, 0, 1, 0, 2, 0, 1, 1, 0])
    assert entropy.paired_miss_codes(ranks, 4, 1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 4]
    assert entropy.paired_miss_codes(ranks, 4, 0).tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 6]
    for run_limit, pair_rank in ((3, 0), (3, 1), (4, 1), (4, 2)):
        firsts = set()
        for sequence in itertools.product(range(10), repeat=run_limit):
            codes = entropy.paired_miss_codes(np.array(sequence), run_limit, pair_rank)
            firsts.add(sequence[:int((codes == 0).sum())])
        assert len(firsts) == entropy.paired_miss_kinds(run_limit, pair_rank)


def test_dvae_context_speed_times_both_contexts_and_the_interval_layout():
    """bench/dvae/context_speed.py on the CPU, a small batch: one line per context and one for the interval layout, a
    positive time each."""
    result = subprocess.run([sys.executable, "-m", "bench.dvae.context_speed", "--batch", "4", "--repeats", "1",
                             "--device", "cpu"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr
    times = re.findall(r"^(fitted rule|adaptive context|interval layout): ([0-9.]+) ms per batch$", result.stdout,
                       re.MULTILINE)
    assert [name for name, _ in times] == ["fitted rule", "adaptive context", "interval layout"]
    assert all(float(t) > 0 for _, t in times)


def test_a_tunstall_tree_parses_any_ranks_into_its_leaves():
    """bench.dvae.entropy.tunstall_dictionary: at most `leaves` leaves, grown where ranks are likely; any rank
    sequence parses into codes that are leaves (every proper prefix an internal node, the code itself not)."""
    entropy = _entropy_module()
    p = np.array([0.8, 0.1, 0.05, 0.05])
    tree = entropy.tunstall_dictionary(p, 40)
    leaves = 1 + (len(p) - 1) * len(tree)
    assert leaves <= 40 < leaves + len(p) - 1
    assert (0,) * 6 in tree and (3, 3) not in tree  # the likely runs of hits are long, the unlikely ranks short
    ranks = np.random.default_rng(0).choice(len(p), size=500, p=p)
    codes = entropy.tunstall_codes(ranks, tree)
    assert codes[0] == 0 and (np.diff(codes) >= 0).all() and (np.diff(codes) <= 1).all()
    for code in range(codes[-1]):  # the last code may end with the sequence
        word = tuple(ranks[codes == code].tolist())
        assert word not in tree and all(word[:k] in tree for k in range(len(word)))


def test_interval_codes_decode_to_their_ranks_and_spend_codes_by_surprisal():
    """bench.dvae.entropy.interval_codes: every code's value lies in the codebook and, with the same probabilities at
    each cell, interval_decode gives back every rank; likely cells share a code, an unlikely one costs most of one."""
    entropy = _entropy_module()
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 300))
        probs = -np.sort(-rng.dirichlet(np.full(10, 0.3), size=n), axis=1)
        ranks = np.array([rng.choice(10, p=p) for p in probs])
        code, values = entropy.interval_codes(ranks, probs, 512)
        assert code[0] == 0 and (np.diff(code) >= 0).all() and len(values) == code[-1] + 1
        assert all(0 <= v < 512 for v in values)
        assert np.array_equal(entropy.interval_decode(values, probs, 512), ranks)
    sure = np.tile([0.991] + [0.001] * 9, (2000, 1))
    hits = entropy.interval_codes(np.zeros(2000, dtype=np.int64), sure, 512)[0]
    # log2(512) / -log2(0.991) = 690 would be the ideal; the rare ranks' values and the escape cost some of it.
    assert 250 < len(hits) / (hits[-1] + 1) < 690
    misses = entropy.interval_codes(np.full(4, 9), sure, 512)[0]
    assert misses.tolist() == [0, 1, 2, 3]  # a rank of 1/1000 takes (nearly) a code of its own
    # Four equally likely ranks: a code holds at most log2(512) / log2(4) = 4.5 cells, and loses less than one to
    # the rounding.
    flat = np.full((90, 4), 0.25)
    code = entropy.interval_codes(np.arange(90) % 4, flat, 512)[0]
    assert 3.5 < 90 / (code[-1] + 1) <= 4.5


def test_own_guess_accuracy_counts_the_cells_past_the_coded_ones():
    """bench.dvae.capacity.own_guess_accuracy: every cell coded gives every cell back; fewer coded cells, fewer right,
    and with none the context guesses every cell from its own guesses."""
    from latentforge.tasks.dvae.context import AdaptiveContext, symmetry_axes
    from latentforge.tasks.dvae.data import load_arc

    capacity = bench_module("dvae.capacity")
    train, test = load_arc("train").select(slice(0, 200)), load_arc("eval").select(slice(0, 90))
    context = AdaptiveContext(10, axes=True).fit(train.tokens, train.shapes)
    cells = test.shapes.prod(1)
    accuracy = [capacity.own_guess_accuracy(test, context, coded) for coded in (cells, cells // 2, 0 * cells)]
    assert accuracy[0] == 1.0 and accuracy[0] > accuracy[1] > accuracy[2] > 0.3
    # The second half of a grid decoded one cell at a time, in reading order, from the cells decoded before it.
    grid = test.select(slice(79, 80))  # 9 x 4, half its second half guessed wrong
    (h, w), size = grid.shapes[0].tolist(), grid.tokens.shape[-1]
    axes = symmetry_axes(grid.tokens, grid.shapes)
    decoded = grid.tokens.clone()
    for place in range(h * w // 2, h * w):
        cell = (place // w) * size + place % w
        decoded.view(1, -1)[0, cell] = context.guesses(decoded, grid.shapes, axes)[0, cell]
    right = int((decoded == grid.tokens)[0, :h, :w].sum())
    assert h != w and right < h * w
    assert capacity.own_guess_accuracy(grid, context, grid.shapes.prod(1) // 2) == pytest.approx(right / (h * w))


def test_layout_reach_decodes_the_uncoded_cells_from_its_own_guesses():
    """bench.dvae.layout_reach: with 12 codes most large held-out grids do not fit; the cells past the last code take
    the context's guess, from the true earlier cells or, as greedy decoding does, one cell at a time from the
    guesses before them."""
    from latentforge.tasks.dvae.context import inside_cells
    from latentforge.tasks.dvae.task import DVAE

    layout_reach = bench_module("dvae.layout_reach").layout_reach
    cfg = load_config("dvae/arc-vq-pairs", ["train.device=cpu", "model.latents=14"])
    task = DVAE(cfg, torch.device("cpu"))
    model = task.build_model()
    grids = task.grids("test")
    large = (grids.shapes.long().prod(1) > 100).nonzero().flatten()[:6]
    tokens, shapes = grids.tokens[large].long(), grids.shapes[large].long()
    fit, wrong_true, wrong_free, excess = layout_reach(model, tokens, shapes)
    assert not fit.all() and (wrong_true[~fit] > 0).all() and (wrong_true[fit] == 0).all()
    assert torch.equal(excess > 0, ~fit)
    assert int(wrong_free.sum()) > int(wrong_true.sum())  # a miss left uncoded leads later guesses astray
    axes = model.grid_axes(tokens, shapes)
    past = inside_cells(shapes, 32) & (model.layout(tokens, shapes, axes).slot >= model.slots)
    decoded = tokens.flatten(1).clone()
    for cell in past.any(0).nonzero().flatten().tolist():
        guess = model.layout(decoded.view_as(tokens), shapes, axes).guess[:, cell]
        decoded[:, cell] = torch.where(past[:, cell], guess, decoded[:, cell])
    assert torch.equal((decoded != tokens.flatten(1)).sum(1), wrong_free)
    # The runs past the codes: with that many more codes a grid fits, with one fewer it does not.
    from latentforge.tasks.dvae.context import colour_ranks, paired_miss_runs

    layout = model.layout(tokens, shapes, axes)
    rank = colour_ranks(layout.choices, tokens.flatten(1))
    for b in (~fit).nonzero().flatten().tolist():
        for more, fits in ((int(excess[b]), True), (int(excess[b]) - 1, False)):
            slot = paired_miss_runs(rank[b:b + 1], inside_cells(shapes[b:b + 1], 32), model.slots + more,
                                    model.miss_run, model.miss_pair_rank)[0]
            assert bool((layout.missed[b:b + 1] & (slot >= model.slots + more)).any()) != fits


def test_interval_toy_codes_hold_more_cells_and_are_learned():
    """bench.dvae.interval_toy: at the same contents interval codes hold more cells than a Tunstall dictionary's,
    and a few hundred steps of the toy dVAE decode most fresh runs of either exactly."""
    toy = bench_module("dvae.interval_toy")
    per_code = {}
    for layout in ("tunstall", "interval"):
        rows = toy.train(layout, 128, 64, 300)
        per_code[layout] = rows.pop()["cells_per_code"]
        assert rows[-1]["step"] == 300 and rows[-1]["runs"] > 0.75 and rows[-1]["cells"] > 0.93
        assert rows[-1]["codes"] > 64
    assert per_code["interval"] > 1.1 * per_code["tunstall"]
    # Without the escape value (model.miss_interval's codes) a code holds fewer cells, still more than the dictionary's.
    ranks, _, lengths = toy.runs("bounded", 20_000, 64, 0)
    assert per_code["tunstall"] < float(lengths.float().mean()) < per_code["interval"]
    from latentforge.tasks.dvae.context import interval_run_bound

    assert int(lengths.max()) <= interval_run_bound(64, 4) and (ranks >= 0).sum() == lengths.sum()
