"""Run cells over time and stack layers: state in, state out, three interchangeable backends.

Tensors here are time-major: x [T, B, D], outputs [T, B, H], so step t reads a contiguous
[B, G*H] slice. A stack's state is a tuple of [L, B, H] tensors: (h,) for the RNN and GRU,
(h, c) for the LSTM, the same layout as torch.nn.RNN / LSTM / GRU.

Backends (same parameters, so a checkpoint moves freely between them); which a cell type
supports, and the functions that run it, come from its entry in registry.py:
- reference: the cells' step() in a Python loop, differentiated by autograd. The readable
  definition the others are tested against.
- native: the cell type's own layer function over all T steps with a hand-written backward
  (native_layers.py: C++ step loops on the CPU, charlm/models/csrc, PyTorch elsewhere).
- fused: torch's own kernels (torch.lstm / gru / rnn_tanh: oneDNN on CPU, cuDNN on GPU), fused.py.
A model is built with one of these; `auto` is resolved before (registry.resolve_backend).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from charlm.models.cells import Cell, Gates, State, TorchLayoutCell
from charlm.models.dropout import SequenceDropout
from charlm.models.fused import flatten_for_cudnn, run_fused
from charlm.models.native import cpp_loops
from charlm.models.registry import lookup, spec_of


def native_loop(
    cell: Cell, x: torch.Tensor, state: State, weight_hh: torch.Tensor | None = None
) -> tuple[torch.Tensor, State]:
    """Run `cell` over x [T, B, D] with its cell type's native layer -> outputs [T, B, H], state.

    `weight_hh` replaces the cell's recurrent weight for every step (weight dropout).
    Under CPU autocast bf16 the cell types with bf16 loops run them (bf16 GEMMs, fp32 gates and
    state, bf16 outputs); otherwise the recurrence runs in the parameters' precision and
    autocast speeds up only the layers around it. The state stays in the parameters' dtype."""
    spec = spec_of(cell)
    w_hh = getattr(cell, "weight_hh", None) if weight_hh is None else weight_hh
    dtype = cell.weight_ih.dtype
    compute = torch.bfloat16 if spec.native_bf16 and _cpu_autocast_bf16(x) else dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        return spec.native_layer()(cell, x.to(compute).contiguous(), tuple(s.to(dtype) for s in state), w_hh)


def _cpu_autocast_bf16(x: torch.Tensor) -> bool:
    """Autocast to bf16 is on for the CPU, and the C++ loops that have a bf16 form are built."""
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and cpp_loops() is not None
    )


def reference_loop(
    cell: Cell, x: torch.Tensor, state: State, record: Gates | None = None, weight_hh: torch.Tensor | None = None
) -> tuple[torch.Tensor, State]:
    """The cell's step() once per time step, differentiated by autograd (`weight_hh` as in native_loop).

    `record`: the cell's steps add their activations to it (cells.record_activations)."""
    gx = cell.project_input(x)  # [T, B, G*H]: all input projections in one matmul
    outputs = []
    # unbind, not gx[t]: indexing would give each step a zero-filled [T, B, G*H] gradient
    # in backward (quadratic in T); unbind's backward stacks all T gradients once.
    for gx_t in gx.unbind(0):
        state = cell.step(gx_t, state, record, weight_hh)
        outputs.append(state[0])
    return torch.stack(outputs), state  # [T, B, H]


