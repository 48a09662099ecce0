"""The cell-type registry: every entry holds what it claims, unknown or unsupported choices are one
clear line on every path, and the registry (so the config) imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from charlm.config import ModelConfig
from charlm.models.layers import RecurrentStack
from charlm.models.model import CharLM
from charlm.models.registry import (
    AUTO,
    BACKENDS,
    CELL_TYPES,
    CPU_AUTO,
    CellTypeError,
    describe_backend,
    lookup,
    resolve_backend,
    spec_of,
)


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_entry_matches_its_cell(cell_type):
    spec = lookup(cell_type)
    cell = spec.cell_class()(3, 4).double()
    assert spec_of(cell) is spec and spec.name == cell_type
    assert spec.recurrent_weights == hasattr(cell, "weight_hh")
    assert spec.backends[-1] == "reference" and set(spec.backends) <= set(BACKENDS)
    if spec.native is not None:
        assert callable(spec.native_layer())
    if spec.fused is not None:
        assert callable(getattr(torch, spec.fused))
    # what viz reads: every channel (and h_t as "hidden") is recorded by step(), within its range
    record = {}
    state = tuple(torch.rand(2, 4, dtype=torch.float64) * 2 - 1 for _ in range(cell.state_size))  # as a step leaves it
    cell(torch.randn(2, 3, dtype=torch.float64) * 3, state, record)
    names = [channel.name for channel in spec.channels]
    assert "hidden" in record and spec.feature_channel in names and len(set(names)) == len(names)
    for channel in spec.channels:
        values = record[channel.name][0]
        assert values.shape == (2, 4)
        assert ((channel.low <= values) & (values <= channel.high)).all(), channel.name


def test_unknown_cell_type_is_one_line_naming_the_valid_types():
    valid = ", ".join(CELL_TYPES)
    unchecked = ModelConfig.model_construct(type="lstmm")  # what the model says, not the schema
    for make in (lambda: RecurrentStack("lstmm", 3, 4, 1), lambda: CharLM(unchecked, 5), lambda: lookup(["lstm"])):
        with pytest.raises(CellTypeError) as err:
            make()
        assert str(err.value).endswith(f"; choose from {valid}") and "\n" not in str(err.value)


def test_unknown_backend_is_one_line():
    with pytest.raises(CellTypeError, match=r"^unknown backend 'turbo'; choose from native, fused, reference$"):
        RecurrentStack("lstm", 3, 4, 1, backend="turbo")
    stack = RecurrentStack("gru", 3, 4, 1)
    with pytest.raises(CellTypeError, match="unknown backend"):
        stack.backend = "turbo"
    assert stack.backend == "native"


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_auto_resolves_to_a_backend_the_cell_type_runs_on(cell_type):
    """On CUDA cuDNN where torch has a kernel; on the CPU the measured table, native where it says
    nothing; elsewhere native. A concrete choice is kept whatever the device."""
    spec = lookup(cell_type)
    assert resolve_backend(AUTO, cell_type, "cuda", "bf16") == ("fused" if spec.fused else "native")
    assert resolve_backend(AUTO, cell_type, "cpu", "fp32") == CPU_AUTO["fp32"].get(cell_type, "native")
    assert resolve_backend(AUTO, cell_type, "cpu", "bf16") == "native"
    assert resolve_backend(AUTO, cell_type, "mps", "fp32") == "native"
    for device_type in ("cuda", "cpu", "mps"):
        assert resolve_backend(AUTO, cell_type, device_type, "fp16") in spec.backends
        assert resolve_backend("reference", cell_type, device_type, "fp32") == "reference"
    assert resolve_backend(AUTO, "lstm", "cpu", "fp32") == "fused"  # oneDNN's LSTM, measured faster


def test_auto_never_reaches_the_model():
    for make in (lambda: RecurrentStack("lstm", 3, 4, 1, backend=AUTO), lambda: CharLM(ModelConfig(type="gru"), 5)):
        with pytest.raises(CellTypeError, match=r"^backend 'auto' reached the model unresolved; resolve it first"):
            make()
    assert describe_backend(AUTO, "fused") == "auto -> fused" and describe_backend("native", "native") == "native"


def test_an_unregistered_cell_class_is_named():
    with pytest.raises(ValueError, match="torch.nn.modules.linear:Linear is not a registered cell class"):
        spec_of(torch.nn.Linear(2, 2))


def test_registry_and_config_import_no_torch():
    code = "import sys, charlm.models.registry, charlm.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
