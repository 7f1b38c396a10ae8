"""checkpoint.remote against a real S3 API: moto's server on localhost, reached by s3fs through
AWS_ENDPOINT_URL exactly as a MinIO or R2 endpoint would be."""

import json
import logging
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO, TINY, interrupt_at, losses, snapshot
from test_cli import ok, refused

from latentforge.engine.checkpoint import list_checkpoints
from latentforge.engine.loop import Trainer
from latentforge.track.remote import fetch_run, remote_steps

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "lab"


@pytest.fixture(scope="module")
def s3():
    """A bucket on a fresh S3 server on a free localhost port, with fake credentials in the environment."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log in the CLI's output
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_training_mirrors_the_run_directory(cli, runs_dir, s3):
    ok(cli("train", "multiply/tiny", *TINY, "checkpoint.keep=1", f"checkpoint.remote=s3://{BUCKET}/mirror",
           "--name", "m", "--runs-dir", runs_dir, "--quiet"))
    local, remote = runs_dir / "m", f"{BUCKET}/mirror/m"
    s3.invalidate_cache()
    # The final state, not a snapshot taken during training.
    for name in ("config.yaml", "run.json", "metrics.jsonl", "artifacts/curves.png"):
        assert s3.cat_file(f"{remote}/{name}") == (local / name).read_bytes(), name
    assert json.loads(s3.cat_file(f"{remote}/run.json"))["status"] == "finished"
    assert s3.glob(f"{remote}/tb/events.out.tfevents.*")
    # Checkpoints 4 and 8 were saved, then pruned locally (keep=1 besides the best) and remotely.
    steps = remote_steps(s3, remote)
    assert steps == list_checkpoints(local / "checkpoints") and 12 in steps
    assert 4 not in steps and 8 not in steps
    assert not s3.glob(f"{remote}/checkpoints/step_00000004*")
    for step in steps:
        folder = f"checkpoints/step_{step:08d}"
        for name in ("state.pt", "meta.json"):
            assert s3.cat_file(f"{remote}/{folder}/{name}") == (local / folder / name).read_bytes()
    # No write probe is left behind.
    assert s3.ls(f"{BUCKET}/mirror") == [remote]


def test_resume_from_a_url_on_a_machine_that_never_saw_the_run(cli, tmp_path, s3, monkeypatch):
    """Interrupt, lose the local disk, resume from S3 into another runs dir: the losses of a straight run."""
    url = f"s3://{BUCKET}/exact/part"
    ok(cli("train", "multiply/tiny", *TINY, "--name", "straight", "--runs-dir", tmp_path / "ref", "--quiet"))
    interrupt_at(monkeypatch, 7)
    first = tmp_path / "first"
    result = cli("train", "multiply/tiny", *TINY, f"checkpoint.remote=s3://{BUCKET}/exact", "--name", "part",
                 "--runs-dir", first, "--quiet")
    assert result.exit_code == 130, result.output
    monkeypatch.undo()
    shutil.rmtree(first)

    # Only the checkpoint to resume from is downloaded.
    peek = fetch_run(url, tmp_path / "peek")
    assert list_checkpoints(peek / "checkpoints") == [7]
    assert sorted(p.name for p in peek.iterdir()) == ["artifacts", "checkpoints", "config.yaml", "logs",
                                                     "metrics.jsonl", "run.json", "tb"]

    second = tmp_path / "second"
    ok(cli("resume", url, "--runs-dir", second, "--quiet"))
    assert losses(second / "part") == losses(tmp_path / "ref" / "straight")
    assert sorted(losses(second / "part")) == list(range(1, 13))
    # It kept mirroring to the same remote.
    s3.invalidate_cache()
    info = json.loads(s3.cat_file(f"{BUCKET}/exact/part/run.json"))
    assert info["status"] == "finished" and info["step"] == 12
    steps = remote_steps(s3, f"{BUCKET}/exact/part")
    assert steps[-1] == 12
    # Step 4 was never downloaded, yet aged out remotely as keep=3 says (the newer 7, 8, 12 and the best).
    assert 4 not in steps and len(steps) <= 4

    # A local copy at the same point is reused (a requeued job may always say `resume URL`) ...
    ok(cli("resume", url, "--runs-dir", second, "--quiet"))
    # ... a different one is refused and left as it is.
    (tmp_path / "third" / "part").mkdir(parents=True)
    (tmp_path / "third" / "part" / "run.json").write_text("{}")
    before = snapshot(tmp_path / "third")
    refused(cli("resume", url, "--runs-dir", tmp_path / "third"), "is not at the same point as")
    assert snapshot(tmp_path / "third") == before


def test_bad_remotes_fail_before_anything_is_created(cli, runs_dir, s3):
    train = ["train", "multiply/tiny", *TINY, "--runs-dir", runs_dir]
    refused(cli(*train, "checkpoint.remote=s3://no-such-bucket/p"), "s3://no-such-bucket/p is not writable")
    refused(cli(*train, "checkpoint.remote=bucket/prefix"), "checkpoint.remote must be a URL")
    refused(cli(*train, "checkpoint.remote=nope://bucket/prefix"), "unknown protocol 'nope'")
    refused(cli("resume", f"s3://{BUCKET}/nothing/here", "--runs-dir", runs_dir), "no run at s3://lab/nothing/here")
    refused(cli("resume", "s3://no-such-bucket/p/run", "--runs-dir", runs_dir), "no run at")
    assert not runs_dir.exists()
    # A new run never mixes its files with an older remote run of the same id.
    remote = f"checkpoint.remote=s3://{BUCKET}/taken"
    ok(cli(*train, *TINY, "train.steps=4", remote, "--name", "t", "--quiet"))
    before = snapshot(runs_dir)
    refused(cli(*train, remote, "--name", "t", "--runs-dir", runs_dir / "elsewhere"), "s3://lab/taken/t already holds")
    assert snapshot(runs_dir) == before


def test_without_s3fs_the_error_says_what_to_install(tmp_path):
    # A fresh interpreter in which `import s3fs` fails, as where the extra is not installed.
    code = ("import sys; sys.modules['s3fs'] = None; from latentforge.cli import main; "
            f"sys.argv = ['latentforge', 'train', 'multiply/tiny', 'checkpoint.remote=s3://b/p', "
            f"'--runs-dir', {str(tmp_path / 'runs')!r}]; main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: s3://b/p needs s3fs: pip install 'latentforge[s3]'"
    assert not (tmp_path / "runs").exists()


def test_upload_failures_warn_and_training_goes_on(cli, runs_dir, s3, monkeypatch):
    s3.mkdir("doomed")
    original = Trainer.train_step

    def train_step(self):
        reason = original(self)
        if self.step == 5:  # the bucket disappears mid-run (retried while the step-4 upload still adds files)
            for _ in range(20):
                try:
                    s3.rm("doomed", recursive=True)
                    break
                except OSError:
                    continue
        return reason

    monkeypatch.setattr(Trainer, "train_step", train_step)
    result = ok(cli("train", "multiply/tiny", *TINY, "checkpoint.remote=s3://doomed/p", "--name", "d",
                    "--runs-dir", runs_dir, "--quiet"))
    s3.invalidate_cache()
    assert not s3.exists("doomed")
    assert result.output.count("warning: cannot upload") <= 1
    assert "warning: the final state of the run is not on s3://doomed/p/d" in result.output
    assert "Traceback" not in result.output
    assert json.loads((runs_dir / "d" / "run.json").read_text())["status"] == "finished"
    assert list_checkpoints(runs_dir / "d" / "checkpoints")[-1] == 12
