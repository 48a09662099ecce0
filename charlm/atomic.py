"""Atomic file writes: a temp file beside the target, fsynced, renamed over it, the folder fsynced.

A crash at any moment leaves the old file or the new one, never half of one; a failed or
interrupted write removes its temp file (.NAME.tmp-*, which a kill -9 can still leave behind).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_numbers = itertools.count()


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` durable: a rename or a new file is only on disk once its folder is."""
    _fsync(folder)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file written and closed elsewhere (the corpus cache's files before their folder is renamed)."""
    _fsync(path)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """os.replace made durable: `src` (finished, a file or a folder) is fsynced, renamed, its new folder fsynced."""
    _fsync(src)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `target` for a writer that wants a file name; when the block ends, the
    file is fsynced and renamed over `target`. On any exception (KeyboardInterrupt included) the
    temp file is removed and `target` is untouched."""
    target = Path(target)
    # Same folder: the rename must not cross file systems. The pid and counter keep concurrent
    # writers apart; a leftover with our own pid is from a dead process and may be overwritten.
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{next(_numbers)}")
    try:
        yield tmp
        replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A handle on a temp file that replaces `target` when the block ends (see atomic_path)."""
    with atomic_path(target) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_open(target, "wb") as handle:
        handle.write(data)


def write_text_atomic(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(target, "w", encoding=encoding) as handle:
        handle.write(text)
