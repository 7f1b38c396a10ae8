import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY
from test_cli import ok, refused
from typer.testing import CliRunner

from latentforge.cli import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory) -> Path:
    """Two finished tiny runs of different widths, `small` and `wide`, trained once for this module."""
    runs_dir = tmp_path_factory.mktemp("pair") / "runs"
    for name, width in (("small", 16), ("wide", 32)):
        ok(CliRunner().invoke(app, ["train", "multiply/tiny", *TINY, f"model.d_model={width}", "train.device=cpu",
                                    "--name", name, "--runs-dir", str(runs_dir), "-q"]))
    return runs_dir


@pytest.fixture
def two_runs(trained_pair, runs_dir) -> dict[str, dict]:
    """A fresh copy of the pair in this test's runs_dir; returns their run.json."""
    shutil.copytree(trained_pair, runs_dir)
    return {name: json.loads((runs_dir / name / "run.json").read_text()) for name in ("small", "wide")}


def saved(out_dir: Path) -> tuple[Path, Path]:
    (csv_path,) = out_dir.glob("compare-*.csv")
    (png_path,) = out_dir.glob("compare-*.png")
    return csv_path, png_path


def test_compare_prints_saves_and_plots(cli, runs_dir, two_runs, tmp_path):
    out_dir = tmp_path / "out"
    output = ok(cli("compare", "small", "wide", "--out", out_dir, "--runs-dir", runs_dir)).output
    for name, info in two_runs.items():
        assert info["train_seconds"] > 0
        assert name in output and f"{info['params']:,}" in output
        assert f"{info['last_eval']['test/exact_match']:.4f}" in output
    assert "2x2" in output and "finished" in output
    csv_path, png_path = saved(out_dir)
    assert str(csv_path) in output and str(png_path) in output
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)

    rows = list(csv.DictReader(csv_path.open()))
    assert [r["run"] for r in rows] == ["small", "wide"]
    for row in rows:
        info = two_runs[row["run"]]
        last_eval = info["last_eval"]
        assert int(row["params"]) == info["params"] and int(row["eval_step"]) == last_eval["step"] == 12
        assert float(row["exact_match"]) == last_eval["test/exact_match"]
        assert float(row["exact_match/2x2"]) == last_eval["test/exact_match/2x2"]
        assert float(row["train_seconds"]) == info["train_seconds"]
        assert float(row["exact_match_per_mparam"]) == pytest.approx(
            last_eval["test/exact_match"] / (info["params"] / 1e6))
        if "test/loss" in last_eval:
            assert float(row["loss"]) == last_eval["test/loss"]
        if info.get("flops_per_example") is not None:
            assert float(row["flops_per_example"]) == info["flops_per_example"]


def test_compare_json_and_unfinished_runs(cli, runs_dir, two_runs, tmp_path):
    info = dict(two_runs["wide"], status="interrupted")
    (runs_dir / "wide" / "run.json").write_text(json.dumps(info))
    result = ok(cli("compare", runs_dir / "small", "wide", "--json", "--out", tmp_path / "out",
                    "--runs-dir", runs_dir))
    rows = json.loads(result.stdout)
    assert [(r["run"], r["status"], r["split"]) for r in rows] == [
        ("small", "finished", "test"), ("wide", "interrupted", "test")]
    assert rows[1]["exact_match"] == info["last_eval"]["test/exact_match"]
    assert "saved" in result.stderr and len(saved(tmp_path / "out")) == 2
    assert "interrupted" in ok(cli("compare", "small", "wide", "--out", tmp_path / "out",
                                   "--runs-dir", runs_dir)).output


def test_compare_uses_a_later_eval(cli, runs_dir, two_runs, tmp_path):
    refused(cli("compare", "small", "wide", "--split", "train", "--out", tmp_path, "--runs-dir", runs_dir),
            "latentforge eval small --split train")
    ok(cli("eval", "small", "--split", "train", "--runs-dir", runs_dir))
    ok(cli("eval", "wide", "--split", "train", "--runs-dir", runs_dir))
    rows = json.loads(ok(cli("compare", "small", "wide", "--split", "train", "--json", "--out", tmp_path,
                             "--runs-dir", runs_dir)).stdout)
    for row in rows:
        (artifact,) = (runs_dir / row["run"] / "artifacts").glob("eval_train_step*.json")
        metrics = json.loads(artifact.read_text())["metrics"]
        assert row["metrics_from"] == artifact.name and row["eval_step"] == 12
        assert row["exact_match"] == metrics["train/exact_match"]


def test_compare_bad_input(cli, runs_dir, two_runs, tmp_path):
    refused(cli("compare", "small", "nope", "--out", tmp_path, "--runs-dir", runs_dir), "no run 'nope'")
    refused(cli("compare", "small", "--split", "icot", "--out", tmp_path, "--runs-dir", runs_dir),
            "run small has no 'icot' metrics (it has: test)")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(cli("compare", "small", "--out", blocker, "--runs-dir", runs_dir), "is a file, not a directory")
    assert blocker.read_text() == "x"
    assert not list(tmp_path.glob("compare-*"))
    assert ok(cli("compare", "--help")).output and cli("compare").exit_code == 2
