"""Loss, bits per character and perplexity of a model over a whole text, state carried through.

The same code gives the validation loss during training and `charlm eval`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from charlm.data import DataError
from charlm.vocab import Vocab

IGNORE = -100  # target id of padding: not scored
_LOGITS_BUDGET = 1 << 22  # logits held at once (S x window x V), so a big vocabulary stays in memory
MIN_STREAM = 512  # characters per stream at least: a stream's first characters lack context


@dataclass(frozen=True)
class EvalResult:
    loss_nats: float  # mean cross-entropy per scored character
    bpc: float  # the same in bits
    perplexity: float
    chars: int  # characters scored (every in-vocabulary character except the first)
    oov_chars: int = 0  # characters dropped because they are not in the vocabulary

    def to_dict(self) -> dict:
        return asdict(self)


def stream_layout(ids: torch.Tensor, streams: int, min_stream: int = MIN_STREAM) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut N ids into S parallel streams so every one of the N - 1 predictions is made once.

    S is at most `streams`, and small enough that each stream holds `min_stream` predictions.
    inputs[s, j] = ids[s*L + j], targets[s, j] = ids[s*L + j + 1]; the tail of the last
    stream is padded (input 0, target IGNORE). Returns two int64 tensors [S, L].
    """
    predictions = ids.numel() - 1
    assert predictions >= 1, "need at least two characters to score one"
    streams = max(1, min(streams, predictions // min_stream))
    length = -(-predictions // streams)
    inputs = torch.zeros(streams * length, dtype=torch.long)
    targets = torch.full((streams * length,), IGNORE, dtype=torch.long)
    inputs[:predictions] = ids[:-1]
    targets[:predictions] = ids[1:]
    return inputs.view(streams, length), targets.view(streams, length)


@torch.no_grad()
def evaluate_ids(model: torch.nn.Module, ids: torch.Tensor, streams: int = 64, window: int | None = None,
                 min_stream: int = MIN_STREAM) -> EvalResult:
    """Score `ids` with S streams read in windows, state carried from window to window.

    Each stream starts from a zero state, so its first few characters see less context than
    in one long pass; with S = 1 the result is exactly one long pass."""
    device = next(model.parameters()).device
    inputs, targets = stream_layout(ids, streams, min_stream)  # [S, L]
    if window is None:
        window = max(1, min(512, _LOGITS_BUDGET // (inputs.shape[0] * model.vocab_size)))
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    try:
        for start in range(0, inputs.shape[1], window):
            x = inputs[:, start:start + window].to(device)  # [S, W]
            y = targets[:, start:start + window].to(device)  # [S, W]
            logits, state = model(x, state)  # [S, W, V]
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()  # sum half-precision logits in float32
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     ignore_index=IGNORE, reduction="sum").item()
            count += int((y != IGNORE).sum())
    finally:
        model.train(was_training)
    mean = total / count
    return EvalResult(loss_nats=mean, bpc=mean / math.log(2), perplexity=math.exp(mean), chars=count)


def evaluate_text(model: torch.nn.Module, vocab: Vocab, text: str, streams: int = 64) -> EvalResult:
    """Score a text; characters outside the vocabulary are dropped (neither fed nor scored) and counted."""
    encoded = vocab.encode(text)
    if encoded.ids.numel() < 2:
        raise DataError(f"the text has {encoded.ids.numel()} character(s) the model knows; at least 2 are needed")
    result = evaluate_ids(model, encoded.ids, streams)
    return EvalResult(**{**result.to_dict(), "oov_chars": encoded.oov_chars})
