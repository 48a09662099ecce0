"""Read training text, split train/val, and cut the token stream into TBPTT batches."""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.corpora import builtin_files, is_builtin
from charlm.errors import UserError
from charlm.vocab import Vocab

_SNIFF_BYTES = 8192


class DataError(UserError):
    """A data path or text that cannot be used for training or evaluation."""


def _looks_binary(raw: bytes) -> bool:
    return b"\x00" in raw[:_SNIFF_BYTES]


def read_text_file(path: Path) -> str:
    """The strict UTF-8 text of one file, or a DataError that says what is wrong with it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected a file but found a directory: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    if _looks_binary(raw):
        raise DataError(f"{path} looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8: bad byte 0x{raw[err.start]:02x} at byte offset {err.start}; "
                        "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _folder_text_files(folder: Path) -> list[Path]:
    """Non-hidden regular files under `folder`, sorted by path, binary files left out."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        with path.open("rb") as handle:
            if not _looks_binary(handle.read(_SNIFF_BYTES)):
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


def read_text(spec: str) -> str:
    """All the text a data path names, files joined in order (a newline added between files)."""
    pieces = []
    for path in resolve_sources(spec):
        text = read_text_file(path)
        if pieces and not pieces[-1].endswith("\n"):
            pieces.append("\n")
        pieces.append(text)
    text = "".join(pieces)
    if not text:
        raise DataError(f"{spec} is empty; give a file with text in it")
    if not text.strip():
        raise DataError(f"{spec} holds only whitespace; give a file with text in it")
    return text


@dataclass(frozen=True)
class Corpus:
    """Encoded training and validation streams with the vocabulary built from the training text."""

    vocab: Vocab
    train_ids: torch.Tensor  # [N_train] compact ids
    val_ids: torch.Tensor  # [N_val] compact ids
    val_oov_chars: int  # val characters dropped because training never saw them
    fingerprint: str  # sha256 of the train and val text: a resumed run must see the same data


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """First (1 - val_fraction) for training, the contiguous tail for validation."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def load_corpus(path: str, val_path: str | None, val_fraction: float) -> Corpus:
    text = read_text(path)
    if val_path is not None:
        train_text, val_text = text, read_text(val_path)
    else:
        train_text, val_text = split_text(text, val_fraction)
    vocab = Vocab.from_text(train_text)
    val = vocab.encode(val_text)
    if val.ids.numel() < 2:
        raise DataError(f"the validation text has {val.ids.numel()} character(s) that occur in the training "
                        "text; it needs at least 2 (use more text, a larger data.val_fraction or data.val_path)")
    digest = hashlib.sha256()
    digest.update(train_text.encode("utf-8"))
    digest.update(b"\x00")
    digest.update(val_text.encode("utf-8"))
    return Corpus(vocab, vocab.encode(train_text).ids, val.ids, val.oov_chars, digest.hexdigest())


class TBPTTBatches:
    """Truncated-BPTT windows over one token stream.

    The N ids are cut into B parallel streams of L = (N - 1) // B inputs; targets are the
    inputs shifted by one. Each step takes the next window of T columns, so window k of a
    stream continues window k - 1 of the same stream and the carried state is true context:

                  window 0        window 1           last window (may be shorter)
        stream 0  ids[0:T]        ids[T:2T]     ...  ids[kT:L]
        stream 1  ids[L:L+T]      ids[L+T:L+2T] ...  ids[L+kT:2L]
        ...
        stream B-1

    One epoch = every window once = one pass over all but the last N - B*L ids.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len
        needed = batch_size * seq_len + 1
        if ids.numel() < needed:
            raise DataError(f"the training text has {ids.numel()} characters but one window needs "
                            f"train.batch_size x train.seq_len + 1 = {needed}; use more text or lower "
                            "train.batch_size / train.seq_len")
        length = (ids.numel() - 1) // batch_size
        self.inputs = ids[: batch_size * length].view(batch_size, length)  # [B, L]
        self.targets = ids[1: batch_size * length + 1].view(batch_size, length)  # [B, L]
        self.windows_per_epoch = -(-length // seq_len)

    @property
    def chars_per_epoch(self) -> int:
        return self.inputs.numel()

    def window(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of window k: two int64 tensors [B, T] (T shorter for the last)."""
        assert 0 <= k < self.windows_per_epoch, f"window {k} outside 0..{self.windows_per_epoch - 1}"
        cols = slice(k * self.seq_len, (k + 1) * self.seq_len)
        return self.inputs[:, cols].long(), self.targets[:, cols].long()
