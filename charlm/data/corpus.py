"""Encode a corpus once, streamed, into a memory-mapped token file; later runs start instantly.

Three passes, each over bounded chunks, never the whole text in one string:
  1. decode and transform the sources, writing the unit stream (int32) to a scratch file;
  2. count the training part's units and build the vocabulary (min_freq, max_vocab), unless one is given;
  3. map units to ids into ids.bin (uint8 / int16 / int32 by vocabulary size).
The result lives in CACHE/data/<key>/, keyed by the SHA-256 of the source files and the data
settings (and of the vocabulary, when one is given: a fine-tuned run's), and is opened with
mmap: training reads token windows straight from the page cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.atomic import fsync_file, replace
from charlm.cache import cache_root
from charlm.data.sources import resolve_sources
from charlm.data.text import DataError, TextSettings, check_utf8, iter_sources_text, units_of
from charlm.data.vocab import MAX_CODE_POINT, Vocab, id_dtype

FORMAT = 1
_UNITS_PER_CHUNK = 1 << 22
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Corpus:
    """Encoded training and validation streams, with the vocabulary of the training text."""

    vocab: Vocab
    train_ids: torch.Tensor  # [N_train] compact ids (memory-mapped)
    val_ids: torch.Tensor  # [N_val]
    val_oov_chars: int  # val characters the training text lacks: dropped, or <unk>
    fingerprint: str  # the cache key: a resumed run must see the same data
    notices: tuple[str, ...] = ()  # skipped files, rare characters mapped to <unk>, cache use


def load_corpus(
    data, progress: Progress | None = None, cache: Path | None = None, vocab: Vocab | None = None
) -> Corpus:
    """The encoded corpus a DataConfig describes, from the cache or built (and cached) now.

    `vocab`: encode with exactly this vocabulary (a fine-tuned run's: its base model's characters
    plus the new text's) instead of the one the training text gives."""
    assert vocab is None or vocab.unit == data.unit, f"a {vocab.unit} vocabulary for data.unit {data.unit}"
    settings = TextSettings.from_config(data)
    train_files = resolve_sources(data.path)
    val_files = resolve_sources(data.val_path) if data.val_path is not None else []
    notices: list[str] = []
    skip = _undecodable(train_files + val_files, notices) if settings.on_decode_error == "skip" else frozenset()
    key = _corpus_key(train_files, val_files, skip, data, vocab)
    folder = (cache or cache_root() / "data") / key
    if not (folder / "meta.json").exists():
        _build(folder, train_files, val_files, skip, data, settings, progress, vocab)
    else:
        notices.append(f"data: encoded corpus read from the cache ({folder})")
    return _open(folder, key, notices)


def _undecodable(files: list[Path], notices: list[str]) -> frozenset:
    bad = set()
    for path in files:
        error = check_utf8(path)
        if error is not None:
            bad.add(path)
            notices.append(f"warning: skipping {error} (data.on_decode_error: skip)")
    if len(bad) == len(files):
        raise DataError("no file could be read as UTF-8 text; nothing to train on")
    return frozenset(bad)


def _corpus_key(
    train_files: list[Path], val_files: list[Path], skip: frozenset, data, vocab: Vocab | None = None
) -> str:
    """SHA-256 of every source file's bytes (in order) and of the settings that shape the ids: an
    encoding with another given vocabulary, or with none, is never reused. (A corpus without one
    keeps the key it always had: caches and the runs that fingerprinted them stay valid.)"""
    described = {"format": FORMAT, "settings": _settings_of(data)}
    if vocab is not None:
        described["vocab"] = vocab.to_dict()
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for part, files in (("train", train_files), ("val", val_files)):
        digest.update(part.encode())
        for path in files:
            if path in skip:
                continue
            digest.update(b"\x00file\x00")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:32]


def _settings_of(data) -> dict:
    fields = ("unit", "normalize", "newlines", "documents", "min_freq", "max_vocab", "on_decode_error")
    settings = {name: getattr(data, name) for name in fields}
    settings["val"] = "file" if data.val_path is not None else data.val_fraction
    return settings


