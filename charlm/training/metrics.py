"""The per-interval training figures the loop logs: sums kept on the device between log lines."""

from __future__ import annotations

import time

import torch


class IntervalStats:
    """Loss, largest pre-clip gradient norm and throughput since the last log line.

    Sums stay on the device: reading them every step would make a GPU wait."""

    def __init__(self, device: torch.device):
        self._zero = torch.zeros((), device=device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.norm_max, self.chars, self.steps = self._zero, self._zero, 0, 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, chars: int) -> None:
        self.loss_sum, self.norm_max = self.loss_sum + loss, self.norm_max.maximum(grad_norm)
        self.chars, self.steps = self.chars + chars, self.steps + 1

    def exclude(self, seconds: float) -> None:
        self.started += seconds

    def flush(self) -> tuple[float, float, float]:
        """(mean loss, max grad norm, chars per second) of the interval, then start a new one."""
        stats = (float(self.loss_sum) / max(self.steps, 1), float(self.norm_max),
                 self.chars / max(time.perf_counter() - self.started, 1e-9))
        self._reset()
        return stats
