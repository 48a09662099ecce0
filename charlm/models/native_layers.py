"""The native backend of the rnn, lstm and gru cells: one layer over all T steps as an
autograd.Function whose forward and hand-written backward run the step loops of native.py.

Time-major, as in layers.py: x [T, B, D], outputs [T, B, H], per-layer state tensors [B, H].
"""

from __future__ import annotations

import torch
from torch import nn

from charlm.models.cells import State
from charlm.models.native import step_loops


def _project(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """W_ih x_t + bias for all T steps in one matmul: x [T, B, D] -> [T, B, G*H] (a new tensor)."""
    T, B, D = x.shape
    return torch.addmm(bias, x.reshape(T * B, D), w_ih.t()).view(T, B, -1)


def _projection_grads(ctx, dgx: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor):
    """Grads of x, w_ih and bias from the grad of the projected input dgx [T, B, G*H]."""
    flat = dgx.reshape(-1, dgx.shape[2])  # [T*B, G*H]
    dx = (flat @ w_ih).view_as(x) if ctx.needs_input_grad[0] else None
    return dx, flat.t() @ x.reshape(-1, x.shape[2]), flat.sum(0)


class _LSTMLayer(torch.autograd.Function):
    """One LSTM layer over T steps: forward and hand-written backward in the native loops."""

    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, c0, w_hh):
        loops = step_loops(x)
        gates = _project(x, w_ih, bias)
        hs, cs = loops.lstm_forward(gates, h0, c0, w_hh)  # gates now hold the activations
        ctx.loops = loops
        ctx.save_for_backward(x, w_ih, gates, hs, cs, h0, c0, w_hh)
        return hs, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx, dhs, dh_last, dc_last):
        x, w_ih, gates, hs, cs, h0, c0, w_hh = ctx.saved_tensors
        dgx, dh0, dc0, dw_hh = ctx.loops.lstm_backward(dhs.contiguous(), dh_last, dc_last, gates, hs, cs, h0, c0, w_hh)
        return (*_projection_grads(ctx, dgx, x, w_ih), dh0, dc0, dw_hh)


class _RNNLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, w_hh):
        loops = step_loops(x)
        hs = loops.rnn_forward(_project(x, w_ih, bias), h0, w_hh)  # [T, B, H]
        ctx.loops = loops
        ctx.save_for_backward(x, w_ih, hs, h0, w_hh)
        return hs, hs[-1].clone()

    @staticmethod
    def backward(ctx, dhs, dh_last):
        x, w_ih, hs, h0, w_hh = ctx.saved_tensors
        dgx, dh0, dw_hh = ctx.loops.rnn_backward(dhs.contiguous(), dh_last, hs, h0, w_hh)
        return (*_projection_grads(ctx, dgx, x, w_ih), dh0, dw_hh)


class _GRULayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, w_hh, b_hn):
        loops = step_loops(x)
        hs, acts, ghn = loops.gru_forward(_project(x, w_ih, bias), h0, w_hh, b_hn)  # [T, B, H], [T, B, 3H], [T, B, H]
        ctx.loops = loops
        ctx.save_for_backward(x, w_ih, acts, ghn, hs, h0, w_hh)
        return hs, hs[-1].clone()

    @staticmethod
    def backward(ctx, dhs, dh_last):
        x, w_ih, acts, ghn, hs, h0, w_hh = ctx.saved_tensors
        dgx, dh0, dw_hh, db_hn = ctx.loops.gru_backward(dhs.contiguous(), dh_last, acts, ghn, hs, h0, w_hh)
        return (*_projection_grads(ctx, dgx, x, w_ih), dh0, dw_hh, db_hn)


# The registry's `native` entries: (cell, x [T, B, D] contiguous, state, weight_hh) -> (outputs [T, B, H], state).

def lstm_layer(cell: nn.Module, x: torch.Tensor, state: State, w_hh: torch.Tensor) -> tuple[torch.Tensor, State]:
    h0, c0 = (s.contiguous() for s in state)
    hs, h, c = _LSTMLayer.apply(x, cell.weight_ih, cell.input_bias(), h0, c0, w_hh)
    return hs, (h, c)


def rnn_layer(cell: nn.Module, x: torch.Tensor, state: State, w_hh: torch.Tensor) -> tuple[torch.Tensor, State]:
    hs, h = _RNNLayer.apply(x, cell.weight_ih, cell.input_bias(), state[0].contiguous(), w_hh)
    return hs, (h,)


def gru_layer(cell: nn.Module, x: torch.Tensor, state: State, w_hh: torch.Tensor) -> tuple[torch.Tensor, State]:
    b_hn = cell.bias_hh[2 * cell.hidden_size:]  # stays on the hidden side: r_t * (W_hn h + b_hn)
    hs, h = _GRULayer.apply(x, cell.weight_ih, cell.input_bias(), state[0].contiguous(), w_hh, b_hn)
    return hs, (h,)
