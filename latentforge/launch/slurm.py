"""Slurm through submitit: `launch --slurm` submits one run as a job, `sweep --slurm` a grid as one job array.

Run directories are created here, before anything is submitted (status queued, so `runs` and `sweep report`
see them, and bad input fails before a job exists); a job trains into its directory from the latest
checkpoint there, if there is one (api.fit_run). So a job that Slurm requeues, or that requeues itself,
resumes by itself. submitit's files (the sbatch script, the job's stdout/stderr, pickles) go to the run's
slurm/ folder, or the sweep's.

Time limits and preemption: the sbatch script asks Slurm for submitit's signal (SIGUSR2 unless
$SUBMITIT_PREEMPT_SIGNAL says otherwise; submitit avoids USR1, which NCCL may use) `signal_delay_s` seconds
before the time limit. The training loop catches it (SIGUSR1 too), finishes the step, saves a checkpoint
and returns; only then does the job hand the signal to submitit, whose handler calls TrainJob.checkpoint
(this same job again) and requeues it: no checkpoint is ever written from inside a signal handler.
SIGTERM, which is what scancel sends, checkpoints and ends the job without requeueing it, so a cancelled
job stays cancelled; when Slurm preempts a job it requeues it itself (the script says --requeue).

Code snapshot: a job can wait in the queue for hours while its author edits the code. Each submission copies
the latentforge package into the slurm folder (`code/<content hash>/latentforge`, shared by submissions of
the same code) and the sbatch script puts it first on PYTHONPATH, so a job, and every requeue of it, runs
the code it was submitted with (on Python 3.10, whose interpreter puts the working directory first
regardless, only when the job is not submitted from a latentforge checkout).
"""

from __future__ import annotations

import contextlib
import difflib
import getpass
import hashlib
import io
import math
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError
from submitit.helpers import Checkpointable, TorchDistributedEnvironment

import latentforge
from latentforge import api
from latentforge.config import load_config
from latentforge.engine.checkpoint import list_checkpoints
from latentforge.errors import ConfigError, RunError
from latentforge.launch.local import BUSY, RESUME, RETRAIN, TRAIN, Job, plan_sweep, prepare
from latentforge.launch.sweep import Sweep
from latentforge.track.rundir import SNAPSHOT_SHA, RunDir, git_sha, new_run_id

# What one writes after --slurm -> submitit's AutoExecutor parameter.
SLURM_KEYS = {
    "partition": "slurm_partition",
    "time": "timeout_min",
    "nodes": "nodes",
    "gpus": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem": "slurm_mem",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
    "exclude": "slurm_exclude",
    "nodelist": "slurm_nodelist",
    "comment": "slurm_comment",
    "signal_delay_s": "slurm_signal_delay_s",
}
COUNTS = {"nodes": 1, "gpus": 0, "cpus_per_task": 1, "signal_delay_s": 0}  # integer keys and their least value
SIGNAL_DELAY_S = 90  # how long before the time limit the job is told to checkpoint and requeue
# submitit stops requeueing after this many time limits (its default, 3, would end a long training early).
# A job requeues only after it saved a checkpoint, so every requeue is progress: this is a runaway guard.
MAX_REQUEUES = 1000
TIME = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")


def parse_time(text: str) -> int:
    """A Slurm time limit in whole minutes: `90`, `4:00:00` or `1-12:00:00`."""
    if text.isdigit():
        minutes = int(text)
    else:
        match = TIME.match(text)
        if not match:
            raise ConfigError(f"--slurm time={text} is not a time limit: give minutes (90), HH:MM:SS (4:00:00) "
                              "or D-HH:MM:SS (1-12:00:00)")
        days, hours, mins, secs = (int(g or 0) for g in match.groups())
        minutes = math.ceil((((days * 24 + hours) * 60 + mins) * 60 + secs) / 60)
    if minutes < 1:
        raise ConfigError(f"--slurm time={text}: the time limit must be at least one minute")
    return minutes


def split_slurm_settings(overrides: list[str], slurm: list[str]) -> tuple[list[str], list[str]]:
    """Slurm settings typed after --slurm without quotes (`--slurm partition=gpu gpus=8 time=4:00:00`)
    arrive among the config overrides: a config key always has a section (`train.steps`), so a
    bare Slurm key is moved back to the settings. Without --slurm, one is a mistake."""
    config, settings = [], list(slurm)
    for item in overrides:
        key = item.partition("=")[0]
        if key not in SLURM_KEYS:
            config.append(item)
        elif slurm:
            settings.append(item)
        else:
            raise ConfigError(f"{item} is a Slurm setting: write --slurm {item} ...")
    return config, settings


