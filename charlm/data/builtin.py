"""Built-in corpora that need no download and no file from the user.

`builtin:python-stdlib` is the source code of the running Python's standard library: its
`.py` files, without site-packages and without the test suites (about 12 MB on 3.11).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from charlm.errors import UserError

BUILTIN_PREFIX = "builtin:"
# Folders left out of the stdlib corpus: installed packages, test suites and caches.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def python_stdlib_files() -> list[Path]:
    """The stdlib's .py files in a stable (sorted, depth-first) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        found.extend(Path(folder) / f for f in sorted(files) if f.endswith(".py"))
    return found


BUILTIN_CORPORA = {"python-stdlib": python_stdlib_files}


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def builtin_files(spec: str) -> list[Path]:
    name = spec[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_CORPORA:
        raise UserError(
            f"unknown built-in corpus {spec!r}; available: " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)
        )
    files = BUILTIN_CORPORA[name]()
    if not files:
        raise UserError(f"built-in corpus {spec!r} found no files in this Python installation")
    return files
