"""One request as the generation engine takes it (`Completion`), and why the engine would refuse one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from charlm.inference.sample import Decoding


@dataclass
class Completion:
    """One request: prompt ids [P], n rows, up to max_tokens units each."""

    prompt_ids: torch.Tensor
    max_tokens: int
    decoding: Decoding
    generator: torch.Generator
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_id: int | None = None  # a unit id that ends a row (the document end marker)
    sink: Callable[[dict], None] = lambda event: None  # where the request's events go
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating for this request (a client went away): its rows leave at the next step."""
        self.cancelled.set()


def refusal(job: Completion, vocab_size: int) -> str | None:
    """Why the engine cannot serve `job`, naming the field (None: it can). The web server checks
    requests before they get here; this keeps one that slipped by (an empty prompt, n = 0, a top_k
    of 0) from failing the batch or holding its slot forever."""
    problem = job.decoding.problem()
    if problem is not None:
        return f"{problem.field} {problem.reason}"
    if job.n < 1:
        return f"n must be at least 1, not {job.n}"
    if job.max_tokens < 1:
        return f"max_tokens must be at least 1, not {job.max_tokens}"
    ids = job.prompt_ids
    if ids.numel() == 0:
        return "prompt: the engine needs at least one unit of prompt to start from"
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        return f"prompt: unit ids must be in [0, {vocab_size}), the model's vocabulary"
    return None
