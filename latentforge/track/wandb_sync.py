"""Replay a run directory into Weights & Biases (`latentforge runs sync RUN --to wandb`): its config,
every metrics.jsonl record at its own step, the PNGs of artifacts/ as images (at the step in their
name, `<tag>-stepNNNNNNNN.png`, else at the last step) and the other files of artifacts/ as one W&B
artifact. For runs trained without track.wandb, or logged offline, or on a machine with no network.

Syncing again continues the same W&B run and sends only what is new, the way rsync or `wandb sync`
behave: the W&B run id and the last step sent are kept in run.json (`wandb_sync`, per destination),
the run is resumed with resume="allow", and steps already sent are skipped (W&B would refuse them
anyway). A run that logged to W&B while training keeps its W&B run (`wandb_id`): nothing is doubled.
Nothing new to send is said in one line and uploads nothing. An artifact whose files did not change
is stored once by W&B (same digest, no new version).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from latentforge.config import Config
from latentforge.errors import ConfigError, RunError
from latentforge.track.listing import effective_status
from latentforge.track.rundir import RunDir

STEP_IN_NAME = re.compile(r"^(?P<tag>.+)-step(?P<step>\d+)$")


def history_rows(run: RunDir) -> dict[int, dict[str, Any]]:
    """Step -> every metric logged at that step (several records of one step merged, as W&B does)."""
    rows: dict[int, dict[str, Any]] = {}
    for record in run.read_metrics():
        rows.setdefault(int(record["step"]), {}).update({k: v for k, v in record.items() if k not in ("step", "time")})
    return rows


def artifact_files(run: RunDir) -> tuple[list[tuple[int | None, str, Path]], list[Path]]:
    """(step or None, tag, path) of each PNG, and the other files of artifacts/."""
    images, others = [], []
    if run.artifacts.is_dir():
        for path in sorted(run.artifacts.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() == ".png":
                stem = str(path.relative_to(run.artifacts).with_suffix(""))
                match = STEP_IN_NAME.match(stem)
                images.append((int(match["step"]), match["tag"], path) if match else (None, stem, path))
            else:
                others.append(path)
    return images, others


def _mode() -> str:
    mode = os.environ.get("WANDB_MODE", "online")
    return "offline" if mode in ("offline", "dryrun") else mode


def sync_run(run: RunDir, cfg: Config, project: str | None = None, entity: str | None = None) -> dict[str, Any]:
    """Send what W&B does not have yet; returns what was done (id, url, steps sent, mode, ...)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("runs sync --to wandb needs the wandb package: pip install 'latentforge[wandb]'") from None
    info = run.info()
    if effective_status(info) == "running" and cfg.track.wandb:
        raise RunError(f"run {run.id} is still running and logs to W&B itself; sync it once it has stopped")
    mode = _mode()
    if mode == "disabled":
        raise ConfigError("WANDB_MODE=disabled: nothing would be sent (unset it, or set it to online or offline)")
    project = project or cfg.track.wandb_project
    entity = entity if entity is not None else cfg.track.wandb_entity
    destination = f"{entity}/{project}" if entity else project
    key = destination + (" (offline)" if mode == "offline" else "")
    syncs = info.get("wandb_sync") or {}
    previous = syncs.get(key) or {}
    rows = history_rows(run)
    last = max(rows, default=0)
    sent_before = int(previous.get("step", -1))
    result = {"id": previous.get("id"), "destination": destination, "mode": mode, "sent_steps": 0,
              "from_step": None, "to_step": None, "images": 0, "files": 0, "url": previous.get("url")}
    if previous and last <= sent_before:
        return {**result, "nothing_new": True, "step": sent_before}

    wandb_id = previous.get("id") or info.get("wandb_id") or os.urandom(6).hex()
    settings = {"project": project, "entity": entity or None, "name": run.id, "id": wandb_id, "resume": "allow",
                "config": cfg.to_dict(), "allow_val_change": True, "job_type": "sync",
                "dir": os.environ.get("WANDB_DIR") or str(run.path.resolve())}
    try:
        wb = wandb.init(**settings)
    except (wandb.errors.Error, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunError(f"W&B could not start ({first}); log in with `wandb login` or set WANDB_API_KEY, or sync "
                       f"offline with WANDB_MODE=offline") from None
    # Online, W&B itself knows the steps it holds (e.g. a run that logged while training).
    sent_through = max(sent_before, wb.step - 1)
    images, others = artifact_files(run)
    for step, tag, path in images:
        step = last if step is None else step
        if step > sent_through:
            rows.setdefault(step, {})[tag] = wandb.Image(str(path))
            result["images"] += 1
    new_steps = sorted(step for step in rows if step > sent_through)
    failed = True
    try:
        for step in new_steps:
            wb.log(rows[step], step=step)
        if others:
            artifact = wandb.Artifact(f"artifacts-{wandb_id}", type="run-artifacts", metadata={"run": run.id})
            for path in others:
                artifact.add_file(str(path), name=str(path.relative_to(run.artifacts)))
            wb.log_artifact(artifact)
        failed = False
    finally:
        url, sync_dir = wb.url, wb.settings.sync_dir
        wb.finish(exit_code=1 if failed else 0)
    syncs[key] = {"id": wandb_id, "step": max(sent_through, last), "url": url, "time": time.time()}
    run.update_info(wandb_sync=syncs)
    return {**result, "id": wandb_id, "url": url, "sent_steps": len(new_steps), "nothing_new": False,
            "from_step": new_steps[0] if new_steps else None, "to_step": new_steps[-1] if new_steps else None,
            "files": len(others), "sync_dir": sync_dir, "step": max(sent_through, last)}
