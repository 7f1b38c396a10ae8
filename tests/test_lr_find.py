import csv
import json
import math

import numpy as np
import pytest
from conftest import snapshot

from latentforge.engine.lr_find import centered, lr_at_step, steepest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep(cli, *args: str) -> dict:
    result = cli("lr-find", "multiply/tiny", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def read_rows(path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_lr_find_sweeps_suggests_and_saves_a_plot(cli, runs_dir):
    found = sweep(cli, "--steps", "30", "--min-lr", "1e-6", "--max-lr", "1.0", "--runs-dir", runs_dir)
    rows = read_rows(found["csv"])
    lrs = [r["lr"] for r in rows]
    assert len(rows) == found["steps"] >= 20
    assert lrs[0] == pytest.approx(1e-6) and all(a < b for a, b in zip(lrs, lrs[1:]))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["smoothed"]) for r in rows)
    assert 1e-6 <= found["suggestion"] <= 1.0 and found["suggestion"] in lrs
    assert 1e-6 <= found["min_loss_lr"] <= 1.0
    # The model learns somewhere in the sweep: the lowest loss is below the first one.
    assert found["min_loss"] < rows[0]["loss"]
    with open(found["png"], "rb") as f:
        assert f.read(8) == PNG_MAGIC
    # Only the sweep's own directory was written: no run directory, nothing else.
    (sweep_dir,) = (runs_dir / "lr-find").iterdir()
    assert [p.name for p in runs_dir.iterdir()] == ["lr-find"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["lr_find.csv", "lr_find.png"]
    assert sweep_dir.name.startswith("multiply-tiny-")


def test_lr_find_stops_once_the_loss_diverges(cli, tmp_path):
    found = sweep(cli, "--steps", "30", "--min-lr", "1e-4", "--max-lr", "1e6", "--out", tmp_path / "huge")
    rows = read_rows(found["csv"])
    assert found["stopped"] and len(rows) < 30
    assert rows[-1]["lr"] < 1e6
    assert "smoothed loss" in found["stopped"]
    assert rows[-1]["smoothed"] > 4 * min(r["smoothed"] for r in rows[:-1])


def test_lr_find_prints_one_line_and_refuses_an_existing_output(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("lr-find", "multiply/tiny", "--steps", "8", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("suggested lr ") and len(result.stdout.splitlines()) == 1
    before = snapshot(out)
    again = cli("lr-find", "multiply/tiny", "--steps", "8", "--out", out)
    assert again.exit_code == 2 and "exists" in again.output
    assert snapshot(out) == before


@pytest.mark.parametrize("args, message", [
    (["--steps", "1"], "--steps must be >= 2"),
    (["--min-lr", "1", "--max-lr", "0.1"], "0 < min-lr < max-lr"),
    (["--min-lr", "0"], "0 < min-lr < max-lr"),
    (["model.nope=1"], "unknown key model.nope"),
])
def test_lr_find_bad_input_is_one_line(cli, runs_dir, args, message):
    result = cli("lr-find", "multiply/tiny", *args, "--runs-dir", runs_dir)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not runs_dir.exists()


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    """A loss that falls fastest at 1e-3, bottoms out near 1e-1 and then blows up noisily."""
    steps = 100
    lrs = [lr_at_step(k, steps, 1e-7, 10.0) for k in range(steps)]
    x = np.log10(lrs)
    rng = np.random.default_rng(0)
    loss = 3 - 1.0 / (1 + np.exp(-3 * (x + 3))) + np.where(x > -1, 5 * (x + 1) ** 2, 0) + rng.normal(0, 0.02, steps)
    curve = centered(list(loss))
    suggestion = lrs[steepest(lrs, curve)]
    assert 3e-4 < suggestion < 3e-3
    assert lrs[0] == 1e-7 and lrs[-1] == pytest.approx(10.0)
    # A loss that only rises: the best guess is the smallest LR.
    assert steepest(lrs, list(np.linspace(1, 2, steps))) == 0
