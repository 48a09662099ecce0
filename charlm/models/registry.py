"""The cell types charlm knows, one entry each: the one list config, layers, viz and the tests read;
the backends, and the concrete one `model.backend: auto` runs on a given device and precision.

Plain data and the standard library only (classes and functions are named as "module:attribute"
strings, imported on first use), so the torch-free config schema can read the names from here.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from charlm.errors import UserError

if TYPE_CHECKING:
    from charlm.models.cells import Cell

BACKENDS: tuple[str, ...] = ("native", "fused", "reference")  # the one list of concrete backends
AUTO = "auto"  # model.backend's default: resolve_backend() picks a concrete one where device and precision are known
BACKEND_CHOICES: tuple[str, ...] = (AUTO, *BACKENDS)  # what model.backend and --backend accept

# What `auto` runs on the CPU when it does not measure (CHARLM_AUTO=fixed, as in the tests;
# torchrun; info and export, which run no workload), by train precision and cell type; a cell
# type not listed runs native. Otherwise charlm.models.autotune times the backends on the run's
# shapes, since which is faster depends on the CPU (README, Fast on the machine you have).
CPU_AUTO: dict[str, dict[str, str]] = {
    "fp32": {"lstm": "fused"},  # level with the native loop in training here, faster in evaluation
    "bf16": {},  # native for every cell type: its bf16 core is the fast one
}


class CellTypeError(UserError, ValueError):
    """An unknown cell type or backend, or one a cell type does not support. A ValueError too,
    so the config schema's validators report it against its key."""


@dataclass(frozen=True)
class Channel:
    """One activation a cell's step() records that the viz page shows, with its value range:
    [0, 1] for a gate, [-1, 1] for a tanh, +-inf where unbounded (the page then shows tanh of it)."""

    name: str  # the key the step records under
    low: float
    high: float
    label: str  # what the page's legend calls the values shown

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def gate(name: str) -> Channel:
    return Channel(name, 0.0, 1.0, f"{name} gate")


def signed(name: str, symbol: str) -> Channel:
    """A tanh output, in [-1, 1]."""
    return Channel(name, -1.0, 1.0, symbol)


def unbounded(name: str, symbol: str) -> Channel:
    return Channel(name, -math.inf, math.inf, f"tanh({symbol})")