class RecurrentStack(nn.Module):
    """L layers: layer k's h_t is layer k+1's x_t, with dropout between layers.

    `weight_dropout` is DropConnect on the recurrent weights (Wan et al. 2013; the AWD-LSTM's
    "weight drop", Merity et al. 2017): while training, a random fraction p of every weight_hh
    entry is zeroed (the rest scaled by 1/(1-p)) and that one mask is used for all T steps of a
    forward call, or of every call inside `shared_weight_masks`. Unlike dropout on h_t it regularises the recurrence itself, and it costs one
    elementwise op per layer per window, not per step. Off in eval mode.

    `locked_dropout`: the dropout between layers uses one mask per window for all T steps
    (variational dropout, see dropout.py) instead of a new one at every step."""

    def __init__(
        self,
        cell_type: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float = 0.0,
        backend: str = "native",
        weight_dropout: float = 0.0,
        locked_dropout: bool = False,
    ):
        super().__init__()
        self.spec = lookup(cell_type)  # the registry entry: raises CellTypeError naming the valid types
        self.spec.check_weight_dropout(weight_dropout)
        cell_class = self.spec.cell_class()
        self.cell_type, self.hidden_size, self.num_layers = cell_type, hidden_size, num_layers
        self.layers = nn.ModuleList(
            cell_class(input_size if k == 0 else hidden_size, hidden_size) for k in range(num_layers)
        )
        self.dropout = SequenceDropout(dropout, locked_dropout)  # between layers
        self.weight_dropout = weight_dropout
        self._held_masks: list[torch.Tensor] | None = None
        self.state_names: tuple[str, ...] = cell_class.state_names  # the cell's: ("h",), or ("h", "c")
        self.state_size = len(self.state_names)
        self.backend = backend

    @property
    def cells(self) -> Sequence[TorchLayoutCell]:
        """The layers, typed (nn.ModuleList yields plain Modules). Typed in torch.nn's layout because
        what reads weight_hh and the biases runs only for cell types whose cells are."""
        return cast("Sequence[TorchLayoutCell]", self.layers)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.spec.check_backend(name)  # one line naming the backends this cell type supports (auto: unresolved)
        self._backend = name
        self.flatten_weights()

    def flatten_weights(self) -> bool:
        """On CUDA with the fused backend: the weights into cuDNN's one flat buffer (see fused.py)."""
        return self._backend == "fused" and flatten_for_cudnn(self.spec.fused, self.cells)

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the model (.to(), .cuda(), .float()) gives every parameter new storage;
        # put the weights back into one buffer, as torch.nn.RNNBase does.
        result = super()._apply(fn, *args, **kwargs)
        self.flatten_weights()
        return result

    def recurrent_weights(self) -> list[torch.Tensor | None]:
        """Each layer's weight_hh for this forward call (None for a cell type without one): masked
        while training with weight_dropout (by the masks `shared_weight_masks` holds, else by new ones)."""
        if not self.spec.recurrent_weights:
            return [None] * self.num_layers
        if not (self.training and self.weight_dropout > 0):
            return [cell.weight_hh for cell in self.cells]
        masks = self._held_masks or self.draw_weight_masks()
        return [cell.weight_hh * mask for cell, mask in zip(self.cells, masks)]

    def draw_weight_masks(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One DropConnect mask per layer, shaped like weight_hh: 0 with probability p, else 1/(1-p)."""
        keep = 1.0 - self.weight_dropout
        return [
            torch.empty_like(cell.weight_hh).bernoulli_(keep, generator=generator).div_(keep) for cell in self.cells
        ]

    @contextlib.contextmanager
    def shared_weight_masks(self, generator: torch.Generator):
        """Every forward call in the block uses the same masks, drawn once from `generator`.

        The trainer draws them once per update from a generator seeded by the seed and the step,
        so an update has one mask however many micro-batches (gradient accumulation) or
        processes (DDP) compute it, and a resumed run draws the same ones."""
        self._held_masks = self.draw_weight_masks(generator) if self.weight_dropout > 0 else None
        try:
            yield
        finally:
            self._held_masks = None

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        shape = (self.num_layers, batch_size, self.hidden_size)
        return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.state_size))

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x [T, B, D], state tuple of [L, B, H] -> top layer outputs [T, B, H], new state."""
        if self.backend == "fused" and not self.dropout.locked:
            return self._fused(x, state, self.recurrent_weights(), slice(None))
        return self._layer_by_layer(x, state)

    def traced(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State, list[Gates]]:
        """forward() on the reference steps whatever the backend, and each layer's activations by
        name (each a list of T tensors [B, H]): what the cells' own equations computed."""
        gates: list[Gates] = [{} for _ in self.layers]
        out, state = self._layer_by_layer(x, state, gates)
        return out, state, gates

    def _fused(self, x: torch.Tensor, state: State, recurrent: list, layers: slice) -> tuple[torch.Tensor, State]:
        """torch's kernel over `layers` (state holds just theirs), with this stack's dropout between them."""
        kernel = self.spec.fused
        assert kernel is not None, f"{self.cell_type} has no fused kernel"
        return run_fused(kernel, self.cells[layers], recurrent[layers], x, state, self.dropout.p, self.training)

    def _layer_by_layer(
        self, x: torch.Tensor, state: State, gates: list[Gates] | None = None
    ) -> tuple[torch.Tensor, State]:
        """forward() one layer at a time, with this stack's dropout between layers (torch's fused
        kernels only drop per element inside, so locked dropout runs them layer by layer). With
        `gates` (one dict per layer), the reference steps run and record into them."""
        finals = []
        recurrent = self.recurrent_weights()
        for k, (cell, w_hh) in enumerate(zip(self.cells, recurrent)):
            if gates is not None:
                x, layer_state = reference_loop(cell, x, tuple(s[k] for s in state), gates[k], w_hh)
            elif self.backend == "fused":
                x, layer_state = self._fused(x, tuple(s[k : k + 1] for s in state), recurrent, slice(k, k + 1))
                layer_state = tuple(s[0] for s in layer_state)
            elif self.backend == "native":
                x, layer_state = native_loop(cell, x, tuple(s[k] for s in state), w_hh)
            else:
                x, layer_state = reference_loop(cell, x, tuple(s[k] for s in state), weight_hh=w_hh)
            if k < self.num_layers - 1:
                x = self.dropout(x)
            finals.append(layer_state)
        return x, tuple(torch.stack(parts) for parts in zip(*finals))  # each [L, B, H]
