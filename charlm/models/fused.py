"""The fused backend: torch's own kernels (torch.lstm / gru / rnn_tanh: oneDNN on the CPU, cuDNN on
CUDA) run on a stack's cells, whose weights on CUDA live in the one flat buffer cuDNN reads.

It takes the cells and the kernel's name, not the stack that holds them (layers.py), so the two
modules do not import each other."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch

from charlm.models.cells import State, TorchLayoutCell

# What cuDNN says (once per process) when it must copy the weights into a flat buffer for a call.
NOT_FLAT_WARNING = "RNN module weights are not part of single contiguous chunk of memory"


def layer_weights(cells: Sequence[TorchLayoutCell], recurrent: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer k: weight_ih, recurrent[k] (weight_hh, or its masked copy), bias_ih, bias_hh: torch.nn.RNN's order."""
    return [w for cell, w_hh in zip(cells, recurrent) for w in (cell.weight_ih, w_hh, cell.bias_ih, cell.bias_hh)]


def run_fused(
    kernel: str,
    cells: Sequence[TorchLayoutCell],
    recurrent: Sequence[torch.Tensor],
    x: torch.Tensor,
    state: State,
    dropout: float,
    training: bool,
) -> tuple[torch.Tensor, State]:
    """x [T, B, D], state tuple of [L, B, H] -> top layer outputs [T, B, H], new state, through torch.<kernel>.

    `cells` are the L layers to run (state and result hold just theirs), `recurrent` their weight_hh
    for this call; torch's kernel applies per-element dropout `dropout` between them while `training`."""
    weights = layer_weights(cells, recurrent)
    hx = tuple(s.contiguous() for s in state)  # cuDNN refuses a strided state: a micro-batch's rows of [L, B, H]
    leave_autocast = _autocast_would_change_the_dtype(x.device.type)
    if leave_autocast:
        x, hx = x.to(weights[0].dtype), tuple(s.to(weights[0].dtype) for s in hx)
    copies = x.is_cuda and any(w is not cell.weight_hh for w, cell in zip(recurrent, cells))
    with _outside_autocast(x.device.type, leave_autocast), _expected_copy(copies):
        # torch.lstm takes (h, c), the others h alone
        out, *final = getattr(torch, kernel)(
            x, hx if len(hx) > 1 else hx[0], weights, True, len(cells), dropout, training, False, False
        )  # has biases, ..., not bidirectional, not batch-first
    return out, tuple(final)


def autocast_runs_kernel_in(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast to `dtype` runs the fused kernel in `dtype` on `device_type`.

    Not on CUDA for anything but float16: cuDNN's autocast wrapper (ATen's AutocastRNN.cpp) casts
    input, state and weights to float16 whatever dtype autocast was asked for, so bf16 autocast
    would train the recurrence in fp16 without the loss scaling fp16 needs."""
    return device_type != "cuda" or dtype == torch.float16


def _autocast_would_change_the_dtype(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) and not autocast_runs_kernel_in(
        device_type, torch.get_autocast_dtype(device_type)
    )


def _outside_autocast(device_type: str, leave: bool):
    """There the kernel runs in the weights' precision (float32; cuDNN may use TF32, see
    charlm.training.runtime.allow_tf32); the layers around it stay under autocast."""
    return torch.autocast(device_type, enabled=False) if leave else contextlib.nullcontext()


@contextlib.contextmanager
def _expected_copy(copies: bool):
    """With weight dropout, cuDNN gets a masked weight_hh that is not in the flat buffer and copies
    the weights for that call (what every call did before flattening); its warning would only alarm."""
    if not copies:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOT_FLAT_WARNING)
        yield


def flatten_for_cudnn(kernel: str | None, cells: Sequence[TorchLayoutCell]) -> bool:
    """Move the cells' weights into the one flat buffer cuDNN reads, as torch.nn.LSTM does; True if done.

    Without it every cuDNN call allocates, zero-fills and fills a flat copy of all weights. Each
    parameter stays the same object under the same name, with the same values: only its storage
    moves into a slice of the buffer. So call this before anything holds the parameters' storage
    (the weight average's tensors, DDP); moving the model (`.to()`) calls it again."""
    if kernel is None:
        return False
    weights = layer_weights(cells, [cell.weight_hh for cell in cells])
    if not _cudnn_reads_in_place(weights):
        return False
    first = weights[0]
    with torch.cuda.device_of(first), torch.no_grad():  # it writes into the parameters
        torch._cudnn_rnn_flatten_weight(
            weights, 4, first.shape[1], cudnn_mode(kernel), cells[0].hidden_size, 0, len(cells), False, False
        )  # 4 per layer, no projection, ...
    return True


def _cudnn_reads_in_place(weights: list[torch.Tensor]) -> bool:
    """cuDNN runs these weights: all on CUDA, of one dtype it accepts, no two sharing memory."""
    if not all(w.is_cuda for w in weights) or not torch._use_cudnn_rnn_flatten_weight():
        return False
    dtype = weights[0].dtype
    return all(w.dtype == dtype and torch.backends.cudnn.is_acceptable(w) for w in weights) and len(
        {w.data_ptr() for w in weights}
    ) == len(weights)


def cudnn_mode(kernel: str) -> int:
    """cuDNN's RNN mode for torch's kernel name: lstm -> LSTM, gru -> GRU, rnn_tanh -> RNN_TANH."""
    from torch.backends.cudnn import rnn  # noqa: PLC0415 - its mode table needs a CUDA build

    return rnn.get_cudnn_mode(kernel.upper())
