"""CharLM: characters -> (one-hot | embedding) -> input dropout -> recurrent stack -> dropout -> linear head.

Shape letters: B batch, T time, V vocabulary, E embedding, H hidden, L layers.
The loss is computed outside the model; callers treat the state as opaque and use
`init_state` / `detach_state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.cells import Gates, State
from charlm.models.dropout import SequenceDropout, dropped_embedding_rows
from charlm.models.layers import RecurrentStack
from charlm.models.registry import CellSpec

if TYPE_CHECKING:
    from charlm.config import ModelConfig


@dataclass(frozen=True)
class Trace:
    """What a forward call shows besides its logits, when asked for (`trace=`)."""

    top: torch.Tensor  # [T, B, H]: the top layer's outputs, before dropout
    top_dropped: torch.Tensor  # [T, B, H]: after dropout, what the head reads (and AR penalises)
    gates: list[Gates] = field(default_factory=list)  # per layer (trace="gates" only): name -> T x [B, H]


TraceKind = Literal["top", "gates"]  # what a forward call shows: the top layer, or that and every gate
Output = tuple[torch.Tensor, State]  # logits [B, T, V], the state after the last step
TracedOutput = tuple[torch.Tensor, State, Trace]


class CharLM(nn.Module):
    """The model `cfg` describes over `vocab_size` symbols, run on `backend` (default cfg.backend):
    a concrete backend, since whoever builds the model knows the device and precision that auto
    is resolved for (registry.resolve_backend)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, backend: str | None = None):
        super().__init__()
        assert cfg.input in ("onehot", "embedding"), f"unknown input kind {cfg.input!r}"
        assert cfg.embedding_dropout == 0 or cfg.input == "embedding", "embedding dropout needs an embedding"
        self.vocab_size = vocab_size
        # Embedding init: torch's N(0, 1), so each input feature has unit variance, which the
        # layer-0 Xavier init assumes. One-hot input needs no parameters: x_t is a basis vector
        # and layer 0's weight_ih [4H, V] plays the embedding's role.
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim) if cfg.input == "embedding" else None
        input_size = cfg.embedding_dim if self.embedding is not None else vocab_size
        self.embedding_dropout = cfg.embedding_dropout
        self.input_dropout = SequenceDropout(cfg.input_dropout, cfg.locked_dropout)
        self.rnn = RecurrentStack(
            cfg.type,
            input_size,
            cfg.hidden_size,
            cfg.num_layers,
            cfg.dropout,
            backend or cfg.backend,
            cfg.weight_dropout,
            cfg.locked_dropout,
        )
        self.dropout = SequenceDropout(cfg.dropout, cfg.locked_dropout)
        # Head init: torch's Linear default U(+-1/sqrt(H)); logits start small, so the first
        # loss is close to the uniform ln V and no character starts out favoured.
        self.head = nn.Linear(cfg.hidden_size, vocab_size)

    @property
    def cell_spec(self) -> CellSpec:
        """The registry entry of the model's cell type: its name, backends and viz channels."""
        return self.rnn.spec

    @property
    def backend(self) -> str:
        """The concrete backend the recurrence runs on (native, fused or reference)."""
        return self.rnn.backend

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        param = self.head.weight
        return self.rnn.init_state(batch_size, device=device or param.device, dtype=param.dtype)

    def shared_weight_masks(self, generator: torch.Generator):
        """A context in which every forward call uses one set of weight-dropout masks (see RecurrentStack)."""
        return self.rnn.shared_weight_masks(generator)

    @staticmethod
    def detach_state(state: State) -> State:
        return tuple(s.detach() for s in state)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [T, B] -> x [T, B, D] (D = E, or V for one-hot)."""
        if self.embedding is not None:
            weight = dropped_embedding_rows(self.embedding.weight, self.embedding_dropout, self.training)
            return F.embedding(idx, weight)
        return F.one_hot(idx, self.vocab_size).to(self.head.weight.dtype)

    @overload
    def forward(self, idx: torch.Tensor, state: State | None = None, *, trace: None = None) -> Output: ...

    @overload
    def forward(self, idx: torch.Tensor, state: State | None = None, *, trace: TraceKind) -> TracedOutput: ...

    def forward(
        self, idx: torch.Tensor, state: State | None = None, *, trace: TraceKind | None = None
    ) -> Output | TracedOutput:
        """idx [B, T] -> logits [B, T, V] and the state after the last step.

        With `trace`, a third result, a Trace: the top layer's outputs before and after dropout
        ("top"), and also each layer's gate activations ("gates": the reference steps run, whatever
        the backend, so the cells' own equations are what is shown)."""
        assert trace in (None, "top", "gates"), f"unknown trace {trace!r}; choose top or gates"
        if state is None:
            state = self.init_state(idx.shape[0], idx.device)
        x = self.input_dropout(self.embed(idx.t()))  # [T, B, D]
        gates: list[Gates] = []
        if trace == "gates":
            h, state, gates = self.rnn.traced(x, state)  # [T, B, H]
        else:
            h, state = self.rnn(x, state)  # [T, B, H]
        dropped = self.dropout(h)
        logits = self.head(dropped).transpose(0, 1)  # [B, T, V] (a view of [T, B, V])
        if trace is None:
            return logits, state
        return logits, state, Trace(h, dropped, gates)

    if TYPE_CHECKING:  # what nn.Module's __call__ returns: forward's results, overloads included
        __call__ = forward


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
