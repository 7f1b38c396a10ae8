import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, ok, snapshot
from typer.testing import CliRunner

from latentforge.cli import app
from latentforge.config import load_config
from latentforge.launch.local import child_env
from latentforge.launch.sweep import expand_sweep

# Seconds per run: a tiny model, 4 steps, evaluated twice (so "best over the evaluations" means something).
FAST = ["train.steps=4", "train.log_every=1", "train.eval_every=2", "checkpoint.every=2", "data.test_size=100",
        "data.train_eval_size=100", "train.batch_size=16"]
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_file(path: Path, body: str, overrides: list[str] = FAST) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"overrides: {json.dumps(overrides)}\n{body}")
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *messages: str) -> str:
    """Bad input: one line starting with error:, exit code 2, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for message in messages:
        assert message in lines[0], lines[0]
    return lines[0]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- expansion

def test_grid_order_run_ids_and_overrides(tmp_path):
    f = sweep_file(tmp_path / "width.yaml", "config: multiply/tiny\ngrid:\n  model.d_model: [32, 64]\n"
                                            "  optim.name: [adamw, muon]\n  data.digits_a: [[1, 2], [2, 2]]\n")
    sweep = expand_sweep(f)
    assert sweep.name == "width" and sweep.keys == ["model.d_model", "optim.name", "data.digits_a"]
    assert [p.run_id for p in sweep.points][:3] == [
        "000-d_model=32-name=adamw-digits_a=1_2", "001-d_model=32-name=adamw-digits_a=2_2",
        "002-d_model=32-name=muon-digits_a=1_2"]
    assert len(sweep.points) == 8 and sweep.points[-1].run_id == "007-d_model=64-name=muon-digits_a=2_2"
    last = sweep.points[-1]
    assert last.config == "multiply/tiny" and last.values == {"model.d_model": 64, "optim.name": "muon",
                                                               "data.digits_a": [2, 2]}
    # The fixed overrides first, then the point's own, read back by the config loader with their types.
    assert last.overrides == [*FAST, "model.d_model=64", "optim.name=muon", "data.digits_a=[2, 2]"]
    cfg = load_config(last.config, last.overrides)
    assert (cfg.model.d_model, cfg.optim.name, list(cfg.data.digits_a)) == (64, "muon", [2, 2])


def test_a_list_of_configs_is_a_grid_axis(tmp_path):
    (tmp_path / "sweeps" / "mine.yaml").parent.mkdir()
    (tmp_path / "sweeps" / "mine.yaml").write_text("base: multiply/tiny\nmodel: {n_layer: 2}\n")
    f = sweep_file(tmp_path / "sweeps" / "s.yaml", "name: cfgs\nconfig: [multiply/tiny, mine.yaml]\n"
                                                    "grid: {train.seed: [0, 1]}\n")
    sweep = expand_sweep(f)
    assert sweep.name == "cfgs" and sweep.keys == ["config", "train.seed"]
    assert [p.run_id for p in sweep.points] == ["000-config=multiply_tiny-seed=0", "001-config=multiply_tiny-seed=1",
                                                "002-config=mine.yaml-seed=0", "003-config=mine.yaml-seed=1"]
    # A file is read from the sweep file's folder and handed to `train` as an absolute path.
    assert sweep.points[2].config == str((tmp_path / "sweeps" / "mine.yaml").resolve())
    assert sweep.points[2].values == {"config": "mine.yaml", "train.seed": 0}
    assert "config=" not in " ".join(sweep.points[2].overrides)


@pytest.mark.parametrize("body, messages", [
    (None, ["sweep file", "does not exist"]),
    ("config: multiply/tiny\ngrid: {model.d_model: [32\n", ["malformed YAML in sweep"]),
    ("config: multiply/tiny\ngird: {model.d_model: [32]}\n", ["unknown key gird; did you mean grid?"]),
    ("config: multiply/tiny\ngrid: {model.d_model: 32}\n", ["grid.model.d_model must be a non-empty list"]),
    ("config: multiply/tiny\ngrid: {model.d_model: []}\n", ["grid.model.d_model must be a non-empty list"]),
    ("grid: {model.d_model: [32]}\n", ["config: is missing"]),
    ("config: multiply/nope\n", ["point 000", "no preset or file named 'multiply/nope'"]),
    ("config: nope.yaml\n", ["config file", "nope.yaml does not exist"]),
    ("config: multiply/tiny\ngrid: {model.d_mdel: [32]}\n", ["point 000-d_mdel=32", "unknown key model.d_mdel"]),
    ("config: multiply/tiny\ngrid: {train.batch_size: [16, 0]}\n",
     ["point 001-batch_size=0", "train.batch_size must be >= 1"]),
    ("config: multiply/tiny\nreport: {metric: test/loss, mode: best}\n", ["report.mode must be min or max"]),
    ("config: multiply/tiny\nreport: {metric: test/loss}\n", ["report.mode is needed"]),
    ("config: multiply/tiny\nreport: {x: [model.d_mdel]}\n", ["report: unknown key model.d_mdel"]),
    ("config: multiply/tiny\nname: a/b\n", ["name 'a/b' may only hold"]),
])
def test_bad_sweep_files_change_nothing(tmp_path, body, messages):
    f = tmp_path / "bad.yaml"
    if body is not None:
        sweep_file(f, body)
    runs_dir = tmp_path / "runs"
    line = refused(invoke("sweep", f, "--runs-dir", runs_dir), *messages)
    assert str(f) in line
    assert not runs_dir.exists()
    refused(invoke("sweep", f, "--dry-run", "--runs-dir", runs_dir), *messages)
    assert not runs_dir.exists()


def test_a_device_this_machine_lacks_is_refused_before_anything_starts(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    f = sweep_file(tmp_path / "dev.yaml", "config: multiply/tiny\ngrid: {train.device: [cpu, cuda]}\n")
    refused(invoke("sweep", f, "--runs-dir", tmp_path / "runs"), str(f), "point 001-device=cuda", "no CUDA GPU")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["sweep", "report"], "needs a directory of runs"),
    (["sweep", "report", "somewhere", "--parallel", "2"], "not for sweep report"),
    (["sweep", "file.yaml", "extra"], "latentforge sweep report extra"),
    (["sweep", "file.yaml", "--metric", "test/loss"], "are for latentforge sweep report"),
])
def test_misused_arguments(tmp_path, args, message):
    refused(invoke(*args, "--runs-dir", tmp_path / "runs"), message)
    assert not (tmp_path / "runs").exists()


def test_omp_threads_are_shared_between_parallel_cpu_runs():
    cores = os.cpu_count() or 1
    assert child_env(2, True, {})["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert child_env(cores * 4, True, {})["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in child_env(1, True, {})
    assert "OMP_NUM_THREADS" not in child_env(2, False, {})
    assert child_env(2, True, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


# ----------------------------------------------------------------------------- running (real subprocesses)

@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished 2-point sweep, run once for the module through the CLI with --parallel 2."""
    root = tmp_path_factory.mktemp("sweep")
    f = sweep_file(root / "width.yaml", "name: width\nconfig: multiply/tiny\ngrid: {model.d_model: [16, 32]}\n"
                                        "report: {x: [params, model.d_model]}\n")
    result = invoke("sweep", f, "--parallel", "2", "--runs-dir", root / "runs")
    return f, root / "runs", root / "runs" / "width", result


