"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?"): a GRU whose gate reads x_t alone.
Its cell (the reference step) and its native layer (an elementwise scan with a hand-written
backward); registry.py names it `mingru`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models.cells import Cell, Gates, State, record_activations


class MinGRUCell(Cell):
    """minGRU, with the update gate z and the candidate h~ computed from x_t only:

        z_t  = sigmoid(W_z x_t + b_z)              update gate
        h~_t = W_h x_t + b_h                       candidate (linear: no tanh)
        h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

    Parameters: weight_ih [2H, D] (blocks z, h~) and bias_ih [2H]. No gate reads h_{t-1}, so
    there is no weight_hh (nothing for model.weight_dropout to drop) and project_input gives
    every step's gates at once; step() only mixes."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        self.weight_ih = nn.Parameter(torch.empty(2 * hidden_size, input_size))
        self.bias_ih = nn.Parameter(torch.empty(2 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight_ih: Xavier/Glorot uniform per block, as the other cells, so z's pre-activation
        and h~ start with unit-order variance whatever D is; bias 0, so z starts near 0.5
        (each step keeps about half of h_{t-1}) and h~ unbiased."""
        H = self.hidden_size
        with torch.no_grad():
            for k in range(2):
                nn.init.xavier_uniform_(self.weight_ih[k * H : (k + 1) * H])
            self.bias_ih.zero_()

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """[W_z; W_h] x + [b_z; b_h] for x [..., D] -> [..., 2H]."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def step(
        self, gx: torch.Tensor, state: State, record: Gates | None = None, weight_hh: torch.Tensor | None = None
    ) -> State:
        assert weight_hh is None, "minGRU has no recurrent weight"
        (h,) = state
        pre_z, candidate = gx.chunk(2, dim=-1)  # each [B, H]
        z = torch.sigmoid(pre_z)
        h = (1 - z) * h + z * candidate  # [B, H]
        record_activations(record, update=z, candidate=candidate, hidden=h)
        return (h,)


def scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t for t = 1..T, elementwise: a, b [T, B, H], h0 [B, H] -> hs [T, B, H]."""
    hs = torch.empty_like(b)
    h = h0
    for t in range(b.shape[0]):
        h = torch.addcmul(b[t], a[t], h, out=hs[t])  # one fused pass over [B, H] per step
    return hs


def reverse_scan(a: torch.Tensor, dhs: torch.Tensor, dh_last: torch.Tensor) -> torch.Tensor:
    """g_t, the whole gradient reaching h_t: g_T = dhs_T + dh_last, g_t = dhs_t + a_{t+1} * g_{t+1}."""
    g = torch.empty_like(dhs)
    torch.add(dhs[-1], dh_last, out=g[-1])
    for t in range(dhs.shape[0] - 2, -1, -1):
        torch.addcmul(dhs[t], a[t + 1], g[t + 1], out=g[t])
    return g


class _MinGRULayer(torch.autograd.Function):
    """One layer over T steps. Forward: one matmul gives every step's gates gx = [z_pre, h~]
    [T, B, 2H], one sigmoid, then the scan with a = 1 - z, b = z * h~. Backward: the reverse
    scan gives g_t = dL/dh_t, then dh~ = g z, dz_pre = g (h~ - h_{t-1}) z (1 - z), dh0 = a_1 g_1,
    and the weight gradient of all T steps in one matmul."""

    @staticmethod
    def forward(ctx, x, w_ih, b_ih, h0):
        T, B, D = x.shape
        H = h0.shape[1]
        gx = torch.addmm(b_ih, x.reshape(T * B, D), w_ih.t()).view(T, B, 2 * H)
        z, candidate = gx[..., :H].sigmoid_(), gx[..., H:]  # views of gx: it now holds z and h~
        a = 1 - z  # [T, B, H]
        hs = scan(a, z * candidate, h0)
        ctx.save_for_backward(x, w_ih, gx, a, hs, h0)
        return hs, hs[-1].clone()

    @staticmethod
    def backward(ctx, dhs, dh_last):
        x, w_ih, gx, a, hs, h0 = ctx.saved_tensors
        T, B, D = x.shape
        H = h0.shape[1]
        z, candidate = gx[..., :H], gx[..., H:]
        g = reverse_scan(a, dhs.contiguous(), dh_last)  # [T, B, H]
        dgx = torch.empty_like(gx)  # [T, B, 2H]: d z_pre, d h~
        dz = dgx[..., :H]
        torch.sub(candidate[0], h0, out=dz[0])
        torch.sub(candidate[1:], hs[:-1], out=dz[1:])  # h~_t - h_{t-1}
        dz.mul_(g).mul_(z).mul_(a)
        torch.mul(g, z, out=dgx[..., H:])
        flat = dgx.view(T * B, 2 * H)
        dx = (flat @ w_ih).view(T, B, D) if ctx.needs_input_grad[0] else None
        return dx, flat.t() @ x.reshape(T * B, D), flat.sum(0), a[0] * g[0]


def native_layer(
    cell: MinGRUCell, x: torch.Tensor, state: State, weight_hh: torch.Tensor | None = None
) -> tuple[torch.Tensor, State]:
    """The layer over x [T, B, D] -> outputs [T, B, H], (h_T,)."""
    assert weight_hh is None, "minGRU has no recurrent weight"
    hs, h = _MinGRULayer.apply(x, cell.weight_ih, cell.bias_ih, state[0].contiguous())
    return hs, (h,)
