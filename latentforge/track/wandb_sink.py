"""Weights & Biases as one more sink of the metric records (metrics.jsonl stays the source of truth).

The W&B run is named after the run id; its own id is kept in run.json (`wandb_id`), so that
`latentforge resume` continues the same W&B run. W&B refuses a step below one it already holds: when
a run resumes from a checkpoint older than its last record (a crash after the checkpoint, or
`--checkpoint` of an earlier one), the steps W&B already has keep their first values there and only
later steps are sent; metrics.jsonl holds the resumed run's own records.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from latentforge.config import Config
from latentforge.errors import ConfigError, RunError
from latentforge.track.rundir import RunDir


def require_wandb(cfg: Config) -> None:
    """Fail before any run directory exists when W&B is asked for but not installed."""
    if not cfg.track.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("track.wandb=true needs the wandb package: pip install 'latentforge[wandb]'") from None


class WandbSink:
    def __init__(self, run: RunDir, cfg: Config, resume_step: int | None):
        import wandb

        self.wandb = wandb
        t = cfg.track
        info = run.info()
        # Chosen here and saved first, so that a resume (even after a failed start) reuses it.
        self.id = info.get("wandb_id") or os.urandom(6).hex()
        run.update_info(wandb_id=self.id)
        # The last step W&B has seen is the last one in metrics.jsonl before it is cut back to the checkpoint.
        self.sent_through = max((r["step"] for r in run.read_metrics()), default=-1) if resume_step is not None else -1
        settings = {"project": t.wandb_project, "entity": t.wandb_entity or None, "name": run.id, "id": self.id,
                    "resume": "allow", "config": cfg.to_dict(), "allow_val_change": True,
                    # Local W&B files live in the run directory unless WANDB_DIR says otherwise (read
                    # here: wandb reads its environment once per process).
                    "dir": os.environ.get("WANDB_DIR") or str(run.path.resolve())}
        error = None
        try:
            self.run = wandb.init(**settings)
        except (wandb.errors.Error, OSError) as e:
            # The run directory exists and training is worth more than its dashboard: log offline
            # under the same id and let the user upload later.
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            try:
                self.run = wandb.init(**settings, mode="offline")
            except (wandb.errors.Error, OSError) as e2:
                raise RunError(f"W&B could not start ({error}), not even offline: {e2}") from None
            print(f"warning: W&B could not start online ({error}); logging offline to {self.run.settings.sync_dir}: "
                  f"upload it later with `wandb sync {self.run.settings.sync_dir}`", file=sys.stderr)
        # Online, W&B knows the next step it accepts for a resumed run.
        self.sent_through = max(self.sent_through, self.run.step - 1)
        if resume_step is not None and self.sent_through > resume_step:
            print(f"note: W&B already holds steps up to {self.sent_through}; it keeps those and receives this "
                  f"run's records from step {self.sent_through + 1} on (metrics.jsonl has them all)", file=sys.stderr)
        mode = "disabled" if self.run.disabled else "offline" if self.run.offline else "online"
        run.update_info(wandb_url=self.run.url, wandb_mode=mode, wandb_error=error,
                        wandb_dir=None if self.run.disabled else self.run.settings.sync_dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if step > self.sent_through:
            self.run.log(metrics, step=step)

    def add_figure(self, tag: str, figure: Any, step: int) -> None:
        if step > self.sent_through:
            self.run.log({tag: self.wandb.Image(figure)}, step=step)

    def log_checkpoint(self, path: Path, step: int, best: bool) -> None:
        """The checkpoint directory as a new version of this run's model artifact (copied, so
        pruning the local checkpoint later does not touch the upload)."""
        artifact = self.wandb.Artifact(f"model-{self.id}", type="model", metadata={"step": step})
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact, aliases=[f"step_{step}"] + (["best"] if best else []))

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
