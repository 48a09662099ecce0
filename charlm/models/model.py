"""CharLM: characters -> (one-hot | embedding) -> input dropout -> recurrent stack -> dropout -> linear head.

Shape letters: B batch, T time, V vocabulary, E embedding, H hidden, L layers.
The loss is computed outside the model; callers treat the state as opaque and use
`init_state` / `detach_state`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.cells import State
from charlm.models.dropout import SequenceDropout, dropped_embedding_rows
from charlm.models.layers import RecurrentStack
from charlm.models.registry import CellSpec

if TYPE_CHECKING:
    from charlm.config import ModelConfig


class CharLM(nn.Module):
    def __init__(self, vocab_size: int, cell_type: str = "lstm", hidden_size: int = 256, num_layers: int = 2,
                 dropout: float = 0.0, input: str = "embedding", embedding_dim: int = 64, backend: str = "native",
                 weight_dropout: float = 0.0, locked_dropout: bool = False, input_dropout: float = 0.0,
                 embedding_dropout: float = 0.0):
        super().__init__()
        assert input in ("onehot", "embedding"), f"unknown input kind {input!r}"
        assert embedding_dropout == 0 or input == "embedding", "embedding dropout needs an embedding"
        self.vocab_size = vocab_size
        # Embedding init: torch's N(0, 1), so each input feature has unit variance, which the
        # layer-0 Xavier init assumes. One-hot input needs no parameters: x_t is a basis vector
        # and layer 0's weight_ih [4H, V] plays the embedding's role.
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if input == "embedding" else None
        input_size = embedding_dim if self.embedding is not None else vocab_size
        self.embedding_dropout = embedding_dropout
        self.input_dropout = SequenceDropout(input_dropout, locked_dropout)
        self.rnn = RecurrentStack(cell_type, input_size, hidden_size, num_layers, dropout, backend, weight_dropout,
                                  locked_dropout)
        self.dropout = SequenceDropout(dropout, locked_dropout)
        # Head init: torch's Linear default U(+-1/sqrt(H)); logits start small, so the first
        # loss is close to the uniform ln V and no character starts out favoured.
        self.head = nn.Linear(hidden_size, vocab_size)

    @property
    def cell_spec(self) -> CellSpec:
        """The registry entry of the model's cell type: its name, backends and viz channels."""
        return self.rnn.spec

    @property
    def backend(self) -> str:
        """The concrete backend the recurrence runs on (native, fused or reference)."""
        return self.rnn.backend

    def init_state(self, batch_size: int, device=None) -> State:
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

    def forward(self, idx: torch.Tensor, state: State | None = None,
                record: list | None = None, top: dict | None = None) -> tuple[torch.Tensor, State]:
        """idx [B, T] -> logits [B, T, V] and the state after the last step.

        `record`: a list that receives each layer's gate activations (see RecurrentStack).
        `top`: a dict that receives the top layer's outputs [T, B, H] as "h" and, after dropout,
        as "h_dropped" (what activation regularisation penalises)."""
        if state is None:
            state = self.init_state(idx.shape[0], idx.device)
        x = self.input_dropout(self.embed(idx.t()))  # [T, B, D]
        h, state = self.rnn(x, state, record)  # [T, B, H]
        dropped = self.dropout(h)
        if top is not None:
            top["h"], top["h_dropped"] = h, dropped
        logits = self.head(dropped)  # [T, B, V]
        return logits.transpose(0, 1), state  # [B, T, V] (a view)


def build_model(cfg: "ModelConfig", vocab_size: int, backend: Optional[str] = None) -> CharLM:
    """The model `cfg` describes, run on `backend` (default cfg.backend): a concrete backend, since
    whoever builds the model knows the device and precision that auto is resolved for."""
    return CharLM(vocab_size, cell_type=cfg.type, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                  dropout=cfg.dropout, input=cfg.input, embedding_dim=cfg.embedding_dim,
                  backend=backend or cfg.backend, weight_dropout=cfg.weight_dropout,
                  locked_dropout=cfg.locked_dropout, input_dropout=cfg.input_dropout,
                  embedding_dropout=cfg.embedding_dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
