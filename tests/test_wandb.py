"""W&B tracking with the real wandb client in offline mode; what it logged is read back from its
own transaction log (the .wandb file of each offline run)."""

import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wandb
from conftest import TINY, interrupt_at, losses, sampling_evaluation
from wandb.proto import wandb_internal_pb2

import latentforge

WANDB = ["track.wandb=true"]


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """Offline mode with every W&B directory (run files, config, artifact cache) under tmp."""
    for var, sub in (("WANDB_DIR", "wandb"), ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path / "wandb"
    wandb.teardown()  # wandb reads its environment once per process: the next test starts afresh


def wandb_records(sync_dir: Path, wait: float = 20.0) -> list[Any]:
    """The records of an offline run's .wandb file, once its writer has written the last one (the run's exit
    record: W&B's service process writes the file, and on a loaded machine it can trail `finish()`), or after
    `wait` seconds with what is there."""
    deadline = time.monotonic() + wait
    while True:
        records = read_records(sync_dir)
        if of_type(records, "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def read_records(sync_dir: Path) -> list[Any]:
    """An offline run's .wandb file as it is: a 7-byte header (":W&B", magic, version), then protobuf Records
    in LevelDB log framing (32 KiB blocks; chunks with a crc32, length, type header)."""
    (path,) = Path(sync_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records: list[Any], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(sync_dir: Path) -> dict[int, dict[str, Any]]:
    """Step -> every value W&B logged at that step."""
    rows = {}
    for h in of_type(wandb_records(sync_dir), "history"):
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
        rows[h.step.num] = row
    return rows


def offline_runs(root: Path, wandb_id: str) -> list[Path]:
    """The offline run directories of one W&B run, oldest first (a "-1" suffix when two start in one second)."""
    return sorted((root / "wandb").glob(f"offline-run-*-{wandb_id}*"))


def test_every_record_the_config_and_checkpoints_reach_wandb(runs_dir, wandb_offline):
    run = latentforge.train("multiply/tiny", *TINY, *WANDB, "track.wandb_checkpoints=true", name="w",
                            runs_dir=runs_dir)
    info = run.info
    assert run.status == "finished" and info["wandb_mode"] == "offline" and info["wandb_error"] is None
    (sync_dir,) = offline_runs(wandb_offline, info["wandb_id"])
    assert Path(info["wandb_dir"]) == sync_dir
    rows = history(sync_dir)
    records = run.metrics
    assert {r["step"] for r in records} == set(rows) == set(range(1, 13))
    for record in records:
        for key, value in record.items():
            if key not in ("step", "time"):
                assert rows[record["step"]][key] == pytest.approx(value), (record["step"], key)
    assert rows[12]["train/loss"] == pytest.approx(losses(run.path)[12])

    records = wandb_records(sync_dir)
    (meta,) = of_type(records, "run")
    assert meta.display_name == "w" and meta.run_id == info["wandb_id"] and meta.project == "latentforge"
    config = {u.key: json.loads(u.value_json) for u in meta.config.update}
    assert config["train"]["steps"] == 12 and config["task"]["name"] == "multiply"
    # Saved at 4, at 6 (the best eval), at 8 and at the end: each a version of the model artifact.
    artifacts = of_type(records, "artifact")
    assert [json.loads(a.metadata)["step"] for a in artifacts] == [4, 6, 8, 12]
    assert {a.name for a in artifacts} == {f"model-{info['wandb_id']}"} and {a.type for a in artifacts} == {"model"}
    assert "best" in artifacts[1].aliases and "step_12" in artifacts[3].aliases
    assert {m.path for m in artifacts[0].manifest.contents} == {"state.pt", "meta.json"}


def test_resume_continues_the_same_wandb_run(runs_dir, wandb_offline, monkeypatch):
    with monkeypatch.context() as m:  # the interrupt only; the W&B environment stays
        interrupt_at(m, 5)
        part = latentforge.train("multiply/tiny", *TINY, *WANDB, name="p", runs_dir=runs_dir)
    assert part.status == "interrupted"
    wandb_id = part.info["wandb_id"]
    resumed = latentforge.resume("p", runs_dir=runs_dir)
    assert resumed.status == "finished" and resumed.info["wandb_id"] == wandb_id
    first, second = offline_runs(wandb_offline, wandb_id)
    assert resumed.info["wandb_dir"] == str(second)
    assert set(history(first)) == set(range(1, 6)) and set(history(second)) == set(range(6, 13))
    assert of_type(wandb_records(second), "run")[0].run_id == wandb_id
    logged = {step: row["train/loss"] for d in (first, second) for step, row in history(d).items()}
    assert logged == pytest.approx(losses(resumed.path))


def test_an_evaluation_abandoned_and_redone_on_resume_reaches_wandb(runs_dir, wandb_offline, monkeypatch):
    """W&B keeps one step's first records only: the step whose evaluation a SIGTERM abandons sends nothing, and
    the resumed run sends its training window and its evaluation together."""
    with monkeypatch.context() as m:
        sampling_evaluation(m, 6)
        part = latentforge.train("multiply/tiny", *TINY, *WANDB, name="p", runs_dir=runs_dir)
    assert part.status == "interrupted" and part.info["step"] == 6
    resumed = latentforge.resume("p", runs_dir=runs_dir)
    assert resumed.status == "finished"
    first, second = offline_runs(wandb_offline, part.info["wandb_id"])
    assert set(history(first)) == set(range(1, 6)) and set(history(second)) == set(range(6, 13))
    at_six = {k: v for r in resumed.metrics if r["step"] == 6 for k, v in r.items() if k not in ("step", "time")}
    assert "train/loss" in at_six and "test/exact_match" in at_six
    row = history(second)[6]
    assert {k: row.get(k) for k in at_six} == pytest.approx(at_six)


def test_resume_from_an_earlier_checkpoint_sends_only_steps_wandb_lacks(runs_dir, wandb_offline, capsys):
    # W&B refuses steps at or below those it holds: after resuming from step 4 of a run that
    # reached 8, steps 5..8 stay as W&B first got them and 9..10 are sent.
    run = latentforge.train("multiply/tiny", *TINY, "train.steps=8", *WANDB, name="e", runs_dir=runs_dir)
    resumed = latentforge.resume("e", "train.steps=10", checkpoint=4, runs_dir=runs_dir)
    assert resumed.status == "finished"
    assert "W&B already holds steps up to 8" in capsys.readouterr().err
    first, second = offline_runs(wandb_offline, run.info["wandb_id"])
    assert set(history(first)) == set(range(1, 9)) and set(history(second)) == {9, 10}
    assert set(losses(resumed.path)) == set(range(1, 11))


def test_figures_are_logged_as_images(runs_dir, wandb_offline):
    run = latentforge.train("dvae/tiny", "train.steps=6", "train.eval_every=6", *WANDB, name="d", runs_dir=runs_dir)
    (sync_dir,) = offline_runs(wandb_offline, run.info["wandb_id"])
    row = history(sync_dir)[6]
    for tag in ("reconstructions", "code_usage"):
        assert row[f"{tag}/_type"] == "image-file" and row[f"{tag}/width"] > 0
        assert (sync_dir / "files" / row[f"{tag}/path"]).is_file()


def test_wandb_files_live_in_the_run_directory_without_wandb_dir(runs_dir, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    run = latentforge.train("multiply/tiny", *TINY, "train.steps=2", *WANDB, name="here", runs_dir=runs_dir)
    assert Path(run.info["wandb_dir"]).parent == (run.path / "wandb").resolve()
    assert set(history(Path(run.info["wandb_dir"]))) == {1, 2}


def test_online_without_credentials_falls_back_to_offline(runs_dir, tmp_path, monkeypatch, wandb_offline, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run = latentforge.train("multiply/tiny", *TINY, "train.steps=2", *WANDB, name="o", runs_dir=runs_dir)
    info = run.info
    assert run.status == "finished" and info["wandb_mode"] == "offline" and "API key" in info["wandb_error"]
    assert "logging offline" in capsys.readouterr().err
    (sync_dir,) = offline_runs(wandb_offline, info["wandb_id"])
    assert set(history(sync_dir)) == {1, 2}


def test_missing_wandb_is_one_line_and_creates_nothing(cli, runs_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does when it is not installed
    result = cli("train", "multiply/tiny", *TINY, *WANDB, "--runs-dir", runs_dir)
    assert result.exit_code == 2
    assert result.output.strip() == "error: track.wandb=true needs the wandb package: pip install 'latentforge[wandb]'"
    assert not runs_dir.exists()


def test_wandb_checkpoints_needs_wandb(cli, runs_dir):
    result = cli("train", "multiply/tiny", "track.wandb_checkpoints=true", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "track.wandb_checkpoints needs track.wandb=true" in result.output
    assert not runs_dir.exists()
