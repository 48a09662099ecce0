"""The from-scratch cells and stacks against torch.nn.RNN / LSTM / GRU with the same weights
(every registered cell type torch has a module for; minGRU has its own tests, test_mingru.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from charlm.models.cells import LSTMCell
from charlm.models.layers import RecurrentStack
from charlm.models.registry import CELL_TYPES, lookup

# torch's fused kernels and the torch.nn modules that run them on the same parameter layout
TORCH_NN = {"rnn_tanh": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
WITH_TORCH_NN = [cell_type for cell_type in CELL_TYPES if lookup(cell_type).fused in TORCH_NN]
NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def reference_for(stack: RecurrentStack, cell_type: str, input_size: int) -> nn.Module:
    """A torch.nn module holding exactly the stack's weights."""
    ref = TORCH_NN[lookup(cell_type).fused](input_size, stack.hidden_size, stack.num_layers)
    ref = ref.to(next(stack.parameters()).dtype)
    with torch.no_grad():
        for k, cell in enumerate(stack.layers):
            for name in NAMES:
                getattr(ref, f"{name}_l{k}").copy_(getattr(cell, name))
    return ref


def run_reference(ref: nn.Module, x: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
    """torch.nn.LSTM takes and returns (h, c); RNN and GRU take and return h alone."""
    out, final = ref(x, state if len(state) > 1 else state[0])
    return out, (final if len(state) > 1 else (final,))


@pytest.mark.parametrize("cell_type,backend", [(t, b) for t in WITH_TORCH_NN for b in lookup(t).backends])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layers,batch", [(1, 1), (2, 3), (3, 5)])
def test_stack_matches_torch_nn(cell_type, backend, dtype, tol, layers, batch):
    torch.manual_seed(layers * 10 + batch)
    T, D, H = 7, 5, 6
    stack = RecurrentStack(cell_type, D, H, layers, backend=backend).to(dtype)
    ref = reference_for(stack, cell_type, D)
    x = torch.randn(T, batch, D, dtype=dtype)
    state = tuple(torch.randn(layers, batch, H, dtype=dtype) for _ in range(stack.state_size))

    out, final = stack(x, state)
    ref_out, ref_final = run_reference(ref, x, state)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=0)
    for ours, theirs in zip(final, ref_final):
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)

    # Gradients of every parameter, through outputs and final states alike.
    weights = torch.randn_like(out)
    (out * weights).sum().add(sum(s.sum() for s in final)).backward()
    (ref_out * weights).sum().add(sum(s.sum() for s in ref_final)).backward()
    for k, cell in enumerate(stack.layers):
        for name in NAMES:
            torch.testing.assert_close(
                getattr(cell, name).grad,
                getattr(ref, f"{name}_l{k}").grad,
                atol=tol * 10,
                rtol=0,
                msg=f"grad of {name} layer {k}",
            )


@pytest.mark.parametrize("cell_type", WITH_TORCH_NN)
def test_zero_initial_state_matches_torch_default(cell_type):
    torch.manual_seed(0)
    stack = RecurrentStack(cell_type, 4, 5, 2).double()
    ref = reference_for(stack, cell_type, 4)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    out, _ = stack(x, stack.init_state(3, dtype=torch.float64))
    ref_out, _ = ref(x)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_gradcheck_one_step(cell_type):
    torch.manual_seed(0)
    cell = lookup(cell_type).cell_class()(3, 4).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(cell.state_size))

    def step(x, *state_and_params):
        return cell(x, tuple(state_and_params[: cell.state_size]))

    assert torch.autograd.gradcheck(step, (x, *state))
    # and with respect to the weights, through a functional call
    params = {name: p.detach().clone().requires_grad_() for name, p in cell.named_parameters()}

    def by_weights(*values):
        return torch.func.functional_call(
            cell, dict(zip(params, values)), (x.detach(), tuple(s.detach() for s in state))
        )

    assert torch.autograd.gradcheck(by_weights, tuple(params.values()))


def test_lstm_equations_by_hand():
    """One LSTM step computed from the gate formulas, gate by gate (order i, f, g, o)."""
    torch.manual_seed(1)
    cell = LSTMCell(2, 3).double()
    x, h, c = (torch.randn(1, n, dtype=torch.float64) for n in (2, 3, 3))
    W = torch.cat([cell.weight_ih, cell.weight_hh], dim=1)  # [4H, D+H], acting on [x, h]
    b = cell.bias_ih + cell.bias_hh
    pre = torch.cat([x, h], dim=1) @ W.T + b
    i, f, g, o = pre.split(3, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    got_h, got_c = cell(x, (h, c))
    torch.testing.assert_close(got_h, h_new, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_c, c_new, atol=1e-12, rtol=0)


def test_initialisation_is_as_documented():
    torch.manual_seed(0)
    cell = LSTMCell(10, 8)
    H = 8
    bias = cell.bias_ih + cell.bias_hh
    assert torch.all(bias[H : 2 * H] == 1.0), "forget gate bias starts at 1"
    assert torch.all(bias[:H] == 0) and torch.all(bias[2 * H :] == 0)
    for k in range(4):  # each gate's recurrent block is orthogonal
        block = cell.weight_hh[k * H : (k + 1) * H].detach()
        torch.testing.assert_close(block @ block.T, torch.eye(H), atol=1e-5, rtol=0)
