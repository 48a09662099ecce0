"""What a trained model does with time: how far back its gradient reaches, and how much
context its predictions use.

- gradient_norms: the norm of d loss_t / d h_{t-k} (and d loss_t / d c_{t-k} for the LSTM), the
  gradient of one prediction's loss with respect to the state k steps before it, averaged over
  positions of a text. A vanilla RNN's falls off geometrically with k (the vanishing gradient);
  an LSTM's cell state carries it much further.
- context_losses: the loss of each prediction when the model may read only the last k
  characters (its state reset k steps back), for growing k, beside the loss with the state
  carried from the start of the text (Khandelwal et al. 2018 did this for word LSTMs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F

_CHUNK = 64  # windows run at once in context_losses: bounds the logits held [chunk, k, V]


@dataclass
class GradientNorms:
    ks: list[int]
    hidden: list[float]  # mean over positions of ||d loss_t / d h_{t-k}||, all layers' h together
    cell: list[float] | None = None  # the same for the LSTM's cell state c
    positions: int = 0


@dataclass
class ContextLosses:
    ks: list[int]
    losses: list[float]  # mean loss (nats) with only the last k characters read
    carried: float  # mean loss at the same positions with the state carried from the text's start
    positions: int = 0
    carried_note: str = field(default="state carried from the start of the text")


@contextlib.contextmanager
def _reference_steps(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode on the reference backend (autograd through every step's state)."""
    rnn = cast(Any, model.rnn)  # a CharLM's RecurrentStack (nn.Module types each attribute as Tensor | Module)
    was_training, backend = model.training, rnn.backend
    model.eval()
    rnn.backend = "reference"
    try:
        yield
    finally:
        rnn.backend = backend
        model.train(was_training)


def _starts(count: int, first: int, last: int) -> list[int]:
    """`count` positions spread evenly over [first, last] (fewer if the range is short)."""
    if last < first:
        return []
    count = min(count, last - first + 1)
    if count == 1:
        return [first]
    return sorted({first + round(i * (last - first) / (count - 1)) for i in range(count)})


def gradient_norms(
    model: torch.nn.Module, ids: torch.Tensor, max_k: int = 256, positions: int = 32, warmup: int = 256
) -> GradientNorms:
    """d loss_t / d state_{t-k} for k = 0..max_k, averaged over `positions` places in `ids`.

    Each place: `warmup` characters read without gradients (so the state is a real one), then
    max_k + 1 characters one step at a time with every state kept, then the loss of the last
    prediction, back-propagated once to all of them. k = 0 is the state that made the prediction."""
    ids = ids.long()
    starts = _starts(positions, 0, ids.numel() - (warmup + max_k + 2))
    if not starts:
        raise ValueError(f"the text needs at least {warmup + max_k + 2} characters (it has {ids.numel()})")
    device = next(model.parameters()).device
    windows = torch.stack([ids[s : s + warmup + max_k + 2] for s in starts]).to(device)  # [B, W + K + 2]
    with _reference_steps(model):
        state: tuple[torch.Tensor, ...] | None = None
        if warmup:
            with torch.no_grad():
                _, state = model(windows[:, :warmup], None)
        kept = []
        for j in range(max_k + 1):
            _, state = model(windows[:, warmup + j : warmup + j + 1], state)
            for part in state:
                part.retain_grad()
            kept.append(state)
        # the prediction from the last state's top-layer h (the layer's output, the same values),
        # so that k = 0 is a gradient too; summed over positions: each gets its own loss's gradient
        assert state is not None, "max_k + 1 >= 1 steps were taken"
        head = cast(torch.nn.Linear, model.head)  # nn.Module types each attribute as Tensor | Module
        logits = head(state[0][-1])  # [B, V]
        loss = F.cross_entropy(_full(logits), windows[:, -1], reduction="sum")
        loss.backward()
    per_part = [[_mean_norm(kept[max_k - k][p].grad) for k in range(max_k + 1)] for p in range(len(state))]
    model.zero_grad(set_to_none=True)
    return GradientNorms(
        ks=list(range(max_k + 1)),
        hidden=per_part[0],
        cell=per_part[1] if len(per_part) > 1 else None,
        positions=len(starts),
    )


def _mean_norm(grad: torch.Tensor | None) -> float:
    """grad [L, B, H] -> the mean over B of each position's norm over all layers and units (None:
    the loss does not depend on it, as on the LSTM's last c)."""
    if grad is None:
        return 0.0
    return float(grad.transpose(0, 1).reshape(grad.shape[1], -1).double().norm(dim=1).mean())


def _full(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits scored in float32; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def doubling(max_k: int) -> list[int]:
    """1, 2, 4, ... up to max_k (max_k itself last, if it is not a power of two)."""
    ks, k = [], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k]


@torch.no_grad()
def context_losses(model: torch.nn.Module, ids: torch.Tensor, ks: list[int], positions: int = 512) -> ContextLosses:
    """The mean loss of `positions` predictions when only the last k characters are read, per k.

    Prediction t (of ids[t + 1]) with context k reads ids[t - k + 1 .. t] from a zero state;
    the same predictions are also scored with the state carried from the text's start."""
    ids = ids.long()
    largest = max(ks)
    targets = _starts(positions, largest - 1, ids.numel() - 2)  # t: every k has k characters before t + 1
    if not targets:
        raise ValueError(f"the text needs at least {largest + 1} characters (it has {ids.numel()})")
    device = next(model.parameters()).device
    t = torch.tensor(targets)
    was_training = model.training
    model.eval()
    try:
        losses = [_windowed_loss(model, ids, t, k, device) for k in ks]
        carried = float(_one_pass_losses(model, ids, device)[t].mean())
    finally:
        model.train(was_training)
    return ContextLosses(ks=list(ks), losses=losses, carried=carried, positions=len(targets))


def _windowed_loss(model, ids: torch.Tensor, t: torch.Tensor, k: int, device) -> float:
    total = 0.0
    offsets = torch.arange(-k + 1, 1)  # [k]
    for chunk in t.split(_CHUNK):
        windows = ids[chunk[:, None] + offsets].to(device)  # [n, k]
        logits, _ = model(windows, None)  # [n, k, V]
        total += float(F.cross_entropy(_full(logits[:, -1]), ids[chunk + 1].to(device), reduction="sum"))
    return total / t.numel()


def _one_pass_losses(model, ids: torch.Tensor, device, window: int = 256) -> torch.Tensor:
    """Loss of every prediction of ids (ids[i + 1] from ids[:i + 1]) in one stream, state carried: [N - 1]."""
    out, state = [], None
    for start in range(0, ids.numel() - 1, window):
        x = ids[start : min(start + window, ids.numel() - 1)]
        y = ids[start + 1 : start + 1 + x.numel()]
        logits, state = model(x[None].to(device), state)  # [1, n, V]
        out.append(F.cross_entropy(_full(logits[0]), y.to(device), reduction="none").double().cpu())
    return torch.cat(out)
