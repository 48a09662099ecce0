"""What training minimises: the cross-entropy of the next character, and the AR / TAR penalties
on the top layer's outputs that only shape the gradient (the reported loss is the cross-entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from charlm.models.model import Trace


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V]. CharLM's logits are a transposed view of a
    time-major tensor: flattening them time-major avoids copying all B*T*V of them."""
    flat = logits.transpose(0, 1).reshape(-1, logits.shape[-1])  # [T*B, V]
    return F.cross_entropy(flat.float(), targets.t().reshape(-1))


def activation_penalties(trace: Trace, ar: float, tar: float) -> torch.Tensor:
    """AR and TAR (Merity et al. 2017) on the top layer's outputs [T, B, H]: ar * mean(h_dropped^2)
    keeps activations small, tar * mean((h_t - h_{t-1})^2) keeps them from jumping between steps
    (on the outputs before dropout, whose masks would make every step jump)."""
    penalty = torch.zeros((), device=trace.top.device)
    if ar:
        penalty = penalty + ar * trace.top_dropped.float().pow(2).mean()
    if tar and trace.top.shape[0] > 1:
        h = trace.top.float()
        penalty = penalty + tar * (h[1:] - h[:-1]).pow(2).mean()
    return penalty
