"""The figures the loop logs that need more than one line: the per-interval sums kept on the device
between log lines, and the gradient norm of each part of the model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from charlm.training.optim import part_of


@dataclass(frozen=True)
class Interval:
    """What the steps since the last log line add up to."""

    loss: float  # the mean over the steps
    grad_norm: float  # the largest, before clipping
    chars_per_sec: float  # training throughput, evaluations left out


class IntervalStats:
    """Loss, largest pre-clip gradient norm and throughput since the last log line.

    Sums stay on the device: reading them every step would make a GPU wait."""

    def __init__(self, device: torch.device):
        self._zero = torch.zeros((), device=device)
        self.start()

    def start(self) -> None:
        """A new interval, from now."""
        self.loss_sum, self.norm_max, self.chars, self.steps = self._zero, self._zero, 0, 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, chars: int) -> None:
        self.loss_sum, self.norm_max = self.loss_sum + loss, self.norm_max.maximum(grad_norm)
        self.chars, self.steps = self.chars + chars, self.steps + 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time in this block (an evaluation) is not training throughput."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - started

    def flush(self) -> Interval:
        """The interval's figures, then a new interval starts."""
        figures = Interval(
            float(self.loss_sum) / max(self.steps, 1),
            float(self.norm_max),
            self.chars / max(time.perf_counter() - self.started, 1e-9),
        )
        self.start()
        return figures


def gradient_norms(model: torch.nn.Module) -> dict[str, float]:
    """`grad_norm/<part>` (embedding, rnn.<k>, head) of the gradients the last update applied (after
    clipping), read from the device at once: for log steps only."""
    squares: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            squares.setdefault(part_of(name), []).append(p.grad.detach().float().pow(2).sum())
    if not squares:
        return {}
    norms = torch.stack([torch.stack(parts).sum() for parts in squares.values()]).sqrt().tolist()  # [parts]
    return {f"grad_norm/{part}": norm for part, norm in zip(squares, norms)}