IDS = ["000-d_model=16", "001-d_model=32"]


def test_sweep_trains_every_point(swept):
    f, _, sweep_dir, result = swept
    out = ok(result).output
    assert "all 2 runs finished" in out and all(i in out for i in IDS)
    for run_id, width in zip(IDS, (16, 32)):
        info = json.loads((sweep_dir / run_id / "run.json").read_text())
        assert info["status"] == "finished" and info["step"] == 4
        assert load_config(sweep_dir / run_id / "config.yaml").model.d_model == width
        log = (sweep_dir / "logs" / f"{run_id}.log").read_text()
        assert log.startswith("=== ") and "train multiply/tiny" in log and f"--name {run_id}" in log
    points = json.loads((sweep_dir / "points.json").read_text())
    assert [p["run_id"] for p in points["points"]] == IDS
    assert points["points"][1]["overrides"] == [*FAST, "model.d_model=32"]
    assert (sweep_dir / "sweep.yaml").read_text() == f.read_text()


def test_running_it_again_skips_finished_runs(swept):
    f, runs_dir, sweep_dir, _ = swept
    before = snapshot(sweep_dir)
    out = ok(invoke("sweep", f, "--parallel", "2", "--runs-dir", runs_dir)).output
    assert "2 of 2 runs need no work" in out and "start" not in out
    after = snapshot(sweep_dir)
    for run_id in IDS:  # nothing retrained
        for name in ("metrics.jsonl", "run.json", "config.yaml"):
            assert after[f"{run_id}/{name}"] == before[f"{run_id}/{name}"]


