"""The native backend of the rnn, lstm and gru cells: one layer over all T steps as an
autograd.Function whose forward and hand-written backward run the step loops of native.py.
With bf16 input (autocast bf16 on the CPU) the mixed-precision loops run instead: bf16 GEMMs,
fp32 gate arithmetic and carried state (csrc/recurrent_bf16.cpp).

Time-major, as in layers.py: x [T, B, D], outputs [T, B, H], per-layer state tensors [B, H].
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from charlm.models.cells import State, TorchLayoutCell
from charlm.models.native import cpp_loops, step_loops


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


def _cpp() -> Any:
    """The C++ loops, which the bf16 paths need: layers.native_loop sends bf16 only where they are built."""
    ops = cpp_loops()
    assert ops is not None, "the bf16 step loops run only where the C++ build loaded"
    return ops


def _project_bf16(x: torch.Tensor, w_ih: torch.Tensor) -> torch.Tensor:
    """W_ih x_t for all T steps, bf16 [T, B, G*H]; the bias is added in fp32 inside the loop."""
    T, B, D = x.shape
    return torch.mm(x.reshape(T * B, D), w_ih.t()).view(T, B, -1)


def _projection_grads_bf16(ctx, dgx: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor):
    """As _projection_grads for bf16 dgx, x and w_ih: bf16 GEMMs; the bias grad summed in fp32."""
    flat = dgx.reshape(-1, dgx.shape[2])  # [T*B, G*H]
    dx = (flat @ w_ih).view_as(x) if ctx.needs_input_grad[0] else None
    return dx, flat.t() @ x.reshape(-1, x.shape[2]), _cpp().column_sums_bf16(flat)


class _LSTMLayerBF16(torch.autograd.Function):
    """_LSTMLayer with bf16 x, w_ih, w_hh (and outputs) and fp32 bias, state and gate arithmetic."""

    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, c0, w_hh):
        acts, hs, cs = _cpp().lstm_forward_bf16(_project_bf16(x, w_ih), bias, h0, c0, w_hh)
        ctx.save_for_backward(x, w_ih, acts, hs, cs, h0, c0, w_hh)
        return hs, hs[-1].float(), cs[-1].clone()

    @staticmethod
    def backward(ctx, dhs, dh_last, dc_last):
        x, w_ih, acts, hs, cs, h0, c0, w_hh = ctx.saved_tensors
        dg, dh0, dc0, dw_hh = _cpp().lstm_backward_bf16(dhs.contiguous(), dh_last, dc_last, acts, cs, h0, c0, hs, w_hh)
        return (*_projection_grads_bf16(ctx, dg, x, w_ih), dh0, dc0, dw_hh)


class _RNNLayerBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, w_hh):
        hs = _cpp().rnn_forward_bf16(_project_bf16(x, w_ih), bias, h0, w_hh)  # [T, B, H] bf16
        ctx.save_for_backward(x, w_ih, hs, h0, w_hh)
        return hs, hs[-1].float()

    @staticmethod
    def backward(ctx, dhs, dh_last):
        x, w_ih, hs, h0, w_hh = ctx.saved_tensors
        dg, dh0, dw_hh = _cpp().rnn_backward_bf16(dhs.contiguous(), dh_last, hs, h0, w_hh)
        return (*_projection_grads_bf16(ctx, dg, x, w_ih), dh0, dw_hh)


class _GRULayerBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, bias, h0, w_hh, b_hn):
        hs_b, hs, acts, ghn = _cpp().gru_forward_bf16(_project_bf16(x, w_ih), bias, h0, w_hh, b_hn)
        ctx.save_for_backward(x, w_ih, acts, ghn, hs, hs_b, h0, w_hh)
        return hs_b, hs[-1].clone()

    @staticmethod
    def backward(ctx, dhs, dh_last):
        x, w_ih, acts, ghn, hs, hs_b, h0, w_hh = ctx.saved_tensors
        dgx, dh0, dw_hh, db_hn = _cpp().gru_backward_bf16(dhs.contiguous(), dh_last, acts, ghn, hs, hs_b, h0, w_hh)
        return (*_projection_grads_bf16(ctx, dgx, x, w_ih), dh0, dw_hh, db_hn)


_INFERENCE_COPIES: dict[
    int, tuple[weakref.ref, int, torch.Tensor]
] = {}  # id(weight) -> (weakref to it, its _version, its bf16 copy)


def _bf16(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 copy of an fp32 weight. With gradients on, a differentiable cast (autograd casts
    the grad back to fp32). Without (sampling, evaluation), one copy per weight is kept until
    the weight changes: generation calls each layer once per character, and re-casting the
    weights every step would cost more than the step."""
    if torch.is_grad_enabled():
        return weight.to(torch.bfloat16)
    key = id(weight)
    cached = _INFERENCE_COPIES.get(key)
    if cached is None or cached[0]() is not weight or cached[1] != weight._version:
        owner = weakref.ref(weight, functools.partial(_forget_copy, key))
        cached = (owner, weight._version, weight.detach().to(torch.bfloat16))
        _INFERENCE_COPIES[key] = cached
    return cached[2]


def _forget_copy(key: int, _: weakref.ref) -> None:
    """The weight is gone: so is its copy."""
    _INFERENCE_COPIES.pop(key, None)


# The registry's `native` entries: (cell, x [T, B, D] contiguous, state, weight_hh) -> (outputs [T, B, H], state).

# With bf16 x (layers.native_loop casts it so under CPU autocast bf16), the mixed-precision loops run.


def lstm_layer(cell: TorchLayoutCell, x: torch.Tensor, state: State, w_hh: torch.Tensor) -> tuple[torch.Tensor, State]:
    h0, c0 = (s.contiguous() for s in state)
    if x.dtype == torch.bfloat16 and not torch.is_grad_enabled():  # nothing kept for a backward
        hs, c = _cpp().lstm_infer_bf16(_project_bf16(x, _bf16(cell.weight_ih)), cell.input_bias(), h0, c0, _bf16(w_hh))
        h = hs[-1].float()
    elif x.dtype == torch.bfloat16:
        hs, h, c = _LSTMLayerBF16.apply(x, _bf16(cell.weight_ih), cell.input_bias(), h0, c0, _bf16(w_hh))
    else:
        hs, h, c = _LSTMLayer.apply(x, cell.weight_ih, cell.input_bias(), h0, c0, w_hh)
    return hs, (h, c)


def rnn_layer(cell: TorchLayoutCell, x: torch.Tensor, state: State, w_hh: torch.Tensor) -> tuple[torch.Tensor, State]:
    h0 = state[0].contiguous()
    if x.dtype == torch.bfloat16:
        hs, h = _RNNLayerBF16.apply(x, _bf16(cell.weight_ih), cell.input_bias(), h0, _bf16(w_hh))
    else:
        hs, h = _RNNLayer.apply(x, cell.weight_ih, cell.input_bias(), h0, w_hh)
    return hs, (h,)


def gru_layer(cell: TorchLayoutCell, x: torch.Tensor, state: State, w_hh: torch.Tensor) -> tuple[torch.Tensor, State]:
    b_hn = cell.bias_hh[2 * cell.hidden_size :]  # stays on the hidden side: r_t * (W_hn h + b_hn)
    h0 = state[0].contiguous()
    if x.dtype == torch.bfloat16:
        hs, h = _GRULayerBF16.apply(x, _bf16(cell.weight_ih), cell.input_bias(), h0, _bf16(w_hh), b_hn)
    else:
        hs, h = _GRULayer.apply(x, cell.weight_ih, cell.input_bias(), h0, w_hh, b_hn)
    return hs, (h,)
