"""Tasks: one package per experiment family, each exposing `TASK`, a subclass of engine.task.Task.

A task may also live outside latentforge: `task.name=module.path:ClassName` imports it (the current
directory is searched too), so a researcher's own task needs no edit here.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from latentforge.errors import ConfigError


def task_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def get_task(name: str) -> type:
    if ":" in name:
        return _external_task(name)
    if name not in task_names():
        raise ConfigError(f"unknown task {name!r} (tasks: {', '.join(task_names())}, or module.path:ClassName)")
    return importlib.import_module(f"latentforge.tasks.{name}.task").TASK


def _external_task(name: str) -> type:
    from latentforge.engine.task import Task

    module_name, _, class_name = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"task {name!r}: cannot import {module_name}: {e}") from None
    task = getattr(module, class_name, None)
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise ConfigError(f"task {name!r}: {module_name} has no Task subclass named {class_name!r}")
    return task