def test_another_grid_in_the_same_directory_is_refused(swept, tmp_path):
    f, runs_dir, sweep_dir, _ = swept
    changed = sweep_file(tmp_path / "width.yaml", "name: width\nconfig: multiply/tiny\n"
                                                  "grid: {model.d_model: [16, 64]}\n")
    before = snapshot(sweep_dir)
    refused(invoke("sweep", changed, "--runs-dir", runs_dir), "holds another sweep", "new name:")
    refused(invoke("sweep", changed, "--dry-run", "--runs-dir", runs_dir), "holds another sweep")
    assert snapshot(sweep_dir) == before


def test_dry_run_prints_the_points_and_starts_nothing(swept, tmp_path):
    f, runs_dir, _, _ = swept
    out = ok(invoke("sweep", f, "--dry-run", "--runs-dir", runs_dir)).output
    assert "000-d_model=16  (skip)" in out and "nothing started" in out
    fresh = tmp_path / "fresh"
    out = ok(invoke("sweep", f, "--dry-run", "--runs-dir", fresh)).output
    assert f"001-d_model=32  (train)  multiply/tiny {' '.join(FAST)} model.d_model=32" in out
    assert not fresh.exists()


def test_report_writes_the_csv_and_the_plots(swept, tmp_path):
    _, _, sweep_dir, _ = swept
    out_dir = tmp_path / "report"
    out = ok(invoke("sweep", "report", sweep_dir, "--metric", "test/loss", "--mode", "min", "--out", out_dir)).output
    assert "best test/loss" in out and str(out_dir / "report.csv") in out
    rows = list(csv.DictReader((out_dir / "report.csv").open()))
    assert [r["run"] for r in rows] == IDS
    for row, width in zip(rows, ("16", "32")):
        run = sweep_dir / row["run"]
        evals = [(r["test/loss"], r["step"]) for r in records(run) if "test/loss" in r]
        assert len(evals) == 2
        best, step = min(evals)
        assert float(row["best"]) == pytest.approx(best) and int(row["best_step"]) == step
        assert int(row["params"]) == json.loads((run / "run.json").read_text())["params"]
        assert row["model.d_model"] == width and row["status"] == "finished"
        assert (row["metric"], row["mode"]) == ("test/loss", "min")
    # sweep.yaml's report: section chose the plots.
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["report-model.d_model.png", "report-params.png"]
    for png in out_dir.glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000


def test_report_defaults_to_the_checkpoint_metric_and_works_without_a_sweep_file(swept, tmp_path):
    _, _, sweep_dir, _ = swept
    plain = tmp_path / "plain"
    for run_id in IDS:  # a directory of runs that no sweep launched
        shutil.copytree(sweep_dir / run_id, plain / run_id)
    ok(invoke("sweep", "report", plain))
    rows = list(csv.DictReader((plain / "report.csv").open()))
    assert [(r["metric"], r["mode"]) for r in rows] == [("test/exact_match", "max")] * 2
    assert "model.d_model" in rows[0] and "optim.lr" not in rows[0]  # the keys that differ are the grid
    assert sorted(p.name for p in plain.glob("*.png")) == ["report-model.d_model.png", "report-params.png"]


