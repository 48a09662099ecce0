"""minGRU against a hand-written loop of its equations in float64, on every backend it supports:
outputs, final states and every parameter's gradient; gradcheck; chunked == whole; its errors."""

from __future__ import annotations

import pytest
import torch

from charlm.models.layers import RecurrentStack
from charlm.models.mingru import MinGRUCell, native_layer
from charlm.models.registry import CellTypeError, lookup

BACKENDS = lookup("mingru").backends


def by_hand(x: torch.Tensor, h0: torch.Tensor, layers: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's equations, step by step and layer by layer: x [T, B, D], h0 [L, B, H]."""
    finals = []
    for k, p in enumerate(layers):
        H = p["bias_ih"].shape[0] // 2
        W_z, W_h, b_z, b_h = p["weight_ih"][:H], p["weight_ih"][H:], p["bias_ih"][:H], p["bias_ih"][H:]
        h, outputs = h0[k], []
        for x_t in x:
            z = torch.sigmoid(x_t @ W_z.T + b_z)
            candidate = x_t @ W_h.T + b_h
            h = (1 - z) * h + z * candidate
            outputs.append(h)
        x = torch.stack(outputs)
        finals.append(h)
    return x, torch.stack(finals)


def hand_parameters(stack: RecurrentStack) -> list[dict]:
    return [{name: p.detach().clone().requires_grad_() for name, p in cell.named_parameters()} for cell in stack.layers]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers,batch", [(1, 1), (2, 3), (3, 4)])
def test_stack_equals_the_equations_by_hand(backend, layers, batch):
    torch.manual_seed(layers * 10 + batch)
    T, D, H = 7, 5, 6
    stack = RecurrentStack("mingru", D, H, layers, backend=backend).double()
    with torch.no_grad():  # non-zero biases, so a misplaced bias would show
        for cell in stack.layers:
            cell.bias_ih.normal_()
    params = hand_parameters(stack)
    x = torch.randn(T, batch, D, dtype=torch.float64)
    h0 = torch.randn(layers, batch, H, dtype=torch.float64)

    out, (h,) = stack(x, (h0,))
    want_out, want_h = by_hand(x, h0, params)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, want_h, atol=1e-12, rtol=0)

    weights = torch.randn_like(out)
    ((out * weights).sum() + (h * 0.7).sum()).backward()
    ((want_out * weights).sum() + (want_h * 0.7).sum()).backward()
    for k, cell in enumerate(stack.layers):
        assert sorted(name for name, _ in cell.named_parameters()) == ["bias_ih", "weight_ih"]
        for name, p in cell.named_parameters():
            torch.testing.assert_close(p.grad, params[k][name].grad, atol=1e-11, rtol=0, msg=f"{name} layer {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_equals_three_with_carried_state(backend):
    torch.manual_seed(1)
    stack = RecurrentStack("mingru", 4, 5, 2, backend=backend).double()
    x = torch.randn(12, 3, 4, dtype=torch.float64)
    full, full_state = stack(x, stack.init_state(3, dtype=torch.float64))
    state, pieces = stack.init_state(3, dtype=torch.float64), []
    for chunk in x.split(4):
        out, state = stack(chunk, state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(state[0], full_state[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_native_and_reference_agree(dtype, tol):
    torch.manual_seed(2)
    stack = RecurrentStack("mingru", 6, 8, 2, dropout=0.0).to(dtype)
    x, h0 = torch.randn(33, 4, 6, dtype=dtype), torch.randn(2, 4, 8, dtype=dtype)
    results = {}
    for backend in ("native", "reference"):
        stack.backend = backend
        out, (h,) = stack(x, (h0,))
        (out.sin().sum() + h.sum()).backward()
        results[backend] = (out.detach(), h.detach(), {n: p.grad.clone() for n, p in stack.named_parameters()})
        stack.zero_grad()
    (out_n, h_n, g_n), (out_r, h_r, g_r) = results["native"], results["reference"]
    torch.testing.assert_close(out_n, out_r, atol=tol, rtol=0)
    torch.testing.assert_close(h_n, h_r, atol=tol, rtol=0)
    for name in g_r:
        torch.testing.assert_close(g_n[name], g_r[name], atol=tol * 10, rtol=tol, msg=name)


def test_gradcheck_native_layer():
    """The hand-written backward: input, initial state, weight and bias, in float64."""
    torch.manual_seed(3)
    layer = NativeLayer(MinGRUCell(3, 4).double())
    with torch.no_grad():
        layer.cell.bias_ih.normal_()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def run_layer(x, h0, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x, h0))

    assert torch.autograd.gradcheck(run_layer, (x, h0, *params))


class NativeLayer(torch.nn.Module):
    """The cell run by its native layer, so functional_call can swap in parameters for gradcheck."""

    def __init__(self, cell: MinGRUCell):
        super().__init__()
        self.cell = cell

    def forward(self, x, h0):
        out, (h,) = native_layer(self.cell, x, (h0,))
        return out, h


def test_one_step_gradcheck_and_recorded_activations():
    torch.manual_seed(4)
    cell = MinGRUCell(3, 4).double()
    x, h0 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    record = {}
    (h,) = cell(x, (h0,), record)
    z, candidate = record["update"][0], record["candidate"][0]
    torch.testing.assert_close((1 - z) * h0 + z * candidate, h)
    torch.testing.assert_close(record["hidden"][0], h)
    assert ((0 <= z) & (z <= 1)).all()
    assert {c.name for c in lookup("mingru").channels} <= set(record)


def test_initialisation_is_as_documented():
    torch.manual_seed(0)
    cell = MinGRUCell(10, 8)
    assert not hasattr(cell, "weight_hh") and cell.weight_ih.shape == (16, 10) and cell.bias_ih.shape == (16,)
    assert torch.all(cell.bias_ih == 0)  # z starts at sigmoid(W_z x), centred on 0.5
    bound = (6 / (10 + 8)) ** 0.5  # Xavier uniform per [H, D] block
    assert cell.weight_ih.abs().max() <= bound


def test_unsupported_options_are_one_line_errors():
    with pytest.raises(
        CellTypeError,
        match=r"^model.type mingru cannot run on the fused backend .*; use native or "
        r"reference$",
    ):
        RecurrentStack("mingru", 3, 4, 1, backend="fused")
    stack = RecurrentStack("mingru", 3, 4, 1)
    with pytest.raises(CellTypeError, match="cannot run on the fused backend"):
        stack.backend = "fused"
    assert stack.backend == "native"
    with pytest.raises(CellTypeError, match="has no recurrent weights"):
        RecurrentStack("mingru", 3, 4, 1, weight_dropout=0.3)
    assert stack.recurrent_weights() == [None]
