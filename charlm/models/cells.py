"""The recurrent cells, written from scratch from README's equations (How it works, Models): one time step each.

Shapes: B batch, D input size, H hidden size, G gates (RNN 1, LSTM 4, GRU 3).
Parameters use torch.nn's names and layout (weight_ih [G*H, D], weight_hh [G*H, H],
bias_ih [G*H], bias_hh [G*H]; LSTM gate order i, f, g, o; GRU r, z, n), so their values
copy straight into torch.nn.RNN / LSTM / GRU, which the tests use as the reference.

Each cell splits a step in two so a layer can project all T inputs in one matmul:
    gx = project_input(x)   = W_ih x_t + biases           (any number of steps at once)
    state = step(gx, state)  adds W_hh h_{t-1} and applies the gate equations
`forward(x, state)` is the two together: the plain one-step cell. `step` takes an optional
`weight_hh` in place of the parameter: a layer passes a DropConnect-masked copy of it
(model.weight_dropout), the same for every step of a window. These steps, run by
autograd, are the readable reference; native_layers.py runs the same equations as native
step loops with a hand-written backward, tested against them. registry.py names each cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]  # per cell: (h,) for the RNN, (h, c) for the LSTM, each [B, H]
Gates = dict[str, list[torch.Tensor]]  # a step's activations by name, one [B, H] per step recorded


class Cell(nn.Module):
    """What every cell provides: the state tensors named in `state_names` ([B, H] each, h first),
    project_input(x) for any number of steps, step(gx, state, record, weight_hh) for one, and init_state."""

    state_names: tuple[str, ...] = ("h",)  # what the state tensors are called (the ONNX export's inputs)
    weight_ih: nn.Parameter  # every cell projects its input: [G*H, D]

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size

    @property
    def state_size(self) -> int:
        return len(self.state_names)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return tuple(zeros.clone() for _ in range(self.state_size))

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> the input side of every gate [..., G*H], for any number of steps at once."""
        raise NotImplementedError

    def step(
        self, gx: torch.Tensor, state: State, record: Gates | None = None, weight_hh: torch.Tensor | None = None
    ) -> State:
        """One time step from the projected input gx [B, G*H]; returns the new state."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: State, record: Gates | None = None) -> State:
        """One time step from the raw input x [B, D]; returns the new state."""
        return self.step(self.project_input(x), state, record)


class TorchLayoutCell(Cell):
    """A cell in torch.nn's layout, with a recurrent weight: weight_ih, weight_hh, bias_ih, bias_hh."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        gh = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gh, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gh, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gh))
        self.bias_hh = nn.Parameter(torch.empty(gh))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation, gate block by gate block (each block is one [H, D] / [H, H] matrix):
        - weight_ih: Glorot/Xavier uniform, so a gate's input term starts with unit-order
          variance whatever D is (D is V for one-hot input, E for an embedding);
        - weight_hh: orthogonal (Saxe et al. 2014): the recurrent map starts norm-preserving,
          so gradients neither vanish nor explode through the first long BPTT windows;
        - biases: zero, except where a cell says otherwise (the LSTM forget gate)."""
        H = self.hidden_size
        with torch.no_grad():
            for k in range(self.gates):
                nn.init.xavier_uniform_(self.weight_ih[k * H : (k + 1) * H])
                nn.init.orthogonal_(self.weight_hh[k * H : (k + 1) * H])
            self.bias_ih.zero_()
            self.bias_hh.zero_()

    def input_bias(self) -> torch.Tensor:
        """The biases that act on the input side: b_ih + b_hh (both fold in here)."""
        return self.bias_ih + self.bias_hh

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """W_ih x + input_bias() for x [..., D] -> [..., G*H]."""
        return F.linear(x, self.weight_ih, self.input_bias())


class RNNCell(TorchLayoutCell):
    """Vanilla (Elman) RNN: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    (README's W_ih = the equations' W_xh, and b_ih + b_hh = b_h; the two-bias form is torch.nn's.)
    """

    gates = 1

    def step(
        self, gx: torch.Tensor, state: State, record: Gates | None = None, weight_hh: torch.Tensor | None = None
    ) -> State:
        (h,) = state
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        h = torch.tanh(torch.addmm(gx, h, w_hh.t()))  # [B, H]
        record_activations(record, hidden=h)
        return (h,)


class LSTMCell(TorchLayoutCell):
    """LSTM with gates i, f, g, o computed from [h_{t-1}, x_t]:

    i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)    input gate
    f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)    forget gate
    g_t = tanh   (W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)    candidate values
    o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)    output gate
    c_t = f_t * c_{t-1} + i_t * g_t
    h_t = o_t * tanh(c_t)
    """

    gates = 4
    state_names = ("h", "c")
    forget_bias = 1.0

    def reset_parameters(self) -> None:
        """As `TorchLayoutCell`, plus forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015):
        f_t starts near sigmoid(1) = 0.73 instead of 0.5, so the cell keeps its memory and
        passes gradient back through c from the first steps, instead of halving it each step.
        It is put on bias_ih alone so the sum b_ih + b_hh, which the equations use, is 1."""
        super().reset_parameters()
        H = self.hidden_size
        with torch.no_grad():
            self.bias_ih[H : 2 * H].fill_(self.forget_bias)

    def step(
        self, gx: torch.Tensor, state: State, record: Gates | None = None, weight_hh: torch.Tensor | None = None
    ) -> State:
        h, c = state
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        gates = torch.addmm(gx, h, w_hh.t())  # [B, 4H]
        # chunk, not slicing: its backward is one concatenation instead of a zero-filled
        # [B, 4H] gradient per gate.
        i, f, g, o = gates.chunk(4, dim=1)  # each [B, H]
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g  # [B, H]
        h = o * torch.tanh(c)  # [B, H]
        record_activations(record, input=i, forget=f, candidate=g, output=o, cell=c, hidden=h)
        return (h, c)


class GRUCell(TorchLayoutCell):
    """GRU (Cho et al. 2014) in torch.nn's form, gates r (reset), z (update), n (new):

        r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n_t = tanh   (W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}

    b_hn sits inside r_t * (...), so only the r and z parts of bias_hh fold into gx.
    """

    gates = 3

    def input_bias(self) -> torch.Tensor:
        H = self.hidden_size
        return torch.cat([self.bias_ih[: 2 * H] + self.bias_hh[: 2 * H], self.bias_ih[2 * H :]])

    def recurrent_bias(self) -> torch.Tensor:
        """[0, 0, b_hn]: the part of bias_hh that stays on the hidden side."""
        H = self.hidden_size
        return torch.cat([self.bias_hh.new_zeros(2 * H), self.bias_hh[2 * H :]])

    def step(
        self, gx: torch.Tensor, state: State, record: Gates | None = None, weight_hh: torch.Tensor | None = None
    ) -> State:
        (h,) = state
        w_hh = self.weight_hh if weight_hh is None else weight_hh
        gh = torch.addmm(self.recurrent_bias(), h, w_hh.t())  # [B, 3H]
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        record_activations(record, reset=r, update=z, new=n, hidden=h)
        return (h,)


def record_activations(record: Gates | None, **activations: torch.Tensor) -> None:
    """Append this step's activations ([B, H] each) to `record`: what the equations computed,
    exposed for inspection (charlm viz) without a second implementation."""
    if record is not None:
        for name, value in activations.items():
            record.setdefault(name, []).append(value.detach())
