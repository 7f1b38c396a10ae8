import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ICOT, REPO, TINY, ok, snapshot


def refused(result, message: str):
    """Bad input: one clear line naming the problem, exit code 2, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and message in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def trained(cli, runs_dir):
    """One finished tiny run named `base`."""
    ok(cli("train", "multiply/tiny", *TINY, "--name", "base", "--runs-dir", runs_dir, "--quiet"))
    return runs_dir / "base"


def test_help_lists_every_command(cli):
    out = ok(cli("--help")).output
    for command in ("train", "resume", "runs", "eval", "predict", "compare", "probe", "encode", "decode", "data",
                    "sweep", "presets"):
        assert command in out
    for command in ("train", "resume", "eval", "runs"):
        assert "--help" in ok(cli(command, "--help")).output
    assert "show" in ok(cli("runs", "--help")).output
    assert "generate" in ok(cli("data", "--help")).output


def test_train_writes_the_run_directory(trained):
    for name in ("config.yaml", "run.json", "metrics.jsonl", "tb", "checkpoints", "artifacts/curves.png",
                 "artifacts/test_digit_acc.png"):  # each answer digit's accuracy at each evaluation
        assert (trained / name).exists(), name
    info = json.loads((trained / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 12 and info["total_steps"] == 12
    for key in ("host", "git_sha", "torch", "device", "params", "started", "ended", "best"):
        assert key in info, key
    assert info["params"] > 0 and info["device"] == "cpu"


def test_saved_config_reruns_the_same_experiment(cli, runs_dir, trained):
    ok(cli("train", trained / "config.yaml", "--name", "again", "--runs-dir", runs_dir, "--quiet"))
    first = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (runs_dir / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/loss") for r in first] == [r.get("train/loss") for r in again]


def test_tensorboard_has_the_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "test/exact_match",
                "test/token_acc", "test/exact_match/2x2"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))


def test_runs_lists_sorts_and_shows(cli, runs_dir, trained):
    ok(cli("train", "multiply/tiny", *TINY, "train.steps=6", "--name", "short", "--runs-dir", runs_dir, "-q"))
    table = ok(cli("runs", "--runs-dir", runs_dir)).output
    assert "base" in table and "short" in table and "12/12" in table and "finished" in table
    rows = json.loads(ok(cli("runs", "--json", "--sort", "step", "--runs-dir", runs_dir)).output)
    assert [r["id"] for r in rows] == ["base", "short"]
    rows = json.loads(ok(cli("runs", "--json", "--sort", "date", "--limit", "1", "--runs-dir", runs_dir)).output)
    assert [r["id"] for r in rows] == ["short"]
    rows = json.loads(ok(cli("runs", "--json", "--sort", "loss", "--runs-dir", runs_dir)).output)
    assert rows[0]["last_loss"] <= rows[1]["last_loss"]
    ok(cli("runs", "--sort", "test/exact_match", "--runs-dir", runs_dir))
    shown = ok(cli("runs", "show", "base", "--runs-dir", runs_dir)).output
    for text in ("finished", "12/12", "d_model=32", "test/exact_match", "checkpoints"):
        assert text in shown


def test_runs_dir_from_the_environment(cli, runs_dir, trained, monkeypatch):
    monkeypatch.setenv("LATENTFORGE_RUNS", str(runs_dir))
    assert "base" in ok(cli("runs")).output


def test_eval_prints_and_saves(cli, runs_dir, trained):
    out = ok(cli("eval", "base", "--runs-dir", runs_dir, "--split", "test", "--split", "train")).output
    assert "test/exact_match" in out and "train/exact_match" in out
    saved = list((trained / "artifacts").glob("eval_test+train_step*.json"))
    assert len(saved) == 1 and "test/token_acc" in json.loads(saved[0].read_text())["metrics"]
    metrics = json.loads(ok(cli("eval", trained, "--checkpoint", "best", "--json")).output)
    assert 0.0 <= metrics["test/exact_match"] <= 1.0


def test_eval_takes_data_settings_for_this_evaluation_only(cli, runs_dir, trained):
    plain = json.loads(ok(cli("eval", "base", "--runs-dir", runs_dir, "--json")).output)
    batched = json.loads(ok(cli("eval", "base", "data.eval_batch_size=7", "--runs-dir", runs_dir, "--json")).output)
    assert batched["test/exact_match"] == plain["test/exact_match"]
    saved = json.loads((trained / "artifacts" / "eval_test_step00000012.json").read_text())
    assert saved["overrides"] == ["data.eval_batch_size=7"]  # the later evaluation of the step replaced the first
    assert "eval_batch_size: 7" not in (trained / "config.yaml").read_text()
    for bad in ("model.d_model=8", "data.seed=5", "data.eval_batch_size=0", "test"):
        result = cli("eval", "base", bad, "--runs-dir", runs_dir)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_eval_on_the_public_icot_test_set(cli, runs_dir):
    ok(cli("train", "multiply/tiny", *TINY, "train.steps=2", f"data.eval_files={{icot4: {ICOT}/4_by_4/test.txt}}",
           "--name", "icot", "--runs-dir", runs_dir, "-q"))
    metrics = json.loads(ok(cli("eval", "icot", "--split", "icot4", "--json", "--runs-dir", runs_dir)).output)
    assert metrics["icot4/examples"] == 1000 and "icot4/exact_match/4x4" in metrics
    # Another public set, for this evaluation only, under a name of its own; the run's own name keeps its file.
    extra = f"data.eval_files={{icot4: {ICOT}/4_by_4/test.txt, icot5: {ICOT}/5_by_5/test.txt}}"
    metrics = json.loads(ok(cli("eval", "icot", extra, "--split", "icot5", "--json", "--runs-dir", runs_dir)).output)
    assert "icot5/exact_match/5x5" in metrics
    result = cli("eval", "icot", f"data.eval_files={{icot4: {ICOT}/5_by_5/test.txt}}", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "icot4" in result.output and len(result.output.strip().splitlines()) == 1


def test_resume_extends_a_finished_run(cli, runs_dir, trained):
    ok(cli("resume", "base", "train.steps=16", "--runs-dir", runs_dir, "-q"))
    info = json.loads((trained / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 16
    assert "train.steps=16" in info["overrides"]


def test_resume_from_a_chosen_checkpoint(cli, runs_dir, trained):
    ok(cli("resume", trained, "--checkpoint", "8", "--runs-dir", runs_dir, "-q"))
    steps = [json.loads(x)["step"] for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(12) >= 1
    info = json.loads((trained / "run.json").read_text())
    best = info["best"]["step"]
    assert (trained / "checkpoints" / f"step_{best:08d}").is_dir()  # run.json's best is a kept checkpoint
    ok(cli("eval", "base", "--checkpoint", "best", "--runs-dir", runs_dir))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["train", "multiply/tiny", "train.stpes=3"], "unknown key train.stpes; did you mean train.steps"),
    (["train", "multiply/tiny", "train.steps=three"], "train.steps must be an integer"),
    (["train", "multiply/tiny", "optim.lr=-1"], "optim.lr must be > 0"),
    (["train", "multiply/tiny", "train.batch_size=0"], "train.batch_size must be >= 1"),
    (["train", "multiply/nope"], "no preset or file named 'multiply/nope'"),
    (["train", "missing.yaml"], "config file missing.yaml does not exist"),
    (["train", "multiply/tiny", "data.test_size=9000"], "data.test_size must be at most half"),
    (["train", "multiply/tiny", "train.device=cpu", "train.cuda_graph=true"],
     "train.cuda_graph=true needs a CUDA device"),
    (["train", "multiply/tiny", "train.cuda_graph=true", "train.compile=true", "train.compile_mode=reduce-overhead"],
     "train.cuda_graph records the whole step itself"),
    (["train", "multiply/tiny", "train.cuda_graph=true", "train.compile=true", "train.compile_mode=max-autotune"],
     "max-autotune records graphs of its own"),
    (["train", "multiply/tiny", "train.compile=true", "train.compile_options={coordinate_descent_tunin: true}"],
     "train.compile_options: unexpected optimization option coordinate_descent_tunin"),
    (["train", "multiply/tiny", "train.compile=true", "train.compile_mode=reduce-overhead",
      "train.compile_options={coordinate_descent_tuning: true}"], "train.compile_options replaces the mode"),
    (["train", "multiply/tiny", "train.cuda_graph=true", "train.compile=true",
      "train.compile_options={triton.cudagraphs: true}"], "leave triton.cudagraphs out of train.compile_options"),
    (["resume", "no-such-run"], "no run 'no-such-run'"),
    (["eval", "no-such-run"], "no run 'no-such-run'"),
    (["runs", "show", "no-such-run"], "no run 'no-such-run'"),
])
def test_bad_arguments(cli, runs_dir, args, message):
    runs_dir.mkdir(parents=True)
    (runs_dir / "keep.txt").write_text("precious")
    before = snapshot(runs_dir)
    refused(cli(*args, "--runs-dir", runs_dir), message)
    assert snapshot(runs_dir) == before


def test_malformed_yaml(cli, runs_dir, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("base: multiply/tiny\ntrain: {steps: 3\n")
    refused(cli("train", f, "--runs-dir", runs_dir), "malformed YAML")
    assert not runs_dir.exists()


def test_wrong_format_data_file(cli, runs_dir, tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("these are not products\n")
    refused(cli("train", "multiply/tiny", f"data.eval_files={{mine: {f}}}", "data.eval_splits=[test,mine]",
                "--runs-dir", runs_dir), "line 1 is not")
    assert not runs_dir.exists()


def test_missing_data_file(cli, runs_dir, tmp_path):
    refused(cli("train", "multiply/tiny", f"data.eval_files={{mine: {tmp_path}/nope.txt}}",
                "--runs-dir", runs_dir), "cannot read multiplication file")


def test_existing_run_needs_overwrite(cli, runs_dir, trained):
    before = snapshot(trained)
    refused(cli("train", "multiply/tiny", *TINY, "--name", "base", "--runs-dir", runs_dir),
            "already exists; pass --overwrite")
    assert snapshot(trained) == before
    ok(cli("train", "multiply/tiny", *TINY, "train.steps=3", "--name", "base", "--overwrite",
           "--runs-dir", runs_dir, "-q"))
    assert json.loads((trained / "run.json").read_text())["total_steps"] == 3


def test_corrupt_and_truncated_checkpoints(cli, runs_dir, trained):
    state = trained / "checkpoints" / "step_00000012" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = snapshot(trained)
    refused(cli("resume", "base", "train.steps=20", "--runs-dir", runs_dir), "truncated or corrupt")
    refused(cli("eval", "base", "--runs-dir", runs_dir), "truncated or corrupt")
    assert snapshot(trained) == before
    # A damaged file with no checksum to compare is still refused by the loader.
    meta = trained / "checkpoints" / "step_00000012" / "meta.json"
    meta.write_text(json.dumps({"step": 12}))
    refused(cli("eval", "base", "--runs-dir", runs_dir), "cannot be read")


def test_unreadable_run_record(cli, runs_dir, trained):
    (trained / "run.json").write_text("{not json")
    refused(cli("runs", "show", "base", "--runs-dir", runs_dir), "not valid JSON")
    refused(cli("resume", "base", "--runs-dir", runs_dir), "not valid JSON")


def test_unknown_checkpoint_and_split(cli, runs_dir, trained):
    refused(cli("eval", "base", "--checkpoint", "999", "--runs-dir", runs_dir), "no checkpoint at step 999")
    refused(cli("eval", "base", "--split", "valid", "--runs-dir", runs_dir), "unknown split 'valid'")
    refused(cli("runs", "--sort", "nonsense", "--runs-dir", runs_dir), "cannot sort by 'nonsense'")


def test_unavailable_device(cli, runs_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    refused(cli("train", "multiply/tiny", "train.device=cuda", "--runs-dir", runs_dir), "no CUDA GPU")
    assert not runs_dir.exists()


# ----------------------------------------------------------------------------- real processes

def test_ctrl_c_checkpoints_and_resume_finishes(runs_dir):
    """A real `latentforge train` process gets SIGINT mid-run: it checkpoints, says so, exits 130."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "latentforge", "train", "multiply/tiny", *TINY, "train.steps=100000",
           "checkpoint.every=0", "train.eval_every=0", "--name", "sig", "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = runs_dir / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "checkpoint saved at step" in stdout + stderr
    info = json.loads((runs_dir / "sig" / "run.json").read_text())
    assert info["status"] == "interrupted"
    step = info["step"]
    assert (runs_dir / "sig" / "checkpoints" / f"step_{step:08d}").is_dir()
    done = subprocess.run([sys.executable, "-m", "latentforge", "resume", "sig", f"train.steps={step + 3}",
                           "--runs-dir", str(runs_dir), "-q"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads((runs_dir / "sig" / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == step + 3


def test_a_run_whose_process_died_is_listed_as_crashed(cli, runs_dir, trained):
    info = json.loads((trained / "run.json").read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info.update(status="running", pid=dead.pid)
    (trained / "run.json").write_text(json.dumps(info))
    rows = json.loads(ok(cli("runs", "--json", "--runs-dir", runs_dir)).output)
    assert rows[0]["status"] == "crashed"
    ok(cli("resume", "base", "train.steps=14", "--runs-dir", runs_dir, "-q"))
    assert json.loads((trained / "run.json").read_text())["status"] == "finished"


def test_bad_device_and_unusable_runs_dir(cli, runs_dir, trained, tmp_path):
    refused(cli("eval", "base", "--device", "tpu", "--runs-dir", runs_dir), "device must be auto, cpu, cuda or mps")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    refused(cli("train", "multiply/tiny", "--runs-dir", blocker), "cannot create run directory")
    assert blocker.read_text() == "not a directory"
    (runs_dir / "plain").write_text("x")
    refused(cli("train", "multiply/tiny", "--name", "plain", "--overwrite", "--runs-dir", runs_dir),
            "is not a latentforge run")
    assert (runs_dir / "plain").read_text() == "x"
