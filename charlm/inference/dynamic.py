"""Dynamic evaluation (Krause et al. 2018): the model keeps learning from the text it scores.

The text is read as one stream, in segments. Each segment is scored first, with the weights as
they are after the segments before it, and only then does the model take one gradient step on
that segment's loss: every character is predicted before the model has learned from it. The
state is carried from segment to segment (truncated backpropagation, as in training).

Two update rules, each with an optional pull back toward the trained weights θ0:
- "sgd": θ <- θ - lr·g + decay·(θ0 - θ)
- "rms": θ <- θ - lr·g / (sqrt(v) + eps) + decay·(θ0 - θ)·r, where v is the mean squared
  gradient and r = sqrt(v) / mean(sqrt(v)) (per parameter tensor, at most 1/decay), so
  weights the text moves often drift back faster. The paper collects v on the training data
  before evaluating; here v is the running mean over the segments already scored, which needs
  no training data and still never uses a character before it is predicted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from charlm.inference.evaluate import described, encode_for_scoring, evaluate_ids, result_of

RULES = ("sgd", "rms")
_EPS = 1e-8


@dataclass(frozen=True)
class DynamicSettings:
    segment: int = 50  # characters scored per update (the paper: 5-100 for characters)
    lr: float = 3e-4  # the best of 1e-5 ... 1e-3 on Tiny Shakespeare's val text (README)
    rule: Literal["sgd", "rms"] = "rms"
    decay: float = 0.0  # pull toward the trained weights per update; 0: none

    def check(self) -> str | None:
        """What is wrong with these settings (one line), or None."""
        if self.segment < 1:
            return f"the segment length must be at least 1 (got {self.segment})"
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            return f"the learning rate must be a number >= 0 (got {self.lr})"
        if self.rule not in RULES:
            return f"the update rule must be one of {', '.join(RULES)} (got {self.rule!r})"
        if not 0.0 <= self.decay < 1.0:
            return f"the decay must be in [0, 1) (got {self.decay})"
        return None


@dataclass
class DynamicTotals:
    total_nats: float = 0.0
    count: int = 0
    losses: list[float] | None = None  # per scored position, when asked for


def read_dynamically(
    model: torch.nn.Module, ids: torch.Tensor, settings: DynamicSettings, keep_losses: bool = False
) -> DynamicTotals:
    """Score `ids` (int64 [N]) one segment at a time, updating `model` in place after each.

    The model is left adapted to the text (what `sample --adapt-to` wants); its dropout is off
    throughout, as in any evaluation."""
    device = next(model.parameters()).device
    ids = ids.long()  # an encoded corpus may hold its ids in uint8
    params = [p for p in model.parameters() if p.requires_grad]
    updater = _Updater(params, settings)
    totals = DynamicTotals(losses=[] if keep_losses else None)
    was_training = model.training
    model.eval()
    state = None
    try:
        for x, y in _segments(ids, settings.segment):
            x, y = x.to(device)[None], y.to(device)[None]  # [1, n]
            with torch.enable_grad():
                logits, state = model(x, state)  # [1, n, V]
                if logits.dtype not in (torch.float32, torch.float64):
                    logits = logits.float()  # half-precision logits scored in float32
                losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")  # [n]
                total = losses.sum()
                grads = torch.autograd.grad(total / y.numel(), params, allow_unused=True)
            state = tuple(s.detach() for s in state)
            totals.total_nats += float(total.detach().double())
            totals.count += y.numel()
            if totals.losses is not None:  # keep_losses
                totals.losses.extend(losses.detach().double().tolist())
            updater.step(grads)  # after the segment was scored: it only affects later segments
    finally:
        model.train(was_training)
    return totals


def _segments(ids: torch.Tensor, length: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, ids.numel() - 1, length):
        stop = min(start + length, ids.numel() - 1)
        yield ids[start:stop], ids[start + 1 : stop + 1]


class _Updater:
    """One update rule over a list of parameters, remembering the trained weights."""

    def __init__(self, params: Sequence[torch.Tensor], settings: DynamicSettings):
        self.params, self.settings = params, settings
        # each list is empty where the settings do not use it (no decay; the sgd rule)
        self.trained = [p.detach().clone() for p in params] if settings.decay else []
        self.mean_square = [torch.zeros_like(p) for p in params] if settings.rule == "rms" else []
        self.updates = 0

    @torch.no_grad()
    def step(self, grads) -> None:
        s = self.settings
        self.updates += 1
        for k, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            if s.rule == "rms":
                v = self.mean_square[k]
                v.mul_(1 - 1 / self.updates).add_(g * g, alpha=1 / self.updates)  # the mean over updates so far
                rms = v.sqrt()
                p.sub_(s.lr * g / (rms + _EPS))
                if s.decay:
                    scale = (rms / rms.mean().clamp_min(_EPS)).clamp_max(1 / s.decay)
                    p.add_(s.decay * scale * (self.trained[k] - p))
            else:
                p.sub_(s.lr * g)
                if s.decay:
                    p.add_(s.decay * (self.trained[k] - p))


def evaluate_text_dynamic(
    model: torch.nn.Module, vocab, text: str, settings: DynamicSettings, text_settings=None, streams: int = 64
):
    """The static and the dynamic result on one text: (static, dynamic) EvalResults. The static
    score comes first, from the trained weights; the model is left adapted to the text."""
    text, encoded = encode_for_scoring(vocab, text, text_settings)
    static = described(evaluate_ids(model, encoded.ids, streams), text, encoded, vocab)
    totals = read_dynamically(model, encoded.ids, settings)
    dynamic = described(result_of(totals.total_nats, totals.count), text, encoded, vocab)
    return static, dynamic
