"""What the model sees in a text: surprisal per character and every gate of every unit, as data.

The activations come from the cells' own step() (CharLM.forward's trace="gates"): the
same equations training runs, not a second implementation. Which channels a cell type shows,
and their ranges, come from its registry entry (`model.cell_spec`). page.py turns this into HTML.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import torch

from charlm.data.text import BOS, EOS, TextSettings, transform, units_of
from charlm.data.vocab import Vocab
from charlm.errors import UserError

_WINDOW = 512  # steps per forward pass: recorded activations stay small
_BUDGET = 24 << 20  # bytes of unit data in one page; beyond it, the most telling units are kept


@dataclass
class Inspection:
    chars: list[str]  # one display string per position ("" for a document start)
    surprisal: list[float]  # bits; position 0 has no prediction (0)
    top5: list[list[tuple[str, float]]]  # what the model expected at each position
    cell_type: str
    layers: int
    hidden_size: int
    units: list[list[int]]  # per layer, the units included
    channels: dict = field(default_factory=dict)  # name -> [layer] -> uint8 [positions, len(units)]
    features: list[dict] = field(default_factory=list)  # {name, units: [(layer, unit, r)]}
    scales: dict = field(default_factory=dict)  # name -> {low, high, legend}: what a channel's 0..255 spans


def _scale(channel) -> dict:
    """The range a channel's colours span, as the page shows it (tanh of an unbounded value)."""
    low, high = (channel.low, channel.high) if channel.bounded else (-1.0, 1.0)
    return {"low": low, "high": high, "legend": f"{channel.label}: {low:g} to {high:g}"}


def _to_bytes(values: torch.Tensor, channel) -> torch.Tensor:
    """Values [N, U] -> uint8, 0..255 spanning the channel's range (_scale)."""
    scale = _scale(channel)
    values = values if channel.bounded else torch.tanh(values)
    unit = (values - scale["low"]) / (scale["high"] - scale["low"])
    return (unit.clamp(0, 1) * 255).round().to(torch.uint8)


def _display(vocab: Vocab, ids: list[int], units: torch.Tensor) -> list[str]:
    out = []
    for index, unit in zip(ids, units.tolist()):
        if unit == BOS:
            out.append("")
        elif unit == EOS:
            out.append("\n")
        elif index < vocab.offset:
            out.append("\ufffd")
        elif vocab.unit == "bytes":
            out.append(bytes([unit]).decode("latin-1") if unit < 128 else "\u00b7")
        else:
            out.append(chr(unit))
    return out


class NothingToShow(UserError):
    """The text leaves fewer than 2 units the model can read, so there is no prediction to colour."""


def _known_units(vocab: Vocab, text: str, settings: TextSettings) -> torch.Tensor:
    """The text's units [N], without the characters a vocabulary lacking <unk> cannot read; N >= 2."""
    text = transform(text, settings)
    unknown = []
    if vocab.unit == "chars" and "<unk>" not in vocab.specials:
        unknown = vocab.unknown_chars(text)
        known = set(vocab.chars) | {"\n"}
        text = "".join(c for c in text if c in known)
    # units_of cannot take an empty text (torch.frombuffer refuses an empty buffer).
    units = units_of(text, settings) if text else torch.zeros(0, dtype=torch.int32)
    if units.numel() >= 2:
        return units
    if not unknown:
        raise NothingToShow("the text has fewer than 2 characters; nothing to show: give a longer text")
    shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
    raise NothingToShow(
        f"the text has fewer than 2 characters the model knows (not in its vocabulary: {shown}); "
        "nothing to show: give a text in the characters it was trained on"
    )


