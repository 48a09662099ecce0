"""The vocabulary: which units the model knows, their ids, and the way back to text.

Ids 0..S-1 are the special symbols in use (<unk>; <bos> and <eos> in documents mode), then
the units: for data.unit chars the kept characters sorted by code point, for data.unit bytes
all 256 byte values. A fine-tuned model's vocabulary (`extended`) keeps its base's order and
appends the new characters, so its characters need not be sorted; mapping is a binary search
over the sorted code points either way. It travels in every checkpoint.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import torch

from charlm.data.text import BOS, EOS, NEWLINE, TextSettings, transform, units_of

UNK, BOS_TOKEN, EOS_TOKEN = "<unk>", "<bos>", "<eos>"
_MARKERS = {BOS: BOS_TOKEN, EOS: EOS_TOKEN}
MAX_CODE_POINT = 0x10FFFF


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every id: token streams stay compact."""
    if vocab_size <= 256:
        return torch.uint8
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max else torch.int32


@dataclass(frozen=True)
class Encoded:
    ids: torch.Tensor  # [N] compact integer ids
    oov_chars: int  # characters outside the vocabulary: dropped, or mapped to <unk> when it exists
    unk: bool  # True when those characters became <unk> instead of being dropped


class Vocab:
    """Maps units to ids 0..V-1 and back."""

    def __init__(self, chars: list[str], unit: str = "chars", specials: tuple[str, ...] = ()):
        assert unit in ("chars", "bytes"), f"unknown unit {unit!r}"
        assert all(s in (UNK, BOS_TOKEN, EOS_TOKEN) for s in specials), f"unknown special symbols {specials}"
        assert unit == "bytes" or len(set(chars)) == len(chars), "characters must be unique"
        assert all(len(c) == 1 for c in chars), "vocabulary entries are single characters"
        self.unit, self.specials = unit, tuple(specials)
        self.chars = [] if unit == "bytes" else list(chars)
        points = torch.tensor(
            [ord(c) for c in self.chars] if unit == "chars" else list(range(256)), dtype=torch.int32
        )  # [units], in id order
        self._points, order = points.sort()  # sorted, for the binary search
        # The unit index of each sorted code point; None when they already are in id order (the usual case).
        self._order = None if bool((order == torch.arange(len(order))).all()) else order
        self.offset = len(self.specials)

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(sorted(set(text)))

    @classmethod
    def from_counts(
        cls, counts: torch.Tensor, unit: str, min_freq: int = 1, max_vocab: int | None = None, documents: bool = False
    ) -> Vocab:
        """From unit counts [MAX_CODE_POINT + 1] of the training text: drop rare characters.

        <unk> is reserved whenever min_freq or max_vocab can exclude characters."""
        specials = ((UNK,) if min_freq > 1 or max_vocab is not None else ()) + (
            (BOS_TOKEN, EOS_TOKEN) if documents else ()
        )
        if unit == "bytes":
            return cls([], "bytes", specials)
        kept = torch.nonzero(counts >= max(min_freq, 1)).flatten()  # code points, ascending
        if documents:
            kept = kept[kept != NEWLINE]  # lines are split into documents: no newline is left
        if max_vocab is not None and len(kept) > max_vocab - len(specials):
            room = max(max_vocab - len(specials), 0)
            order = torch.argsort(counts[kept], descending=True, stable=True)[:room]  # ties: lower code point
            kept = kept[order].sort().values
        return cls([chr(int(p)) for p in kept], "chars", specials)

    def extended(self, other: Vocab) -> Vocab:
        """This vocabulary plus what `other` has and it lacks (for fine-tuning on a new text): its
        characters keep their order, the new ones follow, sorted by code point; a new special
        symbol (<unk>) joins the specials, which come first, so then every character's id moves up one."""
        assert self.unit == other.unit, f"cannot extend a {self.unit} vocabulary with a {other.unit} one"
        specials = self.specials + tuple(s for s in other.specials if s not in self.specials)
        known = set(self.chars)
        return Vocab(self.chars + sorted(c for c in other.chars if c not in known), self.unit, specials)

    def tokens(self) -> list:
        """What each id stands for, in id order: a special symbol's name, a character or a byte value."""
        return list(self.specials) + (list(range(256)) if self.unit == "bytes" else list(self.chars))

    def __len__(self) -> int:
        return self.offset + len(self._points)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def special_id(self, token: str) -> int | None:
        return self.specials.index(token) if token in self.specials else None

    @property
    def documents(self) -> bool:
        return BOS_TOKEN in self.specials

    # --- units <-> ids ------------------------------------------------------------------

    def map_units(self, units: torch.Tensor) -> Encoded:
        """Ids of a unit stream (int32, BOS/EOS markers < 0); unknown characters -> <unk> or dropped."""
        ids = torch.empty(units.shape, dtype=torch.int64)
        marker = units < 0
        for value, token in _MARKERS.items():
            if token in self.specials:
                ids[units == value] = self.specials.index(token)
        plain = units[~marker]
        if len(self._points) == 0:
            pos, known = torch.zeros_like(plain, dtype=torch.int64), torch.zeros_like(plain, dtype=torch.bool)
        else:
            pos = torch.searchsorted(self._points, plain).clamp_(max=len(self._points) - 1)
            known = self._points[pos] == plain
        plain_ids = (pos if self._order is None else self._order[pos]) + self.offset
        unk = self.special_id(UNK)
        oov = int((~known).sum())
        if unk is not None:
            plain_ids[~known] = unk
        ids[~marker] = plain_ids
        keep = torch.ones_like(marker) if unk is not None else (marker | _scatter(~marker, known))
        return Encoded(ids[keep].to(id_dtype(len(self))), oov, unk is not None)

    def encode(self, text: str, settings: TextSettings | None = None) -> Encoded:
        """Ids of a text, after the same transformation the training text had."""
        settings = settings or TextSettings(unit=self.unit, documents="lines" if self.documents else "none")
        return self.map_units(units_of(transform(text, settings), settings))

    def unknown_chars(self, text: str) -> list[str]:
        if self.unit == "bytes":
            return []
        return sorted(set(text) - set(self.chars) - {"\n"})

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        decoder = self.stream_decoder()
        return (
            "".join(decoder.feed(int(i)) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))
            + decoder.flush()
        )

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def to_dict(self) -> dict:
        return {"unit": self.unit, "specials": list(self.specials), "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        return cls(list(data["chars"]), data.get("unit", "chars"), tuple(data.get("specials", ())))


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A bool tensor shaped like mask: `values` at the True places of mask, False elsewhere."""
    out = torch.zeros_like(mask)
    out[mask] = values
    return out


class StreamDecoder:
    """Ids -> text one id at a time, for printing samples as they are drawn.

    Bytes wait until they complete a UTF-8 character; an invalid sequence becomes U+FFFD.
    <unk> prints as U+FFFD, <eos> as a newline, <bos> as nothing."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace") if vocab.unit == "bytes" else None

    def feed(self, index: int) -> str:
        vocab = self.vocab
        if index < vocab.offset:
            token = vocab.specials[index]
            flushed = self.flush()
            return flushed + {UNK: "\ufffd", EOS_TOKEN: "\n", BOS_TOKEN: ""}[token]
        unit = index - vocab.offset
        if self._bytes is not None:
            return self._bytes.decode(bytes([unit]))
        return vocab.chars[unit]

    def flush(self) -> str:
        return self._bytes.decode(b"", final=True) if self._bytes is not None else ""
