"""Atomic writes: content lands whole or not at all, temp files never stay, and every writer goes through them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_checkpoint import payload

import charlm
from charlm.atomic import atomic_open, atomic_path, write_bytes_atomic, write_text_atomic
from charlm.config import validate_config
from charlm.data.corpus import load_corpus
from charlm.store.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture
def old_file(tmp_path) -> Path:
    path = tmp_path / "out.txt"
    path.write_text("old", encoding="utf-8")
    return path


def test_content_lands(tmp_path, old_file):
    write_text_atomic(old_file, "new ✓")
    assert old_file.read_text(encoding="utf-8") == "new ✓"
    write_bytes_atomic(tmp_path / "fresh.bin", b"\x00\x01")
    assert (tmp_path / "fresh.bin").read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "named.bin") as tmp:  # for writers that want a file name
        tmp.write_bytes(b"by name")
    assert (tmp_path / "named.bin").read_bytes() == b"by name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.bin", "named.bin", "out.txt"]


@pytest.mark.parametrize("failure", [ValueError("the writer failed"), KeyboardInterrupt()])
def test_a_writer_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path, old_file, failure):
    with pytest.raises(type(failure)):
        with atomic_open(old_file, "w") as handle:
            handle.write("half of the new")
            raise failure
    assert old_file.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_failed_rename_leaves_the_old_file_and_no_temp_file(tmp_path, old_file, monkeypatch):
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(old_file, "new")
    assert old_file.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


class SyncLog:
    """Records, in order, which paths are fsynced and renamed."""

    def __init__(self, monkeypatch):
        self.events, self._paths = [], {}
        real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

        def opened(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            self._paths[fd] = Path(path)
            return fd

        def fsync(fd):
            self.events.append(("fsync", self._paths.get(fd, fd)))
            real_fsync(fd)

        def replace(src, dst):
            self.events.append(("replace", Path(dst)))
            real_replace(src, dst)

        monkeypatch.setattr(os, "open", opened)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


def test_the_file_then_its_folder_are_fsynced(tmp_path, old_file, monkeypatch):
    log = SyncLog(monkeypatch)
    write_text_atomic(old_file, "new")
    (kind, synced_file), renamed, synced_folder = log.events
    assert kind == "fsync" and synced_file.name.startswith(".out.txt.tmp-")  # the data is on disk before the rename
    assert renamed == ("replace", old_file) and synced_folder == ("fsync", tmp_path)  # and the rename after it


def test_the_corpus_cache_is_fsynced_before_and_after_it_is_published(tmp_path, text_file, monkeypatch):
    log = SyncLog(monkeypatch)
    corpus = load_corpus(validate_config(tiny_config(text_file)).data, cache=tmp_path / "cache")
    folder = tmp_path / "cache" / corpus.fingerprint
    synced = [path for kind, path in log.events if kind == "fsync"]
    assert [p.name for p in synced[:2]] == ["ids.bin", "meta.json"] and synced[2].name.startswith(".build-")
    assert log.events[3:] == [("replace", folder), ("fsync", tmp_path / "cache")]


def test_an_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    data, _ = payload()
    save_checkpoint(data, tmp_path / "last.pt")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({**data, "step": 4}, tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="the previous checkpoint is unchanged"):
        save_checkpoint(data, tmp_path / "no-such-folder" / "last.pt")


def test_only_the_helper_renames_files():
    """Every writer goes through charlm.atomic; a bare os.replace or rename elsewhere would skip its fsyncs."""
    package = Path(charlm.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "atomic.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if re.search(r"\bos\.(replace|rename)\b|\.rename\(", line)
    ]
    assert not offenders, "use charlm.atomic instead:\n" + "\n".join(offenders)