def test_report_errors(swept, tmp_path):
    _, _, sweep_dir, _ = swept
    refused(invoke("sweep", "report", tmp_path / "missing"), "no runs in")
    (tmp_path / "empty").mkdir()
    refused(invoke("sweep", "report", tmp_path / "empty"), "no runs in")
    before = snapshot(sweep_dir)
    refused(invoke("sweep", "report", sweep_dir, "--metric", "test/nope", "--mode", "max"),
            "no run in", "logged test/nope")
    refused(invoke("sweep", "report", sweep_dir, "--metric", "test/loss"), "pass --mode min or --mode max")
    assert snapshot(sweep_dir) == before


def test_continuing_resumes_runs_with_a_checkpoint_and_retrains_the_others(swept, tmp_path):
    f, _, sweep_dir, _ = swept
    runs_dir = tmp_path / "runs"
    shutil.copytree(sweep_dir, runs_dir / "width")
    stopped, broken = (runs_dir / "width" / run_id for run_id in IDS)
    info = json.loads((stopped / "run.json").read_text())
    (stopped / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    info = json.loads((broken / "run.json").read_text())
    (broken / "run.json").write_text(json.dumps({**info, "status": "failed"}))
    shutil.rmtree(broken / "checkpoints")
    old_metrics = (stopped / "metrics.jsonl").read_text()
    out = ok(invoke("sweep", f, "--parallel", "2", "--runs-dir", runs_dir)).output
    assert f"start {IDS[0]} (resume)" in out and f"start {IDS[1]} (retrain)" in out
    resumed = json.loads((stopped / "run.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed"][0]["step"] == 4
    assert (stopped / "metrics.jsonl").read_text() == old_metrics
    retrained = json.loads((broken / "run.json").read_text())
    assert retrained["status"] == "finished" and retrained["created"] > info["created"]
    log = (runs_dir / "width" / "logs" / f"{IDS[0]}.log").read_text()
    assert log.count("=== ") == 2 and f"resume {stopped} --quiet" in log  # appended, not replaced


def test_a_failed_run_exits_1_and_names_its_log(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("these are not products\n")
    f = sweep_file(tmp_path / "fails.yaml", "config: multiply/tiny\n",
                   [*FAST, f"data.eval_files={{mine: {bad}}}", "data.eval_splits=[test,mine]"])
    result = invoke("sweep", f, "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 1, result.output
    log = tmp_path / "runs" / "fails" / "logs" / "000.log"
    assert "000: failed (exit 2): error:" in result.output and f"log: {log}" in result.output
    assert "line 1 is not" in log.read_text() and "Traceback" not in result.output


def test_ctrl_c_stops_the_children_with_a_checkpoint(tmp_path):
    """A real `latentforge sweep` gets SIGINT: its children checkpoint, it says how to continue, exits 130."""
    f = sweep_file(tmp_path / "long.yaml", "config: multiply/tiny\ngrid: {model.d_model: [16, 32, 48]}\n",
                   [*FAST, "train.steps=100000", "train.eval_every=0", "checkpoint.every=0"])
    runs_dir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "latentforge", "sweep", str(f), "--parallel", "2", "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    runs = [runs_dir / "long" / run_id for run_id in ("000-d_model=16", "001-d_model=32")]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not all(
                (r / "metrics.jsonl").is_file() and len((r / "metrics.jsonl").read_text().splitlines()) >= 3
                for r in runs):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed: stop the sweep, which stops its children
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert f"continue the sweep with: latentforge sweep {f}" in stderr and "Traceback" not in stderr
    for run in runs:
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "interrupted"
        assert (run / "checkpoints" / f"step_{info['step']:08d}").is_dir()
    assert not (runs_dir / "long" / "002-d_model=48").exists() and "not started" in stdout


def test_help_shows_both_forms():
    out = ok(invoke("sweep", "--help")).output
    assert "sweep FILE" in out and "sweep report DIR" in out and "sweep" in ok(invoke("--help")).output
