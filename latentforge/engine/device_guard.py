"""The stability guard judged on the device: no host-device sync per step.

StabilityGuard (engine/guard.py) reads each step's loss and gradient norm on the host, which drains
the GPU queue every step. Here the same judgement (non-finite loss or norm; a spike above
max(mean + spike_sigmas * std, spike_ratio * mean, spike_floor) of the last `window` good losses once
`min_history` exist; `max_bad_steps` spikes in a row are a new loss level) runs on device tensors and
yields a 0-d `bad` flag. Fused Adam/AdamW skip their update on the device when given it as
`optimizer.found_inf` (GradScaler's contract: parameters, moments and step counter untouched), and so
does BatchedMuon (engine/muon.py).

Each step's verdict goes into a small device buffer that the host reads every train.log_every steps:
only then does it log the bad steps, start the LR cool-down, save the emergency checkpoint and stop
after `max_bad_steps` non-finite steps in a row, so those lag the bad step by up to log_every steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from latentforge.config import GuardConfig
from latentforge.engine.compile import compiled
from latentforge.engine.muon import BatchedMuon

GOOD, NONFINITE_LOSS, NONFINITE_NORM, SPIKE = range(4)
# One row per judged step: verdict, loss, norm, limit, mean, std, bad streak after it (0 after a
# rebaseline), rebaselined. The step numbers stay on the host (writing one into a device tensor is a copy).
ROW = 8


def skips_on_device(optimizer: Any) -> bool:
    """Whether the optimizer reads `found_inf` and skips its update on the device: fused Adam/AdamW, and
    BatchedMuon. The groups' flag, not the defaults: a checkpoint's optimizer state brings its own."""
    if isinstance(optimizer, BatchedMuon):
        return True
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups)


def judges_on_device(optimizers: list[Any], scaler: Any, ema_decay: float, distributed: bool) -> bool:
    """Whether the guard can skip updates on the device: every optimizer skips on `found_inf`, no fp16 grad
    scaler (it owns `found_inf`), no EMA (AveragedModel reads its counter on the host every update anyway)
    and one process."""
    return all(skips_on_device(o) for o in optimizers) and scaler is None and ema_decay == 0 and not distributed


def judge_step(c: GuardConfig, history: torch.Tensor, slots: torch.Tensor, count: torch.Tensor, head: torch.Tensor,
               streak: torch.Tensor, spikes_only: torch.Tensor, records: torch.Tensor, cursor: torch.Tensor,
               loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """One step's judgement: updates the guard's device state in place (so a CUDA graph of the step
    replays it, and torch.compile makes it one kernel), writes the step's ROW at `cursor` and advances
    it; returns the 0-d `bad` flag."""
    loss, norm = loss.double(), norm.double()
    valid = slots < count
    n = count.double()
    mean = torch.where(valid, history, 0).sum() / n.clamp(min=1)
    std = (torch.where(valid, history - mean, 0).square().sum() / (n - 1).clamp(min=1)).sqrt()
    limit = torch.maximum(mean + c.spike_sigmas * std, c.spike_ratio * mean).clamp(min=c.spike_floor)
    spike = (count >= c.min_history) & (loss > limit)
    verdict = torch.where(~torch.isfinite(loss), NONFINITE_LOSS,
                          torch.where(~torch.isfinite(norm), NONFINITE_NORM, torch.where(spike, SPIKE, GOOD)))
    bad = verdict != GOOD
    good = ~bad
    # A good loss joins the history; a bad step extends the streak.
    new_history = torch.where(good & (slots == head), loss, history)
    new_head = torch.where(good, (head + 1) % c.window, head)
    new_count = torch.where(good, (count + 1).clamp(max=c.window), count)
    new_streak = torch.where(good, 0, streak + 1)
    new_spikes_only = good | (spikes_only & (verdict == SPIKE))
    # A spike that lasts max_bad_steps is a new loss level: forget the history.
    rebase = bad & new_spikes_only & (new_streak >= c.max_bad_steps)
    history.copy_(new_history)
    count.copy_(torch.where(rebase, 0, new_count))
    head.copy_(torch.where(rebase, 0, new_head))
    streak.copy_(torch.where(rebase, 0, new_streak))
    spikes_only.copy_(new_spikes_only | rebase)
    row = torch.stack([verdict.double(), loss, norm, limit, mean, std, streak.double(), rebase.double()])
    records.index_copy_(0, cursor, row[None])
    cursor.add_(1)
    return bad


@dataclass
class BadStep:
    step: int
    reason: str
    streak: int  # bad steps in a row, this one included (0 after a rebaseline)


class DeviceGuard:
    """StabilityGuard's state and judgement as device tensors; the host keeps the cool-down and the count."""

    def __init__(self, cfg: GuardConfig, device: torch.device, log_every: int, compile: bool = False):
        self.cfg, self.device = cfg, device
        # Eager, the judgement is ~30 tiny kernels whose launches cost a small model's step more than a sync.
        self._judge = functools.partial(compiled(judge_step) if compile else judge_step, cfg)
        f64 = dict(dtype=torch.float64, device=device)
        self.history = torch.zeros(cfg.window, **f64)  # a ring buffer of the good losses
        self.slots = torch.arange(cfg.window, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.head = torch.zeros((), dtype=torch.long, device=device)
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.spikes_only = torch.ones((), dtype=torch.bool, device=device)
        self.records = torch.zeros(log_every, ROW, **f64)
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)  # the next row of `records`
        self.pending_steps: list[int] = []  # the steps of the rows written since the last read
        # Host side, brought up to date by read().
        self.bad_total = 0
        self.cooldown_left = 0

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """Judge and record the step that ends at `step`; returns a 0-d bool: skip its update."""
        self.make_room()
        bad = self.judge_on_device(loss, grad_norm)
        self.note(step)
        return bad

    def judge_on_device(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The device half of judge(): only kernels, so a CUDA graph of the training step can hold it."""
        return self._judge(self.history, self.slots, self.count, self.head, self.streak, self.spikes_only,
                           self.records, self.cursor, loss.detach(), grad_norm.detach())

    def make_room(self) -> None:
        """Before judge_on_device: a row for the next verdict. The buffer holds log_every rows and is read
        every log_every steps, so it only grows when log_every changed at resume (and a graph that writes
        into the old buffer is then recorded anew)."""
        if len(self.pending_steps) == len(self.records):
            self.records = torch.cat([self.records, torch.zeros_like(self.records)])

    def note(self, step: int) -> None:
        """The host half of judge(), once per judged step: which step the newest row belongs to."""
        self.pending_steps.append(step)
        # The cool-down counts down on the host as if the step were good; read() restarts it after a bad one.
        self.cooldown_left = max(0, self.cooldown_left - 1)

    def read(self) -> list[BadStep]:
        """The bad steps since the last read (one host-device sync); brings the cool-down up to date."""
        steps, self.pending_steps = self.pending_steps, []
        rows = self.records[: len(steps)].tolist()
        self.cursor.zero_()
        bad_steps = []
        for i, (step, (verdict, loss, norm, limit, mean, std, streak, rebase)) in enumerate(zip(steps, rows)):
            if verdict == GOOD:
                continue
            self.bad_total += 1
            # Set at the bad step and counted down by the good steps after it, as StabilityGuard does.
            self.cooldown_left = max(0, self.cfg.cooldown - (len(rows) - 1 - i))
            if verdict == NONFINITE_LOSS:
                reason = f"non-finite loss {loss}"
            elif verdict == NONFINITE_NORM:
                reason = f"non-finite gradient norm {norm}"
            else:
                reason = f"loss spike {loss:.4g} > {limit:.4g} (running mean {mean:.4g}, std {std:.4g})"
            if rebase:
                reason += f"; {self.cfg.max_bad_steps} spikes in a row: taken as the new loss level"
            bad_steps.append(BadStep(step, reason, int(streak)))
        return bad_steps

    def rebaseline(self) -> None:
        """Forget the recent losses (a new curriculum stage): what comes next is judged against itself."""
        self.count.zero_()
        self.head.zero_()
        self.streak.zero_()
        self.spikes_only.fill_(True)

    @property
    def lr_scale(self) -> float:
        return self.cfg.lr_factor if self.cooldown_left > 0 else 1.0

    def state_dict(self) -> dict[str, Any]:
        """StabilityGuard's keys (a run may resume on the other path), plus the exact device state."""
        n, head = int(self.count), int(self.head)
        order = list(range(head - n, head)) if n < self.cfg.window else list(range(head, head + n))
        history = [float(self.history[i % self.cfg.window]) for i in order]
        return {"history": history, "bad_streak": int(self.streak), "spikes_only": bool(self.spikes_only),
                "cooldown_left": self.cooldown_left, "bad_total": self.bad_total,
                "device": {"history": self.history.cpu(), "count": n, "head": head,
                           "records": self.records[: len(self.pending_steps)].cpu(),
                           "record_steps": list(self.pending_steps)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak.fill_(int(state["bad_streak"]))
        self.spikes_only.fill_(bool(state.get("spikes_only", True)))
        self.cooldown_left, self.bad_total = state["cooldown_left"], state["bad_total"]
        exact = state.get("device")
        if exact is not None and len(exact["history"]) == self.cfg.window:
            self.history.copy_(exact["history"])
            self.count.fill_(exact["count"])
            self.head.fill_(exact["head"] % self.cfg.window)
        else:  # written by StabilityGuard, or with another window: the newest losses, oldest first
            kept = [float(x) for x in state["history"]][-self.cfg.window:]
            self.history.zero_()
            self.history[: len(kept)] = torch.tensor(kept, dtype=torch.float64)
            self.count.fill_(len(kept))
            self.head.fill_(len(kept) % self.cfg.window)
        records = exact["records"] if exact is not None else torch.zeros(0, ROW, dtype=torch.float64)
        self.pending_steps = list(exact["record_steps"]) if exact is not None else []
        rows = max(len(self.records), 2 * len(self.pending_steps))
        self.records = torch.zeros(rows, ROW, dtype=torch.float64, device=self.device)
        self.records[: len(self.pending_steps)] = records.to(self.device)
        self.cursor.fill_(len(self.pending_steps))
