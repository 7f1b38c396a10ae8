"""Remote copies of run directories on any fsspec URL (s3://, gs://, file://, memory:// ...).

With `checkpoint.remote=s3://bucket/prefix`, `<runs>/<id>/` is mirrored to `s3://bucket/prefix/<id>/`
by one background thread after every checkpoint save, and `latentforge resume s3://bucket/prefix/<id>`
fetches the run onto a machine that has never seen it. A remote checkpoint is complete iff its
meta.json exists: its other files are always uploaded first and meta.json last.

S3-compatible servers (MinIO, moto, R2 ...) are reached through the standard AWS_ENDPOINT_URL
variable, which botocore (under s3fs) reads like the credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from latentforge.engine.checkpoint import META_FILE, list_checkpoints, step_dir_name
from latentforge.errors import CheckpointError, ConfigError, RunError
from latentforge.track.rundir import RUN_ID, RunDir

# A local file's identity: it changed if any of these did.
Stamp = tuple[int, int, int]


def _reason(e: BaseException) -> str:
    """The first line of an error from fsspec or its drivers, for a one-line message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def connect(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and path of `url`; a missing driver or an unknown protocol is one ConfigError."""
    protocol = url.split("://", 1)[0]
    # The local filesystem does not create parent directories by itself; object stores have none.
    options = {"auto_mkdir": True} if protocol in ("file", "local") else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        if protocol in ("s3", "s3a"):
            raise ConfigError(f"{url} needs s3fs: pip install 'latentforge[s3]'") from None
        raise ConfigError(f"{url} needs a driver that is not installed: {_reason(e)}") from None
    except ValueError as e:
        raise ConfigError(f"{url}: unknown protocol {protocol!r} ({_reason(e)})") from None
    return fs, path.rstrip("/")


def _step_of(name: str) -> int | None:
    """`step_00000012` -> 12."""
    digits = name[len("step_"):]
    return int(digits) if name.startswith("step_") and digits.isdigit() else None


def remote_steps(fs: AbstractFileSystem, run_path: str) -> list[int]:
    """Steps of the complete checkpoints (those with a meta.json) of a remote run, oldest first."""
    fs.invalidate_cache(run_path)
    found = fs.glob(f"{run_path}/checkpoints/step_*/{META_FILE}")
    steps = (_step_of(path.split("/")[-2]) for path in found)
    return sorted(step for step in steps if step is not None)


class Remote:
    """The location named by checkpoint.remote, checked to be writable before any work starts."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = connect(self.url)
        probe = f"{self.root}/.latentforge-probe-{os.urandom(4).hex()}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as e:  # whatever the driver raises (no bucket, no permission, no network)
            raise ConfigError(f"checkpoint.remote={self.url} is not writable: {_reason(e)}") from None

    def run_path(self, run_id: str) -> str:
        return f"{self.root}/{run_id}"

    def claim(self, run_id: str, overwrite: bool) -> None:
        """A new run must not mix its files with an older remote run of the same id."""
        if not overwrite and self.fs.exists(f"{self.run_path(run_id)}/run.json"):
            raise RunError(f"{self.url}/{run_id} already holds a run; pass --overwrite to replace it, --name to "
                           f"choose another name, or another checkpoint.remote")


class RemoteMirror:
    """Uploads a run directory to a Remote from one background thread, so training never waits on
    the network except in `close`, which makes sure the final state is remote before the process ends.

    Checkpoints pruned locally are pruned remotely by the same rule (the newest `keep` plus the
    protected best), applied to the local and remote checkpoints together: after a resume from a
    URL, the remote's older checkpoints that were not downloaded age out as they would have locally.
    """

    def __init__(self, remote: Remote, run: RunDir, keep: int, fresh: bool, quiet: bool):
        self.remote, self.run, self.keep, self.quiet = remote, run, keep, quiet
        self.dest = remote.run_path(run.id)
        self.url = f"{remote.url}/{run.id}"
        # A new run replaces whatever an older run of its id left there (Remote.claim allowed it).
        self.fresh = fresh
        self.protected: set[int] = set()
        self.sent: dict[str, Stamp] = {}
        self.error: str | None = None  # the last pass's failure; None once a pass succeeds
        self.warned = False
        self.closing = False
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._work, name="latentforge-remote", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ main thread
    def sync(self, protected: set[int]) -> None:
        """Ask for an upload of the run directory as it is now; returns at once."""
        self.protected = set(protected)
        self.wake.set()
        if self.error and not self.warned:
            self.warned = True
            print(f"warning: cannot upload to {self.url} ({self.error}); training goes on, "
                  f"uploads are retried after each checkpoint", file=sys.stderr)

    def close(self) -> None:
        """Upload the final state and stop the thread."""
        start = time.perf_counter()
        self.closing = True
        self.wake.set()
        self.thread.join()
        waited = time.perf_counter() - start
        if self.error:
            print(f"warning: the final state of the run is not on {self.url} ({self.error}); "
                  f"it is complete in {self.run.path}", file=sys.stderr)
        elif waited > 1 and not self.quiet:
            print(f"waited {waited:.1f} s for the uploads to {self.url}", file=sys.stderr)

    # ------------------------------------------------------------------ upload thread
    def _work(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            closing = self.closing
            try:
                self._upload()
                self.error = None
            except Exception as e:  # a failed upload must never stop training; the next pass retries
                self.error = _reason(e)
            if closing:
                return

    def _local_files(self) -> dict[str, Stamp]:
        """Every file of the run directory, without temporaries (hidden directories, `.name.tmp`)."""
        files = {}
        for folder, dirs, names in os.walk(self.run.path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                path = Path(folder) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    files[path.relative_to(self.run.path).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return files

    def _put(self, rel: str, stamp: Stamp) -> bool:
        try:
            self.remote.fs.put_file(str(self.run.path / rel), f"{self.dest}/{rel}")
        except FileNotFoundError:
            return False  # removed locally meanwhile (a pruned checkpoint)
        self.sent[rel] = stamp
        return True

    def _unchanged(self, rel: str, stamp: Stamp) -> bool:
        try:
            st = (self.run.path / rel).stat()
        except FileNotFoundError:
            return False
        return (st.st_size, st.st_mtime_ns, st.st_ino) == stamp

    def _upload(self) -> None:
        fs = self.remote.fs
        if self.fresh:
            if fs.exists(self.dest):
                fs.rm(self.dest, recursive=True)
            self.fresh = False
        files = self._local_files()
        checkpoints: dict[str, list[str]] = {}
        for rel in files:
            parts = rel.split("/")
            if parts[0] == "checkpoints" and len(parts) > 2:
                checkpoints.setdefault("/".join(parts[:2]), []).append(rel)
        for folder in sorted(checkpoints):
            self._upload_checkpoint(folder, sorted(checkpoints[folder]), files)
        rest = [rel for rel in files if not rel.startswith("checkpoints/")]
        for rel in sorted(rest, key=lambda r: r == "run.json"):  # the run's record last
            if self.sent.get(rel) != files[rel]:
                self._put(rel, files[rel])
        self._prune()

    def _upload_checkpoint(self, folder: str, rels: list[str], files: dict[str, Stamp]) -> None:
        meta = f"{folder}/{META_FILE}"
        if meta not in files or all(self.sent.get(rel) == files[rel] for rel in rels):
            return
        fs, remote_meta = self.remote.fs, f"{self.dest}/{meta}"
        try:
            local_meta = (self.run.path / meta).read_bytes()
        except FileNotFoundError:
            return  # pruned meanwhile
        there = _read(fs, remote_meta)
        if there == local_meta:
            # Already remote (this run was resumed from there): meta.json holds the state's checksum.
            self.sent.update({rel: files[rel] for rel in rels})
            return
        if there is not None:
            fs.rm_file(remote_meta)  # being replaced: incomplete until its new meta.json is there
        for rel in rels:
            if rel != meta and not self._put(rel, files[rel]):
                return
        # Re-saved at the same step while uploading: the next pass sends the new one.
        if all(self._unchanged(rel, files[rel]) for rel in rels):
            self._put(meta, files[meta])

    def _prune(self) -> None:
        fs = self.remote.fs
        root = f"{self.dest}/checkpoints"
        fs.invalidate_cache(self.dest)
        folders: dict[int, set[str]] = {}  # step -> its files, relative to its folder
        for path in fs.find(root):
            name, _, rest = path[len(root) + 1:].partition("/")
            step = _step_of(name)
            if step is not None and rest:
                folders.setdefault(step, set()).add(rest)
        there = {step for step, names in folders.items() if META_FILE in names}
        here = set(list_checkpoints(self.run.checkpoints))
        candidates = sorted((there | here) - self.protected)
        kept = set(candidates[-self.keep:])
        for step, names in sorted(folders.items()):
            if step in here or step in self.protected or (step in kept and META_FILE in names):
                continue
            # Pruned, or the state.pt of a checkpoint pruned locally while it was being uploaded.
            folder = f"{root}/{step_dir_name(step)}"
            if META_FILE in names:
                fs.rm_file(f"{folder}/{META_FILE}")  # incomplete first, then gone
            fs.rm(folder, recursive=True)


# ---------------------------------------------------------------------- resume from a URL


def _pick_step(steps: list[int], which: str | int, best: int | None, url: str) -> int:
    """'latest', 'best' or a step number among a remote run's checkpoints."""
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {url}/checkpoints")
    if which == "latest":
        return steps[-1]
    if which == "best":
        if best is None or best not in steps:
            raise CheckpointError(f"no best checkpoint in {url}/checkpoints")
        return best
    try:
        step = int(which)
    except ValueError:
        raise CheckpointError(f"checkpoint must be latest, best or a step number (got {which!r})") from None
    if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {url} (have: {', '.join(map(str, steps))})")
    return step


def _read(fs: AbstractFileSystem, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def fetch_run(url: str, runs_dir: Path, checkpoint: str | int = "latest") -> Path:
    """Copy a remote run to `runs_dir/<id>`: every file, and of the checkpoints only the one to
    resume from. A local copy at the same point (same config, same latest checkpoint) is used as it
    is, so a requeued job can always say `resume URL`; any other local run of that id is refused."""
    url = url.rstrip("/")
    fs, path = connect(url)
    run_id = path.rsplit("/", 1)[-1]
    if not RUN_ID.match(run_id):
        raise RunError(f"{url} does not end in a run id")
    try:
        info_bytes = _read(fs, f"{path}/run.json")
        steps = remote_steps(fs, path) if info_bytes is not None else []
    except Exception as e:  # the driver's errors: no bucket, no permission, no network
        raise RunError(f"cannot read {url}: {_reason(e)}") from None
    if info_bytes is None:
        raise RunError(f"no run at {url} (no run.json there)")
    try:
        info: dict[str, Any] = json.loads(info_bytes)
    except json.JSONDecodeError:
        raise RunError(f"{url}/run.json is not valid JSON; the remote run's record is damaged") from None
    step = _pick_step(steps, checkpoint, (info.get("best") or {}).get("step"), url)

    local = Path(runs_dir) / run_id
    if local.exists():
        here = list_checkpoints(local / "checkpoints")
        latest = step_dir_name(steps[-1])
        same = (here and here[-1] == steps[-1] and _read(fs, f"{path}/config.yaml") == _file(local / "config.yaml")
                and _read(fs, f"{path}/checkpoints/{latest}/{META_FILE}")
                == _file(local / "checkpoints" / latest / META_FILE))
        if not same:
            raise RunError(f"{local} already exists and is not at the same point as {url}; resume it with "
                           f"`latentforge resume {local}`, or fetch into another --runs-dir")
        return local

    chosen = f"checkpoints/{step_dir_name(step)}/"
    rels = [f[len(path) + 1:] for f in fs.find(path)]
    rels = [r for r in rels if not r.startswith("checkpoints/") or r.startswith(chosen)]
    tmp = Path(runs_dir) / f".fetch-{run_id}-{os.getpid()}"
    try:
        for rel in sorted(rels, key=lambda r: (r == "run.json", r.endswith(META_FILE))):  # as uploaded
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{path}/{rel}", str(target))
        (tmp / "artifacts").mkdir(exist_ok=True)
        os.rename(tmp, local)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"cannot download {url} to {local}: {_reason(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return local


def _file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
