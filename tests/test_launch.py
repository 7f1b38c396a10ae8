"""`latentforge launch` and `sweep --slurm`: submission through submitit, preemption and requeue.

The requeue test runs a real job under submitit's LocalExecutor (a controller process and a task process)
and sends the task the signal Slurm would send before the time limit. Slurm itself cannot run here, so the
sbatch tests put a fake `sbatch` (and `srun`, `squeue`) on PATH that record what submitit hands them: a
fake cluster, the one stand-in in these tests.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, interrupt_at, losses, snapshot
from test_sweep import FAST, invoke, ok, refused, sweep_file

import latentforge
from latentforge import api
from latentforge.launch.slurm import launch_slurm, parse_time, snapshot_code

FAKE_SBATCH = """#!/bin/sh
# Records its arguments and the script, answers like sbatch.
n=$(cat "$FAKE_SLURM/next_id" 2>/dev/null || echo 4242)
echo $((n + 1)) > "$FAKE_SLURM/next_id"
echo "$@" >> "$FAKE_SLURM/sbatch_calls"
cp "$1" "$FAKE_SLURM/script_$n.sh"
echo "Submitted batch job $n"
"""
FAKE_SQUEUE = """#!/bin/sh
cat "$FAKE_SLURM/queue" 2>/dev/null
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch, srun and squeue on PATH; returns the folder where sbatch leaves its records."""
    bin_dir, records = tmp_path / "fake-bin", tmp_path / "fake-slurm"
    bin_dir.mkdir()
    records.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("srun", "#!/bin/sh\nexit 1\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(records))
    return records


def sbatch_calls(records: Path) -> list[str]:
    path = records / "sbatch_calls"
    return path.read_text().splitlines() if path.exists() else []


def info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


# ----------------------------------------------------------------------------- preemption and requeue

def test_preempt_signal_checkpoints_requeues_and_resumes(runs_dir, tmp_path, monkeypatch):
    """A real submitit job gets SIGUSR2 (Slurm's warning before the time limit) mid-run: the loop saves a
    checkpoint at the step's end, submitit requeues the job, and the new job resumes and finishes with the
    losses of an uninterrupted run."""
    steps = 100
    config = [*TINY, f"train.steps={steps}", "train.eval_every=0", "checkpoint.every=0"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's process, like the reference run below
    submitted = launch_slurm("multiply/tiny", config, ["time=10"], name="pre", runs_dir=runs_dir, cluster="local")
    run = runs_dir / "pre"
    assert submitted.run == run and info(run)["slurm"]["job_id"] == submitted.job_id
    deadline = time.time() + 120
    while time.time() < deadline:
        record = info(run)
        if record["status"] == "running" and record.get("step", 0) >= 5:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the job did not start training: {submitted.job.stderr()}")
    os.kill(record["pid"], signal.SIGUSR2)
    assert submitted.job.result() == "finished", submitted.job.stderr()

    final = info(run)
    assert final["status"] == "finished" and final["step"] == steps
    [resumed] = final["resumed"]
    assert 5 <= resumed["step"] < steps
    log = (submitted.job.stdout() or "") + (submitted.job.stderr() or "")
    assert "SIGUSR2: checkpoint saved" in log and "Requeued job" in log, log

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = api.train("multiply/tiny", *config, name="straight", runs_dir=tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)
    assert losses(run) == losses(reference.path)
    assert sorted(losses(run)) == list(range(1, steps + 1))


def test_sigusr1_outside_slurm_checkpoints_and_stops(runs_dir, monkeypatch):
    """No scheduler around: SIGUSR1 stops the loop like SIGTERM, with a checkpoint to resume from."""
    original = api.Trainer.train_step

    def train_step(self):
        reason = original(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return reason

    monkeypatch.setattr(api.Trainer, "train_step", train_step)
    run = api.train("multiply/tiny", *TINY, name="usr1", runs_dir=runs_dir)
    assert run.status == "interrupted" and run.info["step"] == 3 and 3 in run.checkpoints()
    monkeypatch.undo()
    assert api.resume(run.path).status == "finished"


def test_fit_run_trains_a_created_run_then_resumes_it(runs_dir, monkeypatch):
    """What a job runs: from step 0 in a fresh directory, from the latest checkpoint after a stop."""
    cfg, _, items = api.resolve_config("multiply/tiny", TINY)
    created = api.create_run(cfg, "multiply/tiny", items, "job", runs_dir, status="queued")
    interrupt_at(monkeypatch, 6)
    assert api.fit_run(created.path).stop_signal == "SIGTERM"
    monkeypatch.undo()
    trainer = api.fit_run("job", runs_dir)
    assert trainer.stop_signal is None and trainer.step == 12
    assert info(created.path)["status"] == "finished" and info(created.path)["resumed"][0]["step"] == 6


# ----------------------------------------------------------------------------- sbatch

def test_launch_slurm_writes_the_sbatch_script_into_the_run(cli, runs_dir, fake_slurm):
    result = ok(cli("launch", "multiply/tiny", *FAST, "--name", "big", "--runs-dir", runs_dir,
                    # Quoted, repeated, or typed bare after --slurm: all the same.
                    "--slurm", "partition=gpu gpus=4", "nodes=2", "--slurm", "time=1-02:00:30",
                    "--slurm", "account=lab", "--slurm", "constraint=h100|a100"))
    run = runs_dir / "big"
    assert "submitted run big as Slurm job 4242" in result.output
    assert [call.endswith(".sh") for call in sbatch_calls(fake_slurm)] == [True]
    script = (run / "slurm" / "4242_submission.sh").read_text()
    assert script == (fake_slurm / "script_4242.sh").read_text()
    for line in ("--partition=gpu", "--gpus-per-node=4", "--nodes=2", "--ntasks-per-node=4", "--time=1561",
                 "--signal=USR2@90", "--account=lab", "--constraint='h100|a100'", "--requeue", "--job-name=big"):
        assert f"#SBATCH {line}\n" in script, script
    assert "srun" in script and "submitit.core._submit" in script
    record = info(run)
    assert record["status"] == "queued" and record["slurm"]["job_id"] == "4242"
    assert record["slurm"]["log"] == str((run / "slurm" / "4242_0_log.out").absolute())
    assert (run / "config.yaml").is_file() and list((run / "slurm").glob("4242_submitted.pkl"))
    # The job imports a snapshot of the code, not the live source tree that may change while it waits.
    code = Path(record["slurm"]["code"])
    assert code.parent == (run / "slurm" / "code").resolve() and f"export PYTHONPATH={code}:" in script
    source = Path(latentforge.__file__).parent
    assert (code / "latentforge" / "engine" / "loop.py").read_text() == (source / "engine" / "loop.py").read_text()
    # The script's environment lines, then Python started in this checkout, whose latentforge/ it would
    # otherwise import first.
    setup = "".join(line + "; " for line in script.splitlines() if line.startswith("export "))
    command = f"{setup}{sys.executable} -c 'import latentforge; print(latentforge.__file__)'"
    imported = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True, cwd=source.parent)
    assert Path(imported.stdout.strip()).is_relative_to(code)
    assert "big" in ok(cli("runs", "--runs-dir", runs_dir)).output and "queued" in ok(cli("runs", "--runs-dir",
                                                                                          runs_dir)).output


def test_launch_refuses_bad_input_before_writing_anything(cli, runs_dir, fake_slurm, monkeypatch):
    before = snapshot(runs_dir)
    base = ["launch", "multiply/tiny", "--runs-dir", runs_dir]
    refused(cli(*base, "--slurm", "partion=gpu time=10"), "unknown --slurm key 'partion'", "did you mean partition",
            "valid: partition, time, nodes, gpus")
    refused(cli(*base, "--slurm", "time=4h"), "time=4h is not a time limit")
    refused(cli(*base, "--slurm", "time=1:75:00"), "is not a time limit")
    refused(cli(*base, "--slurm", "partition=gpu"), "--slurm needs time=")
    refused(cli(*base, "--slurm", "gpus=two time=10"), "gpus must be a whole number")
    refused(cli(*base, "--slurm", "time=1 signal_delay_s=90"), "must be shorter than the time limit")
    refused(cli(*base, "model.nope=1", "--slurm", "time=10"), "nope")
    refused(cli(*base, "gpus=8"), "gpus=8 is a Slurm setting: write --slurm gpus=8")
    refused(cli(*base, "--local", "--slurm", "time=10"), "give one of them")
    monkeypatch.setenv("PATH", "/nonexistent")
    refused(cli(*base, "--slurm", "time=10"), "sbatch is not on PATH")
    assert snapshot(runs_dir) == before == {} and sbatch_calls(fake_slurm) == []


def test_a_refused_submission_leaves_no_run(cli, runs_dir, fake_slurm):
    (Path(os.environ["PATH"].split(os.pathsep)[0]) / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    refused(cli("launch", "multiply/tiny", "--name", "x", "--runs-dir", runs_dir, "--slurm", "partition=nope time=5"),
            "sbatch refused the job: sbatch: error: invalid partition specified: nope")
    assert not (runs_dir / "x").exists()


def test_launch_local_trains_here(cli, runs_dir):
    ok(cli("launch", "multiply/tiny", *FAST, "--name", "here", "--runs-dir", runs_dir, "-q"))
    assert info(runs_dir / "here")["status"] == "finished" and "slurm" not in info(runs_dir / "here")


def test_time_formats():
    assert [parse_time(t) for t in ("90", "4:00:00", "0:00:30", "1-00:00:00")] == [90, 240, 1, 1440]


# ----------------------------------------------------------------------------- sweeps as job arrays

def test_sweep_slurm_submits_one_array_and_continues(tmp_path, runs_dir, fake_slurm):
    f = sweep_file(tmp_path / "seeds.yaml", "config: multiply/tiny\ngrid: {train.seed: [0, 1]}\n")
    slurm = ["--slurm", "partition=gpu gpus=1 time=30", "--slurm-parallel", "1", "--runs-dir", runs_dir]
    result = ok(invoke("sweep", f, *slurm))
    sweep_dir = runs_dir / "seeds"
    ids = ["000-seed=0", "001-seed=1"]
    assert "submitted 2 runs of sweep seeds as one Slurm job (4242)" in result.output
    assert len(sbatch_calls(fake_slurm)) == 1
    script = (sweep_dir / "slurm" / "4242_submission.sh").read_text()
    for line in ("--array=0-1%1", "--partition=gpu", "--gpus-per-node=1", "--ntasks-per-node=1", "--time=30"):
        assert f"#SBATCH {line}\n" in script, script
    for index, run_id in enumerate(ids):
        record = info(sweep_dir / run_id)
        assert record["status"] == "queued" and record["slurm"]["job_id"] == f"4242_{index}"
        assert record["overrides"][-1] == f"train.seed={index}"
    assert (sweep_dir / "points.json").is_file() and (sweep_dir / "sweep.yaml").is_file()

    # Still in Slurm's queue: nothing is submitted again.
    (fake_slurm / "queue").write_text("4242_0\n4242_1\n")
    assert "nothing to submit" in ok(invoke("sweep", f, *slurm)).output
    assert len(sbatch_calls(fake_slurm)) == 1
    # Nor does a local sweep train them meanwhile.
    assert "000-seed=0  (busy)" in ok(invoke("sweep", f, "--dry-run", "--runs-dir", runs_dir)).output

    # Point 0 trains to its end (what its job runs); point 1's job vanished: only point 1 is submitted again.
    api.fit_run(sweep_dir / ids[0])
    finished = snapshot(sweep_dir / ids[0])
    (fake_slurm / "queue").write_text("")
    result = ok(invoke("sweep", f, *slurm))
    assert "submitted 1 runs" in result.output and "1 need no work" in result.output
    assert len(sbatch_calls(fake_slurm)) == 2 and "--array" not in (fake_slurm / "script_4243.sh").read_text()
    assert info(sweep_dir / ids[1])["slurm"]["job_id"] == "4243"
    assert snapshot(sweep_dir / ids[0]) == finished

    # The report reads run directories only: the same as after a local sweep.
    report = ok(invoke("sweep", "report", sweep_dir))
    assert "finished" in report.output and "queued" in report.output
    assert (sweep_dir / "report.csv").is_file()


def test_sweep_slurm_bad_input(tmp_path, runs_dir, fake_slurm):
    f = sweep_file(tmp_path / "s.yaml", "config: multiply/tiny\ngrid: {train.seed: [0, 1]}\n")
    refused(invoke("sweep", f, "--slurm", "gpu=1 time=5", "--runs-dir", runs_dir), "unknown --slurm key 'gpu'")
    refused(invoke("sweep", f, "--slurm", "time=5", "--parallel", "2", "--runs-dir", runs_dir), "--slurm-parallel")
    refused(invoke("sweep", f, "--slurm-parallel", "2", "--runs-dir", runs_dir), "goes with --slurm")
    refused(invoke("sweep", f, "--local", "--slurm", "time=5", "--runs-dir", runs_dir), "give one of them")
    assert not runs_dir.exists() and sbatch_calls(fake_slurm) == []
    dry = ok(invoke("sweep", f, "--slurm", "time=5", "--dry-run", "--runs-dir", runs_dir))
    assert "000-seed=0  (train)" in dry.output and "nothing submitted" in dry.output and not runs_dir.exists()


def test_code_snapshots_are_shared_by_equal_code_and_made_whole(tmp_path):
    """Submissions at the same time share one whole copy, which names the commit it was taken from: a job
    that imports it records that commit, not the checkout's HEAD when the job starts."""
    from concurrent.futures import ThreadPoolExecutor

    from latentforge.track.rundir import git_sha

    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: snapshot_code(tmp_path), range(4)))
    first = copies[0]
    assert set(copies) == {first} and [p.name for p in (tmp_path / "code").iterdir()] == [first.name]
    assert not list(first.rglob("__pycache__")) and (first / "latentforge" / "cli.py").is_file()
    assert (first / "GIT_SHA").read_text().strip() == (git_sha() or "")
    (first / "GIT_SHA").write_text("abc123-dirty\n")
    recorded = subprocess.run([sys.executable, "-c", "from latentforge.track.rundir import git_sha; print(git_sha())"],
                              env={**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(first)}, cwd=tmp_path,
                              capture_output=True, text=True, check=True)
    assert recorded.stdout.strip() == "abc123-dirty"
