"""Tasks: one package per experiment family, each exposing `TASK`, a subclass of engine.task.Task."""

from __future__ import annotations

import importlib
import pkgutil

from latentforge.errors import ConfigError


def task_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def get_task(name: str) -> type:
    if name not in task_names():
        raise ConfigError(f"unknown task {name!r} (tasks: {', '.join(task_names())})")
    return importlib.import_module(f"latentforge.tasks.{name}.task").TASK
