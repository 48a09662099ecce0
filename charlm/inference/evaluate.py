"""Loss, bits per character and perplexity of a model over a whole text, state carried through.

The same code gives the validation loss during training and `charlm eval`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F

from charlm.data.text import DataError, TextSettings, transform, units_of
from charlm.data.vocab import Vocab

IGNORE = -100  # target id of padding: not scored
_LOGITS_BUDGET = 1 << 22  # logits held at once (S x window x V), so a big vocabulary stays in memory
# Windows of 64 steps keep the [window, S, G*H] gate buffers in cache: measured ~20% faster than 512.
MIN_STREAM = 512  # predictions per stream at least, so the warmup overhead stays small
WARMUP = 256  # unscored characters a stream reads before its part, to enter it with real context


@dataclass(frozen=True)
class EvalResult:
    loss_nats: float  # mean cross-entropy per predicted unit (character, or byte in byte mode)
    bpc: float  # bits per character
    perplexity: float  # per unit
    chars: int  # characters scored (every in-vocabulary character but the first)
    oov_chars: int = 0  # characters outside the vocabulary
    oov_rule: str = "skipped"  # what happened to them: "skipped", or "scored as <unk>"
    unit: str = "chars"
    bytes: int | None = None  # byte mode: bytes scored
    bits_per_byte: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def stream_layout(
    ids: torch.Tensor, streams: int, min_stream: int = MIN_STREAM, warmup: int = WARMUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut N ids into S parallel streams so every one of the N - 1 predictions is made once.

    S is at most `streams`, and small enough that each stream makes `min_stream` predictions.
    Stream s scores ids[s*L+1 : (s+1)*L+1]. So that it does not start from a blank state,
    stream s > 0 first reads the W ids before its part, unscored (its "warmup"); stream 0
    starts at the true beginning of the text and is padded at its end instead:

                  W columns           L columns
        row 0     [ part 0 ............ ][ pad ]
        row s     [ warmup ][ part s .............. ]     (targets IGNORE outside the parts)

    Returns inputs and targets, int64 [S, W + L].
    """
    predictions = ids.numel() - 1
    assert predictions >= 1, "need at least two characters to score one"
    streams = max(1, min(streams, predictions // min_stream))
    length = -(-predictions // streams)
    width = min(warmup, length) if streams > 1 else 0
    flat_inputs = torch.zeros(streams * length, dtype=torch.long)
    flat_targets = torch.full((streams * length,), IGNORE, dtype=torch.long)
    flat_inputs[:predictions] = ids[:-1]
    flat_targets[:predictions] = ids[1:]
    parts_in, parts_out = flat_inputs.view(streams, length), flat_targets.view(streams, length)  # [S, L]
    inputs = torch.zeros(streams, width + length, dtype=torch.long)
    targets = torch.full((streams, width + length), IGNORE, dtype=torch.long)
    inputs[0, :length], targets[0, :length] = parts_in[0], parts_out[0]
    inputs[1:, width:], targets[1:, width:] = parts_in[1:], parts_out[1:]
    if width:
        inputs[1:, :width] = parts_in[:-1, length - width :]  # the end of the previous part
    return inputs, targets


@torch.no_grad()
def evaluate_totals(
    model: torch.nn.Module,
    ids: torch.Tensor,
    streams: int = 64,
    window: int | None = None,
    min_stream: int = MIN_STREAM,
    warmup: int = WARMUP,
    part: tuple[int, int] = (0, 1),
) -> tuple[float, int]:
    """Summed cross-entropy (nats) and number of predictions of `ids`, state carried through.

    `part` = (k, n) scores only streams k, k+n, k+2n, ...: n processes share the work."""
    device = next(model.parameters()).device
    inputs, targets = stream_layout(ids, streams, min_stream, warmup)  # [S, W + L]
    inputs, targets = inputs[part[0] :: part[1]], targets[part[0] :: part[1]]
    if window is None:
        vocab_size = cast(int, model.vocab_size)  # nn.Module types each attribute as Tensor | Module
        window = max(1, min(64, _LOGITS_BUDGET // (max(inputs.shape[0], 1) * vocab_size)))
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    try:
        for start in range(0, inputs.shape[1] if inputs.shape[0] else 0, window):
            x = inputs[:, start : start + window].to(device)  # [S, W]
            y = targets[:, start : start + window].to(device)  # [S, W]
            logits, state = model(x, state)  # [S, W, V]
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()  # sum half-precision logits in float32
            flat = logits.transpose(0, 1).reshape(-1, logits.shape[-1])  # [W*S, V], time-major: no copy
            losses = F.cross_entropy(flat, y.t().reshape(-1), ignore_index=IGNORE, reduction="none")  # [W*S]
            total += losses.double().sum().item()  # summed in float64: a 1 MB text is 10^6 terms
            count += int((y != IGNORE).sum())
    finally:
        model.train(was_training)
    return total, count


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, ids: torch.Tensor, window: int, batch: int = 64) -> EvalResult:
    """Score `ids` as nanoGPT scores: cut into consecutive, non-overlapping windows of `window`
    characters, each read from a blank state, so every prediction sees 1 to `window` characters
    of context and no state is carried. Every one of the N - 1 predictions is made once."""
    device = next(model.parameters()).device
    predictions = ids.numel() - 1
    rows = -(-predictions // window)
    inputs = torch.zeros(rows * window, dtype=torch.long)
    targets = torch.full((rows * window,), IGNORE, dtype=torch.long)
    inputs[:predictions], targets[:predictions] = ids[:-1], ids[1:]
    inputs, targets = inputs.view(rows, window), targets.view(rows, window)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for first in range(0, rows, batch):
            logits, _ = model(inputs[first : first + batch].to(device), None)  # [n, window, V]
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()
            losses = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets[first : first + batch].reshape(-1).to(device),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total += float(losses.double())
    finally:
        model.train(was_training)
    return result_of(total, predictions)


def result_of(total: float, count: int) -> EvalResult:
    mean = total / count
    # e^mean overflows a float past ~709 nats (a diverged model): its perplexity is infinite.
    perplexity = math.exp(mean) if mean < 709.0 else math.inf
    return EvalResult(loss_nats=mean, bpc=mean / math.log(2), perplexity=perplexity, chars=count)


def evaluate_ids(
    model: torch.nn.Module,
    ids: torch.Tensor,
    streams: int = 64,
    window: int | None = None,
    min_stream: int = MIN_STREAM,
    warmup: int = WARMUP,
) -> EvalResult:
    """Score `ids` with S streams read in windows, state carried from window to window.

    With S = 1 this is exactly one long pass; with more streams each one is warmed up on the
    text before it (see stream_layout), which makes the result agree with one long pass to
    within the model's memory of more than `warmup` characters back."""
    return result_of(*evaluate_totals(model, ids, streams, window, min_stream, warmup))


def evaluate_text(
    model: torch.nn.Module,
    vocab: Vocab,
    text: str,
    streams: int = 64,
    settings: TextSettings | None = None,
    window: int | None = None,
) -> EvalResult:
    """Score a text prepared as the training text was (`settings`).

    Characters outside the vocabulary are scored as <unk> when the vocabulary has it, else
    dropped (neither fed nor scored); either way they are counted. In byte mode the loss is
    per byte, and bpc divides the same total by the text's characters, so the two modes
    compare on the same file. With `window`, the text is scored in independent windows of that
    many characters (evaluate_windows) instead of with the state carried through."""
    text, encoded = encode_for_scoring(vocab, text, settings)
    if window is not None:
        return described(evaluate_windows(model, encoded.ids, window, streams), text, encoded, vocab)
    return described(evaluate_ids(model, encoded.ids, streams), text, encoded, vocab)


def encode_for_scoring(vocab: Vocab, text: str, settings: TextSettings | None = None):
    """The text as the model reads it (prepared as the training text was) and its encoding."""
    settings = settings or TextSettings(unit=vocab.unit, documents="lines" if vocab.documents else "none")
    text = transform(text, settings)
    encoded = vocab.map_units(units_of(text, settings))
    if encoded.ids.numel() < 2:
        raise DataError(f"the text has {encoded.ids.numel()} character(s) the model knows; at least 2 are needed")
    return text, encoded


def described(result: EvalResult, text: str, encoded, vocab: Vocab) -> EvalResult:
    """`result` with the out-of-vocabulary count, and in byte mode per character as well as per byte."""
    rule = "scored as <unk>" if encoded.unk else "skipped"
    if vocab.unit == "chars":
        return replace(result, oov_chars=encoded.oov_chars, oov_rule=rule)
    total_bits = result.loss_nats * result.chars / math.log(2)
    chars = max(len(text) - 1, 1)
    return replace(
        result,
        bpc=total_bits / chars,
        chars=chars,
        unit="bytes",
        bytes=result.chars,
        bits_per_byte=total_bits / result.chars,
    )
