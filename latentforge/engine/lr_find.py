"""The learning-rate range test (Smith 2015, as in fastai and Lightning): train from the config's
initial weights while the LR grows exponentially from min to max, stop once the smoothed loss
diverges, and suggest the LR where the loss falls fastest.

It drives the Trainer's own step (model, optimizer, batches, task loss, autocast, clipping), so the
test measures exactly what training will do; the stability guard is off, since skipping the
steps where the loss blows up would hide the very thing the test looks for. Nothing is written to
a run directory and the model is thrown away.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from latentforge.config import Config, apply_overrides
from latentforge.engine.loop import Trainer
from latentforge.errors import ConfigError, RunError
from latentforge.track.files import write_csv
from latentforge.track.plots import save_figure
from latentforge.track.progress import TrainProgress

# Smoothing of the loss (an EMA, debiased) and the divergence that ends the test, as in fastai.
BETA = 0.98
DIVERGED = 4.0


def lr_at_step(k: int, steps: int, min_lr: float, max_lr: float) -> float:
    """LR_k = min * (max / min) ** (k / (steps - 1)): min at the first step, max at the last."""
    return min_lr * (max_lr / min_lr) ** (k / (steps - 1))


def centered(losses: list[float]) -> list[float]:
    """A moving average over a window of a tenth of the points, centred on each one.

    Why not the EMA the stop rule reads (fastai's and Lightning's suggestion curve): a causal EMA
    with beta 0.98 lags about 50 steps, half of a 100-step sweep, so it shifts the curve by several
    decades of LR towards larger ones, and its steepest descent lands next to the loss minimum, at
    the edge of divergence (on multiply/tiny: 0.17 where the raw loss falls fastest near 5e-3)."""
    half = len(losses) // 20
    return [float(np.mean(losses[max(0, i - half):i + half + 1])) for i in range(len(losses))]


def steepest(lrs: list[float], curve: list[float]) -> int:
    """Index of the steepest descent of `curve` against log LR, before its minimum (past the
    minimum, the blow-up's noise has steep drops too)."""
    low = int(np.argmin(curve))
    if low == 0:
        return 0
    slope = np.gradient(np.asarray(curve[:low + 1]), np.log(np.asarray(lrs[:low + 1])))
    return int(np.argmin(slope))


def check_range(steps: int, min_lr: float, max_lr: float) -> None:
    if steps < 2:
        raise ConfigError(f"--steps must be >= 2 (got {steps})")
    if not (0 < min_lr < max_lr) or not math.isfinite(max_lr):
        raise ConfigError(f"--min-lr and --max-lr must satisfy 0 < min-lr < max-lr (got {min_lr:g} and {max_lr:g})")


def lr_find(cfg: Config, steps: int, min_lr: float, max_lr: float, out: Path, quiet: bool = True) -> dict[str, Any]:
    """Sweep the LR over `steps` steps; writes lr_find.csv (lr, loss, smoothed: the debiased EMA
    the stop rule reads, centered: the curve the suggestion reads) and lr_find.png into `out`, and
    returns the suggestion (steepest descent), the LR of the lowest loss and where they are."""
    check_range(steps, min_lr, max_lr)
    csv_path, png_path = out / "lr_find.csv", out / "lr_find.png"
    for path in (csv_path, png_path):
        if path.exists():
            raise RunError(f"{path} exists; choose another --out")
    # A constant schedule without warm-up makes the optimizer's LR exactly cfg.optim.lr, set below.
    cfg = apply_overrides(cfg, ["train.guard.enabled=false", "optim.schedule=constant", "optim.warmup=0",
                                "optim.min_lr=0"])
    trainer = Trainer(cfg, quiet=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out}: {e.strerror}") from None

    rows: list[dict[str, float]] = []
    average, best, stopped = 0.0, math.inf, None
    progress = TrainProgress(steps, 0, enabled=not quiet, description="lr-find")
    try:
        for k in range(steps):
            lr = lr_at_step(k, steps, min_lr, max_lr)
            trainer.cfg.optim.lr = lr
            trainer.train_step()
            # With the guard off every step is accumulated: the window holds this step's loss alone.
            loss = float(trainer.window["sums"]["train/loss"])
            trainer.window = trainer._empty_window()
            if not math.isfinite(loss):
                stopped = f"loss {loss} at lr {lr:.3g} (step {k + 1})"
                break
            average = BETA * average + (1 - BETA) * loss
            smooth = average / (1 - BETA ** (k + 1))
            rows.append({"lr": lr, "loss": loss, "smoothed": smooth})
            progress.update(k + 1, f"lr {lr:.2e}  loss {loss:.4f}")
            best = min(best, smooth)
            if smooth > DIVERGED * best:
                stopped = f"smoothed loss {smooth:.4g} > {DIVERGED:g} x best {best:.4g} at lr {lr:.3g} (step {k + 1})"
                break
    finally:
        progress.close()
    if not rows:
        raise RunError(f"the loss was not finite at the first step (lr {min_lr:g}); nothing to suggest")

    lrs = [r["lr"] for r in rows]
    curve = centered([r["loss"] for r in rows])
    for row, value in zip(rows, curve):
        row["centered"] = value
    low = int(np.argmin(curve))
    result = {"suggestion": lrs[steepest(lrs, curve)], "min_loss_lr": lrs[low], "min_loss": curve[low],
              "steps": len(rows), "stopped": stopped, "csv": str(csv_path), "png": str(png_path)}
    write_csv(rows, csv_path)
    plot(rows, result, png_path)
    return result


def plot(rows: list[dict[str, float]], result: dict[str, Any], path: Path) -> None:
    """Loss against LR (log x): the raw losses faint, the smoothed ones bold, the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, curve = [r["lr"] for r in rows], [r["centered"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, [r["loss"] for r in rows], alpha=0.3, label="loss")
    ax.plot(lrs, curve, label="loss, centred moving average")
    suggestion = result["suggestion"]
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggestion {suggestion:.2e} (steepest descent)")
    ax.plot([result["min_loss_lr"]], [result["min_loss"]], "o", color="tab:green",
            label=f"lowest loss at {result['min_loss_lr']:.2e}")
    # As much room above the starting loss as the descent below it: a final blow-up stays off the scale.
    bottom, start = min(r["loss"] for r in rows), curve[0]
    top = min(max(curve), 2 * start - result["min_loss"]) if start > result["min_loss"] else max(curve)
    pad = 0.05 * (top - bottom) or 0.05 * abs(top) or 1e-3
    ax.set_ylim(bottom - pad, top + pad)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
