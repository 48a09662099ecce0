"""Find and read text sources: a file, a folder, a glob or a built-in corpus."""

from __future__ import annotations

import glob
from pathlib import Path

from charlm.data.builtin import builtin_files, is_builtin
from charlm.data.text import SNIFF_BYTES, DataError, TextSettings, iter_file_text, iter_sources_text, looks_binary


def read_text_file(path: Path) -> str:
    """The strict UTF-8 text of one file, or a DataError that says what is wrong with it."""
    return "".join(iter_file_text(path))


def _folder_text_files(folder: Path) -> list[Path]:
    """Non-hidden regular files under `folder`, sorted by path, binary files left out."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        with path.open("rb") as handle:
            if not looks_binary(handle.read(SNIFF_BYTES)):
                files.append(path)
    return files


def resolve_sources(spec: str) -> list[Path]:
    """The files named by a data path: a file, a folder, a glob, or builtin:NAME."""
    if is_builtin(spec):
        return builtin_files(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _folder_text_files(path)
        if not files:
            raise DataError(f"directory {path} holds no text files")
        return files
    if path.exists():
        return [path]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match the pattern {spec!r}")
        return files
    raise DataError(f"data path not found: {spec}")


def read_text(spec: str, settings: TextSettings = TextSettings()) -> str:
    """All the text a data path names, transformed, files joined in order (a newline added between files)."""
    text = "".join(iter_sources_text(resolve_sources(spec), settings))
    if not text:
        raise DataError(f"{spec} is empty; give a file with text in it")
    if not text.strip():
        raise DataError(f"{spec} holds only whitespace; give a file with text in it")
    return text
