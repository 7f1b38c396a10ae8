"""Scalar schedules for any hyper-parameter (teacher forcing, temperature, loss weights).

A schedule is a pure function of the step, so it resumes exactly from the step alone; tasks
declare one as a config field of type ScalarSchedule and call `value(step)`. In a config, a plain
number for such a field is that constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from latentforge.config import require


@dataclass
class ScalarSchedule:
    """`start` until `start_step`, moving to `end` by `end_step`, `end` after.

    kinds: constant (always start), linear, cosine, exponential (geometric from start to end;
    both must be > 0), step (multiplies by `gamma` every `step_size` steps from start_step,
    never passing `end`).
    """

    kind: Literal["constant", "linear", "cosine", "exponential", "step"] = "constant"
    start: float = 1.0
    end: float = 1.0
    start_step: int = 0
    end_step: int = 0
    gamma: float = 0.5
    step_size: int = 1000

    @staticmethod
    def number(value: float) -> dict[str, object]:
        """What a plain number given for a schedule means (`task.weights.usage=0.1`): that constant."""
        return {"kind": "constant", "start": value, "end": value}

    def validate(self) -> None:
        require(self.start_step >= 0, "start_step", f"must be >= 0 (got {self.start_step})")
        if self.kind in ("linear", "cosine", "exponential"):
            require(self.end_step > self.start_step, "end_step",
                    f"must be > start_step={self.start_step} (got {self.end_step})")
        if self.kind == "exponential":
            require(self.start > 0 and self.end > 0, "start",
                    f"and end must be > 0 for an exponential schedule (got {self.start}, {self.end})")
        if self.kind == "step":
            require(self.step_size >= 1, "step_size", f"must be >= 1 (got {self.step_size})")
            require(self.gamma > 0, "gamma", f"must be > 0 (got {self.gamma})")

    def value(self, step: int) -> float:
        if self.kind == "constant" or step < self.start_step:
            return self.start
        if self.kind == "step":
            value = self.start * self.gamma ** ((step - self.start_step) // self.step_size)
            return max(value, self.end) if self.gamma < 1 else min(value, self.end)
        t = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * t))
        return self.start * (self.end / self.start) ** t
