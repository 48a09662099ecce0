"""Run a cell over time and stack layers: state in, state out.

Tensors here are time-major: x [T, B, D], outputs [T, B, H], so step t reads a contiguous
[B, G*H] slice. A stack's state is a tuple of [L, B, H] tensors: (h,) for the RNN and
(h, c) for the LSTM, the same layout as torch.nn.RNN / torch.nn.LSTM.
"""

from __future__ import annotations

import torch
from torch import nn

from charlm.cells import CELLS, State


class RecurrentLayer(nn.Module):
    """One cell unrolled over T steps (backpropagation through time is autograd's)."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        gx = self.cell.project_input(x)  # [T, B, G*H]: all input projections in one matmul
        outputs = []
        # unbind, not gx[t]: indexing would give each step a zero-filled [T, B, G*H] gradient
        # in backward (quadratic in T); unbind's backward stacks all T gradients once.
        for gx_t in gx.unbind(0):
            state = self.cell.step(gx_t, state)
            outputs.append(state[0])
        return torch.stack(outputs), state  # [T, B, H]


class RecurrentStack(nn.Module):
    """L layers: layer k's h_t is layer k+1's x_t, with dropout between layers."""

    def __init__(self, cell_type: str, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        cell_class = CELLS[cell_type]
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.layers = nn.ModuleList(
            RecurrentLayer(cell_class(input_size if k == 0 else hidden_size, hidden_size))
            for k in range(num_layers))
        self.dropout = nn.Dropout(dropout)
        self.state_size = cell_class.state_size

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        shape = (self.num_layers, batch_size, self.hidden_size)
        return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.state_size))

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x [T, B, D], state tuple of [L, B, H] -> top layer outputs [T, B, H], new state."""
        finals = []
        for k, layer in enumerate(self.layers):
            x, layer_state = layer(x, tuple(s[k] for s in state))
            if k < self.num_layers - 1:
                x = self.dropout(x)
            finals.append(layer_state)
        return x, tuple(torch.stack(parts) for parts in zip(*finals))  # each [L, B, H]
