"""Profiling a window of training steps (train.profile=N).

After one step to wait and one to warm up (the first steps this process trains, so a resumed run
is profiled too), N steps are traced with torch.profiler into `<run>/profile/stepsA-B.pt.trace.json`:
a Chrome trace that https://ui.perfetto.dev opens, and that TensorBoard's profiler plugin
(torch-tb-profiler) finds under `tensorboard --logdir <run>`. Each phase of a step is a named range
in the trace and is timed into `<run>/profile.jsonl`, one line per step:

    {"step": 7, "data": s, "forward_backward": s, "optimizer": s, "logging": s, "total": s}

Beside the trace, `stepsA-B.txt` is the table of operators and kernels by their own time on the
device (on the CPU by CPU time): the first place to look for where a step's time goes. With
train.profile_sources, `stepsA-B.sources.txt` is the same table with each operator split by the Python lines
that called it (a few frames each), to find which code launches an operator the first table counts (an op
that autograd runs has no Python frames). Recording the frames slows the host, so it is off by default.

`logging` is everything after the update: metrics, evaluation, checkpoints. The device is
synchronized at each phase boundary while profiling only, so the times are the device's and not
just the launches'; outside the window nothing is timed and nothing synchronizes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.autograd.profiler_util import EventList

from latentforge.track.files import write_atomic
from latentforge.track.rundir import RunDir

PHASES = ("data", "forward_backward", "optimizer", "logging")
WAIT, WARMUP = 1, 1
TABLE_ROWS = 40
SOURCE_FRAMES = 5
SOURCE_ROWS = 100  # each operator takes a row per calling site


def operator_table(averages: EventList, device: torch.device, rows: int = TABLE_ROWS,
                   python: frozenset[str] = frozenset(), **widths: int) -> str:
    """The profiler's table of operators and kernels by their own time on `device` (CPU time on a CPU), less the
    Python functions named in `python`."""
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    operators = EventList(a for a in averages if a.key not in python)
    return operators.table(sort_by=sort_by, row_limit=rows, **widths) + "\n"


class StepProfiler:
    def __init__(self, run: RunDir, steps: int, device: torch.device, first_step: int, sources: bool = False):
        self.dir = run.path / "profile"
        self.jsonl = run.path / "profile.jsonl"
        self.device = device
        self.steps = steps
        # Trainer steps are numbered after their update: the first profiled one ends at this step.
        self.first_active = first_step + WAIT + WARMUP + 1
        self.seen = 0
        self.records: list[dict[str, float]] = []
        self.trace: Path | None = None
        self.table: Path | None = None
        self.sources = sources
        self.range: torch.profiler.record_function | None = None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=steps, repeat=1),
            on_trace_ready=self._export,
            # The Python lines behind each operator, for the sources table (verbose: without it torch keeps the
            # frames out of key_averages).
            with_stack=sources,
            experimental_config=torch.profiler._ExperimentalConfig(verbose=sources),
        )
        self.profiler.start()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def _open(self, phase: str) -> None:
        self.range = torch.profiler.record_function(phase)
        self.range.__enter__()

    def _close(self) -> None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None

    def begin_step(self) -> None:
        self._sync()
        self.times: dict[str, float] = {}
        self.start = self.last = time.perf_counter()
        self._open(PHASES[0])

    def lap(self, phase: str) -> None:
        """`phase` ends here; the next one begins."""
        self._sync()
        now = time.perf_counter()
        self.times[phase] = now - self.last
        self.last = now
        self._close()
        following = PHASES.index(phase) + 1
        if following < len(PHASES):
            self._open(PHASES[following])

    def end_step(self, step: int) -> str | None:
        """Close the step that brought the trainer to `step`; once the window is traced, stop
        profiling and return where the results are."""
        self.lap("logging")
        if self.seen >= WAIT + WARMUP:
            record = {"step": step, **{k: round(v, 6) for k, v in self.times.items()},
                      "total": round(self.last - self.start, 6)}
            self.records.append(record)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.seen += 1
        self.profiler.step()
        return self.finish() if self.seen == WAIT + WARMUP + self.steps else None

    def finish(self) -> str:
        """Stop profiling (a window cut short by the end of training is still written)."""
        self._close()
        self.profiler.stop()
        if self.trace is None:
            return f"profile: training ended before the {WAIT + WARMUP} steps of warm-up; nothing traced"
        means = {p: sum(r[p] for r in self.records) / len(self.records) for p in (*PHASES, "total")}
        return (f"profile: trace in {self.trace} (open in https://ui.perfetto.dev, or tensorboard --logdir "
                f"{self.dir.parent}); the top operators in {self.table.name} beside it; "
                f"step timings in {self.jsonl}; mean s/step: "
                + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))

    def _export(self, profiler: torch.profiler.profile) -> None:
        last = self.records[-1]["step"] if self.records else self.first_active
        self.dir.mkdir(exist_ok=True)
        path = self.dir / f"steps{self.first_active}-{last}.pt.trace.json"
        tmp = path.with_name(f".{path.name}.tmp")
        profiler.export_chrome_trace(str(tmp))
        os.replace(tmp, path)
        table = path.with_name(path.name.replace(".pt.trace.json", ".txt"))
        # With sources, the Python tracer's own function events would crowd the operators out of the tables (an older
        # torch drops them itself and has no is_python_function).
        python = frozenset(e.key for e in profiler.events() if getattr(e, "is_python_function", False))
        write_atomic(table, operator_table(profiler.key_averages(), self.device, python=python,
                                           max_name_column_width=100))
        if self.sources:
            sources = operator_table(profiler.key_averages(group_by_stack_n=SOURCE_FRAMES), self.device,
                                     rows=SOURCE_ROWS, python=python, max_name_column_width=60,
                                     max_src_column_width=100)
            write_atomic(table.with_name(table.name.replace(".txt", ".sources.txt")), sources)
        self.trace, self.table = path, table
