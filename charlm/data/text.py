"""From files to units: strict streamed UTF-8 reading, text normalisation, and the unit stream.

A unit is what the model predicts: a Unicode code point (data.unit: chars) or a UTF-8 byte
(data.unit: bytes). In documents mode (data.documents: lines) every non-empty line is one
document, marked BOS ... EOS, and the newlines themselves disappear. Units are int32: code
points or byte values, with BOS = -1 and EOS = -2 (the vocabulary maps them to ids).
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from charlm.errors import UserError

BOS, EOS = -1, -2
NEWLINE = 10
SNIFF_BYTES = 8192
CHUNK_BYTES = 4 << 20  # text is decoded and encoded 4 MB at a time: memory stays bounded


class DataError(UserError):
    """A data path or text that cannot be used for training or evaluation."""


@dataclass(frozen=True)
class TextSettings:
    unit: str = "chars"  # chars | bytes
    normalize: Literal["none", "NFC", "NFKC"] = "none"
    newlines: str = "keep"  # keep | lf
    documents: str = "none"  # none | lines
    on_decode_error: str = "error"  # error | skip

    @classmethod
    def from_config(cls, data) -> TextSettings:
        return cls(data.unit, data.normalize, data.newlines, data.documents, data.on_decode_error)


def transform(text: str, settings: TextSettings) -> str:
    """Newline convention first (so NFKC sees final text), then Unicode normalisation."""
    if settings.newlines == "lf" and "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if settings.normalize != "none":
        text = unicodedata.normalize(settings.normalize, text)
    return text


def code_points(text: str) -> torch.Tensor:
    """The code points of `text` as an int32 tensor [N], without a Python loop."""
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)


def units_of(text: str, settings: TextSettings) -> torch.Tensor:
    """The unit stream of an already transformed text: int32 [N'] (BOS/EOS in documents mode).

    In documents mode `text` must start at a line start; a trailing partial line is closed."""
    if settings.unit == "bytes":
        units = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int32)
    else:
        units = code_points(text)
    return mark_documents(units) if settings.documents == "lines" else units


def mark_documents(units: torch.Tensor) -> torch.Tensor:
    """BOS line EOS for every non-empty line; newlines removed, empty lines dropped."""
    if units.numel() == 0:
        return units
    newline = units == NEWLINE
    # Each newline becomes EOS, BOS; a BOS goes first and, if the text does not end in a
    # newline, an EOS last. Then empty documents (BOS directly followed by EOS) go.
    repeats = newline.to(torch.int64) + 1
    out = torch.repeat_interleave(units, repeats)  # [N + newlines]
    starts = torch.cumsum(repeats, 0) - repeats  # where each unit landed
    out[starts[newline]] = EOS
    out[starts[newline] + 1] = BOS
    out = torch.cat([torch.tensor([BOS], dtype=torch.int32), out])
    out = out[:-1] if bool(newline[-1]) else torch.cat([out, torch.tensor([EOS], dtype=torch.int32)])
    empty = (out[:-1] == BOS) & (out[1:] == EOS)
    drop = torch.zeros_like(out, dtype=torch.bool)
    drop[:-1] |= empty
    drop[1:] |= empty
    return out[~drop]


def looks_binary(raw: bytes) -> bool:
    return b"\x00" in raw[:SNIFF_BYTES]


def iter_file_text(
    path: Path, chunk_bytes: int = CHUNK_BYTES, on_bytes: Callable[[int], None] | None = None
) -> Iterator[str]:
    """Strict UTF-8 text of a file, in pieces that end at a line end (the last may not).

    Errors name the file; a decode error gives the byte offset in the file."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected a file but found a directory: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry, offset = "", 0
    with handle:
        while True:
            block = handle.read(chunk_bytes)
            if offset == 0 and looks_binary(block):
                raise DataError(f"{path} looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
            pending = len(decoder.getstate()[0])  # bytes of a character cut at the last block's end
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:  # err.object = the pending bytes + this block
                raise DataError(
                    f"{path} is not valid UTF-8: bad byte 0x{err.object[err.start]:02x} at byte offset "
                    f"{offset - pending + err.start}; convert it to UTF-8 (e.g. iconv -f latin1 -t "
                    "utf-8) or set data.on_decode_error: skip"
                ) from None
            offset += len(block)
            if on_bytes is not None:
                on_bytes(len(block))
            if not block:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut:
                yield text[:cut]
                carry = text[cut:]
            else:
                carry = text  # no line end yet: keep reading (a single huge line is held whole)


def check_utf8(path: Path) -> DataError | None:
    """The error reading `path` would raise, or None: a full streamed decode."""
    try:
        for _ in iter_file_text(path):
            pass
    except DataError as err:
        return err
    return None


def iter_sources_text(
    files: list[Path],
    settings: TextSettings,
    skip: frozenset = frozenset(),
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Transformed text of all files in order, a newline added after a file lacking one."""
    last = "\n"
    for path in files:
        if path in skip:
            continue
        if not last.endswith("\n"):
            yield "\n"
        for piece in iter_file_text(path, on_bytes=on_bytes):
            piece = transform(piece, settings)
            if piece:
                last = piece
                yield piece
