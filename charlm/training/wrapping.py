"""The model as the training loop runs it: in DistributedDataParallel under torchrun, through
torch.compile when asked, and eager again when compiling fails (the plain model is what is saved)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from charlm.models.cells import State
from charlm.models.model import Trace
from charlm.training.distributed import World


class WrappedModel:
    """Calls `model` the way the run asks; `warn` tells the user when torch.compile is given up."""

    def __init__(
        self, model: torch.nn.Module, world: World, device: torch.device, compile: bool, warn: Callable[[str], None]
    ):
        self.model, self.compile, self.warn = model, compile, warn
        self.ddp: DistributedDataParallel | None = None
        if world.enabled:
            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.net: Callable = self.ddp or model  # or what torch.compile makes of it
        if compile:
            try:
                self.net = torch.compile(self.net)
            except Exception as err:  # any failure: train eagerly
                self._compile_failed(err)

    def __call__(
        self, x: torch.Tensor, state: State, trace: Literal["top"] | None = None
    ) -> tuple[torch.Tensor, State, Trace | None]:
        """The wrapped model's forward: logits [B, T, V], the state after and, when asked for, the
        Trace (as CharLM.forward gives them). A compiled model that fails on first use falls back to eager."""
        kwargs = {} if trace is None else {"trace": trace}
        try:
            out = self.net(x, state, **kwargs)
        except Exception as err:  # a compile failure is retried eagerly; anything else is raised again
            if not self.compile or self.net is (self.ddp or self.model):
                raise
            self._compile_failed(err)
            out = self.net(x, state, **kwargs)
        return out[0], out[1], out[2] if trace is not None else None

    def train(self) -> None:
        (self.ddp or self.model).train()  # a compiled module's mode is its original's

    def gradient_sync(self, sync: bool):
        """A context for one micro-batch's backward: DDP averages gradients across ranks only
        when `sync` (once per update, after the last micro-batch)."""
        return contextlib.nullcontext() if sync or self.ddp is None else self.ddp.no_sync()

    def _compile_failed(self, err: Exception) -> None:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        self.warn(f"warning: torch.compile is unavailable here ({reason}); training without it")
        self.net = self.ddp or self.model