def _build(
    folder: Path, train_files, val_files, skip, data, settings: TextSettings, progress, vocab: Vocab | None = None
) -> None:
    """Encode into a private scratch folder, then rename it into place: readers never see half."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in train_files + val_files if p not in skip)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    try:
        units = scratch / "units.bin"
        n_train = _write_units(train_files, skip, settings, units, advance, data.path)
        if val_files:
            n_val = _write_units(val_files, skip, settings, units, advance, data.val_path, append=True)
        else:
            n_train, n_val = (
                int(n_train * (1.0 - data.val_fraction)),
                n_train - int(n_train * (1.0 - data.val_fraction)),
            )
        if vocab is None:
            vocab = Vocab.from_counts(
                _count_units(units, n_train),
                settings.unit,
                data.min_freq,
                data.max_vocab,
                settings.documents == "lines",
            )
        meta = _write_ids(scratch, vocab, n_train, n_val)
        units.unlink()
        (scratch / "meta.json").write_text(json.dumps(meta))
        for name in ("ids.bin", "meta.json"):  # on disk before the folder is published: never a torn cache entry
            fsync_file(scratch / name)
        try:
            replace(scratch, folder)  # fsyncs the scratch folder, renames it, fsyncs the cache folder
        except OSError:
            if not (folder / "meta.json").exists():  # anything but another process having finished first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_units(files, skip, settings: TextSettings, out: Path, advance, spec, append: bool = False) -> int:
    """Pass 1: the unit stream of `files` appended to `out`; returns its length."""
    count, visible = 0, False
    with open(out, "ab" if append else "wb") as handle:
        for piece in iter_sources_text([p for p in files if p not in skip], settings, on_bytes=advance):
            visible = visible or bool(piece.strip())
            units = units_of(piece, settings)
            handle.write(units.numpy().tobytes())
            count += units.numel()
    if count == 0:
        raise DataError(f"{spec} is empty; give a file with text in it")
    if not visible:
        raise DataError(f"{spec} holds only whitespace; give a file with text in it")
    return count


def _read_units(path: Path, start: int, stop: int):
    """int32 units [start, stop) of the scratch file, in chunks (plain reads: no mmap in RSS)."""
    with open(path, "rb") as handle:
        handle.seek(start * 4)
        for begin in range(start, stop, _UNITS_PER_CHUNK):
            count = min(_UNITS_PER_CHUNK, stop - begin)
            yield torch.frombuffer(bytearray(handle.read(count * 4)), dtype=torch.int32)


def _count_units(path: Path, n_train: int) -> torch.Tensor:
    """Pass 2: how often each code point (or byte) occurs in the training part."""
    counts = torch.zeros(MAX_CODE_POINT + 1, dtype=torch.int64)
    for units in _read_units(path, 0, n_train):
        counts += torch.bincount(units[units >= 0].long(), minlength=MAX_CODE_POINT + 1)
    return counts


def _write_ids(scratch: Path, vocab: Vocab, n_train: int, n_val: int) -> dict:
    """Pass 3: units -> ids in ids.bin; returns the metadata."""
    dtype = id_dtype(len(vocab))
    train_unk, val_oov, val_kept = 0, 0, 0
    with open(scratch / "ids.bin", "wb") as handle:
        for part_start, part_stop, is_train in ((0, n_train, True), (n_train, n_train + n_val, False)):
            for units in _read_units(scratch / "units.bin", part_start, part_stop):
                encoded = vocab.map_units(units)
                handle.write(encoded.ids.to(dtype).numpy().tobytes())
                if is_train:
                    train_unk += encoded.oov_chars
                else:
                    val_oov += encoded.oov_chars
                    val_kept += encoded.ids.numel()
    return {
        "format": FORMAT,
        "vocab": vocab.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "n_train": n_train,
        "n_val": val_kept,
        "train_unk": train_unk,
        "val_oov": val_oov,
    }


def _open(folder: Path, key: str, notices: list[str]) -> Corpus:
    meta = json.loads((folder / "meta.json").read_text())
    vocab = Vocab.from_dict(meta["vocab"])
    n_train, n_val = meta["n_train"], meta["n_val"]
    if n_val < 2:
        raise DataError(
            f"the validation text has {n_val} character(s) that occur in the training text; it needs "
            "at least 2 (use more text, a larger data.val_fraction or data.val_path)"
        )
    # Memory-mapped (shared: processes on one machine share the pages); nothing ever writes to it.
    ids = torch.from_file(
        str(folder / "ids.bin"), shared=True, size=n_train + n_val, dtype=getattr(torch, meta["dtype"])
    )
    if meta["train_unk"]:
        notices.append(
            f"data: {meta['train_unk']:,} training characters rarer than data.min_freq / beyond "
            "data.max_vocab are trained as <unk>"
        )
    return Corpus(vocab, ids[:n_train], ids[n_train:], meta["val_oov"], key, tuple(notices))