def slurm_parameters(items: list[str], name: str) -> dict[str, Any]:
    """`--slurm key=value` items (several may share one argument, space separated) -> AutoExecutor
    parameters; every problem is one ConfigError, found before anything is written."""
    given: dict[str, str] = {}
    for item in (part for arg in items for part in arg.split()):
        key, eq, value = item.partition("=")
        if key not in SLURM_KEYS:
            close = difflib.get_close_matches(key, SLURM_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown --slurm key {key!r}{hint} (valid: {', '.join(SLURM_KEYS)})")
        if not eq or not value:
            raise ConfigError(f"--slurm {item} must look like {key}=value")
        given[key] = value
    if "time" not in given:
        raise ConfigError("--slurm needs time=... (the job's time limit: minutes, HH:MM:SS or D-HH:MM:SS)")
    values: dict[str, Any] = dict(given, time=parse_time(given["time"]))
    for key, least in COUNTS.items():
        if key in given:
            if not given[key].isdigit() or int(given[key]) < least:
                raise ConfigError(f"--slurm {key} must be a whole number >= {least} (got {given[key]})")
            values[key] = int(given[key])
    delay = values.setdefault("signal_delay_s", SIGNAL_DELAY_S)
    if delay >= values["time"] * 60:
        raise ConfigError(f"--slurm signal_delay_s={delay} must be shorter than the time limit ({values['time']} min)")
    params = {SLURM_KEYS[key]: value for key, value in values.items()}
    # One task per GPU; TrainJob tells each its rank torchrun-style. --requeue: a job that Slurm preempts
    # or whose node fails is put back in the queue, and resumes from its checkpoint.
    params.update(tasks_per_node=max(values.get("gpus", 0), 1), name=name,
                  slurm_additional_parameters={"requeue": True})
    return params


def check_cluster(cluster: str) -> None:
    if cluster == "slurm":
        for tool in ("sbatch", "srun"):
            if shutil.which(tool) is None:
                raise RunError(f"{tool} is not on PATH: --slurm submits from a Slurm login node "
                               "(without --slurm, launch trains here)")


class TrainJob(Checkpointable):
    """What a Slurm job runs: train one run directory to its end (resuming from its latest checkpoint).
    Checkpointable: on requeue, submitit resubmits this same object, which then resumes."""

    def __init__(self, run: str):
        self.run = run

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as torchrun sets them (every GPU stays
            # visible, as under torchrun: each rank picks cuda:LOCAL_RANK).
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        trainer = api.fit_run(self.run, quiet=False)
        if trainer.stop_signal in ("SIGUSR1", "SIGUSR2"):
            # The checkpoint is saved; now let submitit's own handler call self.checkpoint() and requeue
            # (it exits; on ranks other than 0 it does nothing and the task ends here).
            signal.raise_signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"))
        return "interrupted" if trainer.stop_signal else "finished"


@dataclass
class Submitted:
    run: Path
    job_id: str
    script: Path  # the sbatch script (the local executor writes none)
    log: Path  # task 0's stdout (stderr beside it, .err)
    job: submitit.Job


def snapshot_code(folder: Path) -> Path:
    """The latentforge package as it is now, copied to `folder/code/<hash of its files>/` with the commit it
    comes from (kept if that copy exists already); returns the folder to put on the jobs' PYTHONPATH."""
    package = Path(latentforge.__file__).parent
    files = sorted(f for f in package.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    code = folder / "code" / digest.hexdigest()[:12]
    if (code / SNAPSHOT_SHA).is_file():
        return code
    code.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=code.parent, prefix=f".{code.name}-"))
    try:
        shutil.copytree(package, partial / "latentforge", ignore=shutil.ignore_patterns("__pycache__"))
        (partial / SNAPSHOT_SHA).write_text(f"{git_sha() or ''}\n")  # written last: the copy is whole
        try:
            partial.rename(code)
        except OSError:
            if not (code / SNAPSHOT_SHA).is_file():  # not another submission's finished copy: a real failure
                raise
    except OSError as e:
        raise RunError(f"cannot copy the code for the job into {code}: {e}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return code


def submit(runs: list[Path], folder: Path, params: dict[str, Any], cluster: str) -> list[Submitted]:
    """One job per run directory, all in one submission (a job array when there are several), running a
    snapshot of the code; each run.json records its job."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_REQUEUES,
                                     local_max_num_timeout=MAX_REQUEUES)
    code = snapshot_code(folder)
    # The snapshot before the working directory, which stays importable (tasks of your own) but no longer
    # comes first (PYTHONSAFEPATH, Python >= 3.11): a source checkout there would shadow the snapshot.
    path = f"{shlex.quote(str(code.resolve()))}:{shlex.quote(str(Path.cwd()))}"
    executor.update_parameters(**params, slurm_setup=["export PYTHONSAFEPATH=1",
                                                      f"export PYTHONPATH={path}${{PYTHONPATH:+:$PYTHONPATH}}"])
    try:
        # submitit prints sbatch's stderr when it fails; its last line becomes our one line instead.
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            jobs = [executor.submit(TrainJob(str(run.resolve()))) for run in runs]
    except (FailedJobError, FailedSubmissionError, OSError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise RunError(f"sbatch refused the job: {lines[-1] if lines else type(e).__name__}") from None
    submitted = []
    for run, job in zip(runs, jobs):
        done = Submitted(run, job.job_id, job.paths.submission_file, job.paths.stdout, job)
        # Milliseconds after sbatch returned: seconds before the job can start and write run.json itself.
        RunDir(run).update_info(slurm={"job_id": done.job_id, "script": str(done.script), "log": str(done.log),
                                       "code": str(code.resolve())})
        submitted.append(done)
    return submitted


def launch_slurm(config: str, overrides: list[str], slurm: list[str], name: str | None = None,
           runs_dir: str | Path | None = None, cluster: str = "slurm") -> Submitted:
    """Create the run directory (status queued) and submit one job that trains into it."""
    overrides, slurm = split_slurm_settings(overrides, slurm)
    cfg, label, items = api.resolve_config(config, overrides)
    run_id = name or new_run_id(label)
    params = slurm_parameters(slurm, run_id)
    check_cluster(cluster)
    run = api.create_run(cfg, config, items, run_id, runs_dir, status="queued")
    try:
        return submit([run.path], run.path / "slurm", params, cluster)[0]
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)  # nothing was submitted: leave nothing behind
        raise


# ----------------------------------------------------------------------------- sweeps

def queued_jobs() -> set[str]:
    """Ids of this user's jobs that Slurm still holds (pending or running), array tasks one by one."""
    cmd = ["squeue", "--noheader", "--array", "--format=%i", f"--user={getpass.getuser()}"]
    try:
        return set(subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout.split())
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        raise RunError(f"cannot ask Slurm which jobs are still queued (squeue: {detail.strip()})") from None


def forget_gone_jobs(jobs: list[Job], sweep_dir: Path) -> None:
    """A point queued or running under a Slurm job that Slurm no longer holds (cancelled, node lost, or
    never submitted) is planned again: resumed from its checkpoint, or trained anew."""
    suspects = []
    for job in jobs:
        if job.action == BUSY:
            info = RunDir(sweep_dir / job.point.run_id).info()
            job_id = (info.get("slurm") or {}).get("job_id")
            if job_id or info.get("status") == "queued":
                suspects.append((job, job_id))
    live = queued_jobs() if any(job_id for _, job_id in suspects) else set()
    for job, job_id in suspects:
        if job_id not in live:
            job.action = RESUME if list_checkpoints(sweep_dir / job.point.run_id / "checkpoints") else RETRAIN


def plan_slurm_sweep(sweep: Sweep, runs_dir: Path) -> tuple[Path, list[Job]]:
    """What submitting the sweep would do, read only (devices are the nodes' business, not checked here)."""
    sweep_dir, jobs = plan_sweep(sweep, runs_dir, check_devices=False)
    if sweep_dir.is_dir():
        forget_gone_jobs(jobs, sweep_dir)
    return sweep_dir, jobs


def submit_sweep(sweep: Sweep, runs_dir: Path, slurm: list[str], parallel: int | None = None,
                 cluster: str = "slurm") -> tuple[Path, list[Job], list[Submitted]]:
    """Submit every point that is neither finished nor still in Slurm's hands as one job array; each
    point's run directory is created (or marked queued) first, named as the local sweep names it."""
    params = slurm_parameters(slurm, sweep.name)
    if parallel is not None:
        params["slurm_array_parallelism"] = parallel
    check_cluster(cluster)
    sweep_dir, jobs = prepare(sweep, runs_dir, check_devices=False)
    forget_gone_jobs(jobs, sweep_dir)
    todo = [job for job in jobs if job.action in (TRAIN, RETRAIN, RESUME)]
    for job in todo:
        point = job.point
        if job.action == RESUME:
            RunDir(sweep_dir / point.run_id).update_info(status="queued")
        else:
            api.create_run(load_config(point.config, point.overrides), point.config, point.overrides,
                           point.run_id, sweep_dir, overwrite=job.action == RETRAIN, status="queued")
    runs = [sweep_dir / job.point.run_id for job in todo]
    return sweep_dir, jobs, submit(runs, sweep_dir / "slurm", params, cluster) if runs else []