@functools.cache  # layers look the native function up per forward call
def _attribute(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class CellSpec:
    """Everything code needs to know about one cell type; `model.type` names it.

    Every cell's step() records at least "hidden" (its h_t); `channels` are those viz shows."""

    name: str
    title: str  # how people write it: "LSTM", "minGRU"
    cell: str  # "module:Class": its nn.Module with project_input(), step() and init_state()
    channels: tuple[Channel, ...]
    feature_channel: str  # the channel viz correlates with properties of the text
    recurrent_weights: bool  # has weight_hh [G*H, H], so model.weight_dropout applies
    native: str | None  # "module:function(cell, x, state, weight_hh) -> (outputs, state)", or None
    fused: str | None  # torch's kernel torch.<fused>, which takes torch.nn.RNN's arguments, or None
    native_bf16: bool = False  # its native layer runs bf16 input with bf16 GEMMs (CPU autocast bf16)

    @property
    def backends(self) -> tuple[str, ...]:
        available = {"native": self.native is not None, "fused": self.fused is not None, "reference": True}
        return tuple(b for b in BACKENDS if available[b])

    def cell_class(self) -> type[Cell]:
        return _attribute(self.cell)

    def native_layer(self):
        assert self.native is not None, f"{self.name} has no native layer"
        return _attribute(self.native)

    def check_backend(self, backend: str) -> None:
        """`backend` is a concrete backend this cell type runs on, or a one-line error."""
        if backend == AUTO:
            raise CellTypeError(
                "backend 'auto' reached the model unresolved; resolve it first with "
                "charlm.models.registry.resolve_backend(), where the device and precision are known"
            )
        if backend not in BACKENDS:
            raise CellTypeError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend not in self.backends:
            why = "torch has no fused kernel for it" if backend == "fused" else "it has no native loop"
            raise CellTypeError(
                f"model.type {self.name} cannot run on the {backend} backend ({why}); use {' or '.join(self.backends)}"
            )

    def check_weight_dropout(self, p: float) -> None:
        if p > 0 and not self.recurrent_weights:
            raise CellTypeError(
                f"model.type {self.name} has no recurrent weights (weight_hh) for "
                "model.weight_dropout to drop; set it to 0"
            )


_LSTM_CHANNELS = (gate("forget"), gate("input"), gate("output"), unbounded("cell", "c"))

REGISTRY: dict[str, CellSpec] = {
    spec.name: spec
    for spec in (
        CellSpec(
            name="rnn",
            title="RNN",
            cell="charlm.models.cells:RNNCell",
            channels=(signed("hidden", "h"),),
            feature_channel="hidden",
            recurrent_weights=True,
            native="charlm.models.native_layers:rnn_layer",
            fused="rnn_tanh",
            native_bf16=True,
        ),
        CellSpec(
            name="lstm",
            title="LSTM",
            cell="charlm.models.cells:LSTMCell",
            channels=_LSTM_CHANNELS,
            feature_channel="cell",
            recurrent_weights=True,
            native="charlm.models.native_layers:lstm_layer",
            fused="lstm",
            native_bf16=True,
        ),
        CellSpec(
            name="gru",
            title="GRU",
            cell="charlm.models.cells:GRUCell",
            channels=(gate("update"), gate("reset"), signed("hidden", "h")),
            feature_channel="hidden",
            recurrent_weights=True,
            native="charlm.models.native_layers:gru_layer",
            fused="gru",
            native_bf16=True,
        ),
        CellSpec(
            name="mingru",
            title="minGRU",
            cell="charlm.models.mingru:MinGRUCell",
            channels=(gate("update"), unbounded("candidate", "h~"), unbounded("hidden", "h")),
            feature_channel="hidden",
            recurrent_weights=False,
            native="charlm.models.mingru:native_layer",
            fused=None,
        ),
    )
}
CELL_TYPES: tuple[str, ...] = tuple(REGISTRY)  # the valid values of model.type, in this order


def lookup(cell_type: str) -> CellSpec:
    """The entry for `cell_type`, or a one-line error naming the valid types."""
    try:
        return REGISTRY[cell_type]
    except (KeyError, TypeError):
        raise CellTypeError(f"unknown cell type {cell_type!r}; choose from {', '.join(CELL_TYPES)}") from None


def resolve_backend(choice: str, cell_type: str, device_type: str, precision: str = "fp32") -> str:
    """The concrete backend to run `cell_type` with: `choice` itself unless it is auto.

    auto, on CUDA: fused (cuDNN) where the cell type has a kernel, since the native step loops
    launch several small kernels per time step there; on the CPU: CPU_AUTO; elsewhere (mps,
    unmeasured): native. `device_type` is "cuda", "cpu" or "mps"; `precision` is train.precision."""
    spec = lookup(cell_type)
    if choice != AUTO:
        return choice
    if device_type == "cuda":
        pick = "fused"
    elif device_type == "cpu":
        pick = CPU_AUTO.get(precision, {}).get(cell_type, "native")
    else:
        pick = "native"
    return next(b for b in (pick, "native", "reference") if b in spec.backends)


def describe_backend(choice: str, resolved: str | None) -> str:
    """How a run names its backend: 'auto -> fused' when auto picked it, else the backend itself."""
    if choice == AUTO:
        return f"auto -> {resolved}" if resolved else AUTO
    return choice


def spec_of(cell: object) -> CellSpec:
    """The entry whose cell class `cell` is an instance of (exactly, not a subclass)."""
    path = f"{type(cell).__module__}:{type(cell).__qualname__}"
    for spec in REGISTRY.values():
        if spec.cell == path:
            return spec
    raise ValueError(
        f"{path} is not a registered cell class; registered: {', '.join(s.cell for s in REGISTRY.values())}"
    )
