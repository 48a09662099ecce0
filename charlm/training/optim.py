"""The optimiser (and the parameters it leaves frozen), the learning-rate schedule and the training budget."""

from __future__ import annotations

import contextlib
import math
import re

import torch

from charlm.config import TrainConfig
from charlm.errors import UserError


class Budget:
    """How far a run is through train.max_steps / train.max_time: the larger fraction wins."""

    def __init__(self, cfg: TrainConfig):
        self.max_steps, self.max_seconds = cfg.max_steps, cfg.max_time_seconds

    def fraction(self, step: int, elapsed: float) -> float:
        parts = []
        if self.max_steps is not None:
            parts.append(step / self.max_steps)
        if self.max_seconds is not None:
            parts.append(elapsed / self.max_seconds)
        return max(parts)

    def reached(self, step: int, elapsed: float) -> bool:
        return self.fraction(step, elapsed) >= 1.0


def learning_rate(cfg: TrainConfig, step: int, fraction: float) -> float:
    """Linear warmup over warmup_steps, then constant, or cosine from lr to min_lr over the budget."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "constant":
        return cfg.lr * warmup
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))
    return (cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine) * warmup


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that train (frozen ones are left out); weight decay applies to
    weight matrices only, never to biases."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


_LAYER = re.compile(r"rnn\.(\d+)")


def freeze(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Keep the parameters `names` select as they are (train.freeze): requires_grad off, so they get
    no gradient and build_optimizer leaves them out. A name is a part (`embedding`, `head`, `rnn.<k>`
    for layer k) or any parameter name, or a prefix of them that ends at a dot (`rnn.layers.0.weight_hh`,
    `rnn.layers.1`). Returns the names of the parameters frozen."""
    params = dict(model.named_parameters())
    chosen: set[str] = set()
    for name in names:
        layer = _LAYER.fullmatch(name)
        prefix = f"rnn.layers.{layer.group(1)}" if layer else name
        matched = [n for n in params if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            raise UserError(
                f"train.freeze: {name!r} is no part of this model; valid names: "
                f"{', '.join(_parts(params))}, or a parameter name (or prefix) such as {next(iter(params))}"
            )
        chosen.update(matched)
    if chosen and len(chosen) == len(params):
        raise UserError("train.freeze freezes every parameter, so nothing would train; leave a part out")
    for n in chosen:
        params[n].requires_grad_(False)
    return [n for n in params if n in chosen]


def _parts(params: dict) -> list[str]:
    """The part names train.freeze knows for these parameters: embedding, rnn.0, rnn.1, ..., head."""
    parts = []
    for name in params:
        part = part_of(name)
        if part not in parts:
            parts.append(part)
    return parts


def part_of(name: str) -> str:
    """The part of the model a parameter belongs to: embedding, rnn.<k> for layer k, or head."""
    layer = re.match(r"rnn\.layers\.(\d+)\.", name)
    return f"rnn.{layer.group(1)}" if layer else name.split(".")[0]


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), kept beside them.

    After update n (counting from 1) the average moves towards the weights by 1 - d_n, with
    d_n = min(decay, n / (n + 9)): the first updates count nearly in full, so the average does
    not start anchored to the random initial weights, and later ones settle to `decay`, an
    average over the last ~1 / (1 - decay) steps. Training moves the weights; validation,
    best.pt and sampling use the average, which sits nearer the middle of the region the late,
    noisy steps wander in and usually generalises better than the last step's weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        assert 0.0 < decay < 1.0, f"decay {decay} outside (0, 1)"
        self.decay, self.updates = decay, 0
        weights = model.state_dict()  # tensors sharing the parameters' storage, updated in place
        self.names = [name for name, t in weights.items() if t.is_floating_point()]
        self._live = [weights[name] for name in self.names]
        self.average = {name: weights[name].detach().clone() for name in self.names}
        self._averages = [self.average[name] for name in self.names]

    def rate(self) -> float:
        """The weight given to the model in the next update: 1 - d_n."""
        n = self.updates + 1
        return 1.0 - min(self.decay, n / (n + 9))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights (one fused pass, every step)."""
        torch._foreach_lerp_(self._averages, self._live, self.rate())
        self.updates += 1

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged weights in place of its own."""
        return {**model.state_dict(), **self.average}

    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        for name in self.names:
            self.average[name].copy_(weights[name])
        self.updates = updates

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Run the block with the averaged weights in the model; its own weights come back after."""
        own = {name: t.detach().clone() for name, t in model.state_dict().items() if name in self.average}
        model.load_state_dict(self.average, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(own, strict=False)