@torch.no_grad()
def inspect(model, vocab: Vocab, text: str, settings: TextSettings, cell_type: str) -> Inspection:
    """Run `text` through the model once, recording surprisal, expectations and activations.

    Characters outside a vocabulary without <unk> are left out of the page (as eval drops them)."""
    spec = model.cell_spec  # the registry entry: the channels to show and their ranges
    assert spec.name == cell_type, f"the model's cell type is {spec.name}, not {cell_type}"
    units = _known_units(vocab, text, settings)  # one id per unit from here on
    ids = vocab.map_units(units).ids.long()
    assert ids.numel() == units.numel(), "every unit maps to one id"
    model.eval()
    device = next(model.parameters()).device
    state, probs, recorded = None, [], []
    for start in range(0, ids.numel(), _WINDOW):
        logits, state, trace = model(ids[start : start + _WINDOW][None].to(device), state, trace="gates")  # [1, W, V]
        probs.append(torch.softmax(logits[0].float(), dim=-1).cpu())
        recorded.append([{name: torch.cat(values).cpu() for name, values in layer.items()} for layer in trace.gates])
    layers = [
        {name: torch.cat([window[k][name] for window in recorded]) for name in recorded[0][k]}
        for k in range(len(recorded[0]))
    ]  # per layer: name -> [N, H]
    surprisal, top5 = _expectations(vocab, ids, torch.cat(probs))
    shown = _display(vocab, ids.tolist(), units)
    inspection = Inspection(
        shown,
        surprisal,
        top5,
        cell_type,
        len(layers),
        layers[0]["hidden"].shape[1],
        [],
        scales={channel.name: _scale(channel) for channel in spec.channels},
    )
    return _with_units(inspection, layers, shown, spec)


def _expectations(
    vocab: Vocab, ids: torch.Tensor, probs: torch.Tensor
) -> tuple[list[float], list[list[tuple[str, float]]]]:
    """Each character's surprisal (bits) and the model's five likeliest characters before it."""
    surprisal: list[float] = [0.0]
    top5: list[list[tuple[str, float]]] = [[]]
    decode = vocab.stream_decoder
    for t in range(1, ids.numel()):
        p = probs[t - 1]
        surprisal.append(-math.log2(max(float(p[ids[t]]), 1e-12)))
        values, indices = p.topk(min(5, p.numel()))
        top5.append([(decode().feed(int(i)) or "·", round(float(v), 4)) for v, i in zip(values, indices)])
    return surprisal, top5


def _features(chars: list[str]) -> dict[str, torch.Tensor]:
    """Simple properties of each position, for finding units that track them."""
    inside_quotes, inside_parens, column = [], [], []
    quote, depth, col = False, 0, 0
    for ch in chars:
        if ch == '"':
            quote = not quote
        depth = depth + (ch == "(") - (ch == ")") if ch in "()" else depth
        depth = max(depth, 0)
        col = 0 if ch == "\n" else col + 1
        inside_quotes.append(float(quote))
        inside_parens.append(float(depth > 0))
        column.append(float(col))
    return {
        "inside quotes": torch.tensor(inside_quotes),
        "inside parentheses": torch.tensor(inside_parens),
        "position in line": torch.tensor(column),
    }


def _correlations(values: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Pearson r of every unit's values [N, H] with a feature [N]; 0 where either is constant."""
    v = values - values.mean(0)
    f = feature - feature.mean()
    denominator = v.norm(dim=0) * f.norm()
    return torch.where(denominator > 0, (v * f[:, None]).sum(0) / denominator.clamp_min(1e-12), torch.zeros(()))


def _with_units(ins: Inspection, recorded: list[dict], shown: list[str], spec) -> Inspection:
    channels = spec.channels
    n, per_unit = len(shown), len(channels)
    features = _features(shown)
    track = spec.feature_channel
    scores = []
    for name, feature in features.items():
        if feature.min() == feature.max():  # e.g. no quotes in the text: nothing to correlate with
            continue
        units = []
        for k, layer in enumerate(recorded):
            r = _correlations(layer[track].float(), feature)
            for unit in r.abs().topk(min(5, r.numel())).indices.tolist():
                if r[unit] != 0:
                    units.append((k, unit, round(float(r[unit]), 3)))
        units.sort(key=lambda u: -abs(u[2]))
        ins.features.append({"name": name, "units": units[:8]})
        scores.extend(units)
    room = max(1, _BUDGET // max(n * per_unit * ins.layers, 1))  # units per layer that fit the page
    for k, layer in enumerate(recorded):
        if room >= ins.hidden_size:
            chosen = list(range(ins.hidden_size))
        else:  # the units that track a feature first, then the most variable
            tracked = [u for (lk, u, _) in scores if lk == k]
            spread = layer[track].float().std(0).argsort(descending=True).tolist()
            chosen = sorted(list(dict.fromkeys(tracked + spread))[:room])
        ins.units.append(chosen)
        for channel in channels:
            values = layer[channel.name][:, chosen].float()
            ins.channels.setdefault(channel.name, []).append(_to_bytes(values, channel))
    return ins


def encode_bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.contiguous().numpy().tobytes()).decode("ascii")
