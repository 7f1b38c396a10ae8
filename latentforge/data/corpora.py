"""Named corpora: real text that every machine has offline, given as a data source by name instead of a
path, so a preset trains on it anywhere.

`python-stdlib`: the *.py source files of the running Python's standard library (its test suites, its
help-text data and any installed packages left out): about 730 files and 11 MB of UTF-8 Python for CPython
3.11. Another Python version gives a slightly different corpus.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from pathlib import Path

from latentforge.errors import DataError

# Folders of the standard library that are not its own code: test suites (some deliberately not UTF-8),
# pydoc_data (750 KB of English help text in one string),
# installed packages, bytecode caches.
STDLIB_SKIP = {"test", "tests", "idle_test", "pydoc_data", "site-packages", "dist-packages", "__pycache__"}


def python_stdlib() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not STDLIB_SKIP & set(p.relative_to(root).parts))
    if not files:
        raise DataError(f"data source python-stdlib: no *.py files under {root} (this Python ships without "
                        "its standard library's sources)")
    return files


CORPORA: dict[str, Callable[[], list[Path]]] = {"python-stdlib": python_stdlib}
