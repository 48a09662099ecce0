"""The character vocabulary: build it from text, encode, decode, and carry it in checkpoints.

A unit is one Unicode code point. The vocabulary is the sorted set of code points of the
training text, so id order equals code-point order and encoding is a binary search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from charlm.errors import UserError


def code_points(text: str) -> torch.Tensor:
    """The code points of `text` as an int32 tensor [N], without a Python loop."""
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed integer dtype that holds every id (token streams stay compact)."""
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max else torch.int32


@dataclass(frozen=True)
class Encoded:
    ids: torch.Tensor  # [N] compact integer ids of the in-vocabulary characters
    oov_chars: int  # characters dropped because they are not in the vocabulary


class Vocab:
    """Maps characters to ids 0..V-1 and back."""

    def __init__(self, chars: list[str]):
        assert chars == sorted(set(chars)), "vocabulary must be sorted and unique"
        assert all(len(c) == 1 for c in chars), "vocabulary entries are single characters"
        self.chars = list(chars)
        self._points = torch.tensor([ord(c) for c in chars], dtype=torch.int32)  # [V], sorted

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def encode(self, text: str) -> Encoded:
        """Ids of the characters of `text`; characters outside the vocabulary are dropped and counted."""
        points = code_points(text)  # [N]
        if len(self.chars) == 0 or points.numel() == 0:
            return Encoded(torch.empty(0, dtype=id_dtype(len(self))), int(points.numel()))
        pos = torch.searchsorted(self._points, points).clamp_(max=len(self.chars) - 1)  # [N]
        known = self._points[pos] == points  # [N]
        ids = pos[known].to(id_dtype(len(self)))
        return Encoded(ids, int(points.numel() - ids.numel()))

    def encode_strict(self, text: str, what: str = "text") -> torch.Tensor:
        """Ids of `text`, or a UserError naming the characters that are not in the vocabulary."""
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UserError(f"{what} has {len(unknown)} character(s) the model never saw in training: "
                            f"{shown}; remove them or retrain on text that contains them")
        return self.encode(text).ids

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocab":
        return cls(list(data["chars"]))
