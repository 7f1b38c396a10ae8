"""The benchmark scripts stay runnable: they import, and the side-by-side script trains,
evaluates and compares a spec file end to end (tiny runs on the CPU)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.parametrize("module", ["bench.multiply_speed", "bench.multiply_sweep"])
def test_bench_modules_import(module):
    sys.path.insert(0, str(REPO))
    try:
        importlib.import_module(module)
    finally:
        sys.path.remove(str(REPO))


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
