"""The optimiser, the learning-rate schedule and the training budget."""

from __future__ import annotations

import math

import torch

from charlm.config import TrainConfig


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
    """AdamW; weight decay applies to weight matrices only, never to biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
