"""Stability guard: judge each step's loss before its update is applied.

A non-finite loss (or gradient norm) or a spike far above the recent losses skips the update and
lowers the LR for a cool-down. After `max_bad_steps` non-finite steps in a row training stops; a
spike that lasts that long is a new loss level (a curriculum stage, a harder batch mix), not an
accident, so the guard forgets the old losses and training goes on.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from latentforge.config import GuardConfig


class StabilityGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.bad_streak = 0
        self.spikes_only = True
        self.cooldown_left = 0
        self.bad_total = 0

    def judge(self, loss: float, grad_norm: float | None) -> str | None:
        """Why this step is bad, or None if its update should be applied."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"non-finite gradient norm {grad_norm}"
        if len(self.history) >= self.cfg.min_history:
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
            limit = max(mean + self.cfg.spike_sigmas * std, self.cfg.spike_ratio * mean, self.cfg.spike_floor)
            if loss > limit:
                return f"loss spike {loss:.4g} > {limit:.4g} (running mean {mean:.4g}, std {std:.4g})"
        return None

    def record(self, loss: float, reason: str | None) -> bool:
        """Count a judged step; returns True when a lasting spike made the guard start afresh."""
        if reason is None:
            self.bad_streak = 0
            self.spikes_only = True
            self.history.append(loss)
            self.cooldown_left = max(0, self.cooldown_left - 1)
            return False
        self.bad_streak += 1
        self.bad_total += 1
        self.spikes_only = self.spikes_only and reason.startswith("loss spike")
        self.cooldown_left = self.cfg.cooldown
        if self.spikes_only and self.bad_streak >= self.cfg.max_bad_steps:
            self.rebaseline()
            return True
        return False

    def rebaseline(self) -> None:
        """Forget the recent losses: what comes next is judged against itself."""
        self.history.clear()
        self.bad_streak = 0
        self.spikes_only = True

    @property
    def must_stop(self) -> bool:
        return self.bad_streak >= self.cfg.max_bad_steps

    @property
    def lr_scale(self) -> float:
        return self.cfg.lr_factor if self.cooldown_left > 0 else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "bad_streak": self.bad_streak, "spikes_only": self.spikes_only,
                "cooldown_left": self.cooldown_left, "bad_total": self.bad_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.window)
        self.bad_streak = state["bad_streak"]
        self.spikes_only = state.get("spikes_only", True)
        self.cooldown_left = state["cooldown_left"]
        self.bad_total = state["bad_total"]
