"""`latentforge runs sync RUN --to wandb`: a run trained without W&B replayed into it, with the real
wandb client in offline mode, read back from its .wandb transaction log."""

import json
from pathlib import Path

import pytest
from conftest import interrupt_at, snapshot
from test_wandb import history, of_type, wandb_offline, wandb_records  # noqa: F401  (wandb_offline: a fixture)

import latentforge

TINY = ["train.steps=12", "train.log_every=2", "train.eval_every=6", "checkpoint.every=4"]


def sync_dirs(root: Path, wandb_id: str) -> list[Path]:
    return sorted((root / "wandb").glob(f"offline-run-*-{wandb_id}*"))


def test_sync_replays_config_history_and_artifacts(cli, runs_dir, wandb_offline):  # noqa: F811
    run = latentforge.train("modadd/tiny", *TINY, name="s", runs_dir=runs_dir)
    assert "wandb_id" not in run.info
    (run.dir.artifacts / "notes.txt").write_text("kept beside the run")
    result = cli("runs", "sync", "s", "--to", "wandb", "--project", "replay", "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    assert "synced s to W&B run" in result.output and "steps 2..12" in result.output
    sync = run.info["wandb_sync"]["replay (offline)"]
    assert sync["step"] == 12
    (sync_dir,) = sync_dirs(wandb_offline, sync["id"])
    assert f"wandb sync {sync_dir}" in result.output

    rows = history(sync_dir)
    by_step: dict[int, dict] = {}
    for record in run.metrics:
        by_step.setdefault(record["step"], {}).update(record)
    assert set(rows) == set(by_step)
    for step, record in by_step.items():
        for key, value in record.items():
            if key not in ("step", "time"):
                assert rows[step][key] == pytest.approx(value), (step, key)
    # The task's figure at its step, the run's curves at the last one.
    assert rows[12]["acc_curve/_type"] == "image-file" and rows[12]["curves/_type"] == "image-file"

    records = wandb_records(sync_dir)
    (meta,) = of_type(records, "run")
    assert meta.display_name == "s" and meta.project == "replay" and meta.run_id == sync["id"]
    config = {u.key: json.loads(u.value_json) for u in meta.config.update}
    assert config["task"]["name"] == "modadd" and config["train"]["steps"] == 12
    (artifact,) = of_type(records, "artifact")
    assert artifact.type == "run-artifacts" and {m.path for m in artifact.manifest.contents} == {"notes.txt"}


def test_syncing_again_sends_only_new_steps(cli, runs_dir, wandb_offline, monkeypatch):  # noqa: F811
    with monkeypatch.context() as m:
        # Step 8 has no evaluation (a stop just before one leaves that step to the resume).
        interrupt_at(m, 8)
        latentforge.train("modadd/tiny", *TINY, name="r", runs_dir=runs_dir)
    assert cli("runs", "sync", "r", "--to", "wandb", "--runs-dir", runs_dir).exit_code == 0
    before = snapshot(runs_dir)
    again = cli("runs", "sync", "r", "--to", "wandb", "--runs-dir", runs_dir)
    assert again.exit_code == 0 and "nothing new" in again.output and "up to 8" in again.output
    assert snapshot(runs_dir) == before  # not even run.json changed
    run = latentforge.resume("r", runs_dir=runs_dir)
    assert run.status == "finished"
    result = cli("runs", "sync", "r", "--to", "wandb", "--runs-dir", runs_dir)
    assert result.exit_code == 0 and "steps 10..12" in result.output
    sync = run.info["wandb_sync"]["latentforge (offline)"]
    first, second = sync_dirs(wandb_offline, sync["id"])
    assert set(history(first)) == {2, 4, 6, 8} and set(history(second)) == {10, 12}
    assert of_type(wandb_records(second), "run")[0].run_id == sync["id"]


def test_a_run_that_logged_to_wandb_keeps_its_wandb_run(cli, runs_dir, wandb_offline):  # noqa: F811
    run = latentforge.train("modadd/tiny", *TINY, "track.wandb=true", name="w", runs_dir=runs_dir)
    assert cli("runs", "sync", "w", "--to", "wandb", "--runs-dir", runs_dir).exit_code == 0
    assert run.info["wandb_sync"]["latentforge (offline)"]["id"] == run.info["wandb_id"]


def test_sync_bad_input_is_one_line(cli, runs_dir, wandb_offline, monkeypatch):  # noqa: F811
    latentforge.train("modadd/tiny", *TINY, "train.steps=2", name="b", runs_dir=runs_dir)
    before = snapshot(runs_dir)
    result = cli("runs", "sync", "b", "--to", "mlflow", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and result.output.strip() == "error: --to must be wandb (got 'mlflow')"
    result = cli("runs", "sync", "nope", "--to", "wandb", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and result.output.startswith("error: no run 'nope'")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    result = cli("runs", "sync", "b", "--to", "wandb", "--runs-dir", runs_dir)
    assert result.exit_code == 2 and "WANDB_MODE=disabled" in result.output
    assert snapshot(runs_dir) == before
