"""The native step loops (C++ and PyTorch) against the autograd reference: values, gradients, gradcheck."""

from __future__ import annotations

import shutil

import pytest
import torch

import charlm.models.native as native
import charlm.models.native_layers as native_layers
from charlm.models.layers import RecurrentStack, native_loop
from charlm.models.native import TORCH_LOOPS, cpp_loops
from charlm.models.registry import CELL_TYPES, lookup

NATIVE = [cell_type for cell_type in CELL_TYPES if "native" in lookup(cell_type).backends]
WITH_WEIGHT_HH = [cell_type for cell_type in CELL_TYPES if lookup(cell_type).recurrent_weights]


@pytest.fixture(params=["cpp", "torch"])
def loops(request, monkeypatch):
    """Run each test with the C++ loops and with the PyTorch loops (rnn, lstm and gru's native layers)."""
    if request.param == "torch":
        monkeypatch.setattr(native_layers, "step_loops", lambda like: TORCH_LOOPS)
    elif cpp_loops() is None:
        pytest.skip("the C++ step loop is not built here")
    return request.param


def run(stack, x, state):
    out, final = stack(x, state)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    ((out * weights).sum() + sum((s * 0.7).sum() for s in final)).backward()
    grads = {name: p.grad.clone() for name, p in stack.named_parameters()}
    stack.zero_grad()
    return out.detach(), [s.detach() for s in final], grads


# (hidden, batch): 8 x 4 takes ATen's step GEMM; in float32 on a CPU with AVX512, 48 x 5 takes
# the packed one (step_gemm.h) with a 16-unit panel and a 5-row tile left over, 64 x 8 whole tiles.
@pytest.mark.parametrize("hidden,batch", [(8, 4), (48, 5), (64, 8)])
@pytest.mark.parametrize("cell_type", NATIVE)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_native_equals_reference(loops, cell_type, dtype, tol, hidden, batch):
    torch.manual_seed(3)
    stack = RecurrentStack(cell_type, 6, hidden, 2).to(dtype)
    x = torch.randn(9, batch, 6, dtype=dtype)
    state = tuple(torch.randn(2, batch, hidden, dtype=dtype) for _ in range(stack.state_size))
    stack.backend = "reference"
    ref = run(stack, x, state)
    stack.backend = "native"
    got = run(stack, x, state)
    torch.testing.assert_close(got[0], ref[0], atol=tol, rtol=0)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], atol=tol * 10, rtol=0, msg=name)


class NativeLayer(torch.nn.Module):
    """A cell run by native_loop, so functional_call can swap in parameters for gradcheck."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x, state):
        out, final = native_loop(self.cell, x, state)
        return (out, *final)


@pytest.mark.parametrize("cell_type", NATIVE)
def test_native_layer_gradcheck(loops, cell_type):
    """gradcheck of the hand-written backward: input, initial state and every weight, in float64."""
    torch.manual_seed(0)
    layer = NativeLayer(RecurrentStack(cell_type, 3, 4, 1).double().layers[0])
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(layer.cell.state_size)]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    n = len(state)

    def run_layer(x, *rest):
        return torch.func.functional_call(layer, dict(zip(names, rest[n:])), (x, tuple(rest[:n])))

    assert torch.autograd.gradcheck(run_layer, (x, *state, *params))


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cpp_loops_build_here():
    assert cpp_loops() is not None


def test_failed_build_falls_back_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.delenv("CHARLM_NO_CPP", raising=False)

    def broken():
        raise RuntimeError("Error building extension 'charlm_recurrent'\nlong compiler output")

    monkeypatch.setattr(native, "_build", broken)
    assert native.step_loops(torch.zeros(1)) is TORCH_LOOPS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be built" in err and "PyTorch step loop" in err
    native.step_loops(torch.zeros(1))
    assert capsys.readouterr().err == ""  # said once


def test_no_cpp_switch(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CHARLM_NO_CPP", "1")
    assert native.step_loops(torch.zeros(1)) is TORCH_LOOPS


def test_other_dtypes_use_the_torch_loops():
    assert native.step_loops(torch.zeros(1, dtype=torch.bfloat16)) is TORCH_LOOPS


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_a_build_killed_midway_blocks_nothing(tmp_path):
    """A build folder left with a lock file (its process killed) must not stall later loads."""
    import subprocess
    import sys

    assert cpp_loops() is not None
    library = native.library_path()
    cache = tmp_path / "cache"
    (cache / ".build-killed").mkdir(parents=True)
    (cache / ".build-killed" / "lock").write_text("")
    shutil.copy(library, cache / library.name)
    shutil.copy(library.with_name(library.name + ".sha256"), cache)  # the checksum it was cached with
    code = "import charlm.models.native as n; assert n.cpp_loops() is not None; print('loaded')"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "CHARLM_CACHE_DIR": str(cache)},
    )
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr
    assert "building" not in result.stderr  # the cached library was used as is


@pytest.mark.parametrize("cell_type", WITH_WEIGHT_HH)
def test_weight_dropout_is_one_mask_per_window(loops, cell_type):
    """Training with weight_dropout = running the plain stack with each weight_hh replaced by
    F.dropout(weight_hh) drawn once (same RNG draws): one mask for all T steps, gradient
    reaching the parameter through the mask."""
    torch.manual_seed(4)
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    dropped = RecurrentStack(cell_type, 5, 6, 2, weight_dropout=0.4).double().train()
    plain = RecurrentStack(cell_type, 5, 6, 2).double().train()
    plain.load_state_dict(dropped.state_dict())
    state = tuple(torch.randn(2, 3, 6, dtype=torch.float64) for _ in range(plain.state_size))
    torch.manual_seed(11)
    masks = [torch.nn.functional.dropout(torch.ones_like(cell.weight_hh), 0.4) for cell in plain.layers]
    # the plain stack with masked weights, by the autograd reference
    with torch.no_grad():
        originals = [cell.weight_hh.clone() for cell in plain.layers]
        for cell, mask in zip(plain.layers, masks):
            cell.weight_hh.mul_(mask)
    plain.backend = "reference"
    want_out, want_final, want_grads = run(plain, x, state)
    for backend in lookup(cell_type).backends:
        dropped.backend = backend
        torch.manual_seed(11)
        out, final, grads = run(dropped, x, state)
        torch.testing.assert_close(out, want_out, atol=1e-10, rtol=0, msg=backend)
        for a, b in zip(final, want_final):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=backend)
        for k, mask in enumerate(masks):
            name = f"layers.{k}.weight_hh"
            # d/dW of f(W * m) = m * f'(W * m): the masked stack's grad, times the mask
            torch.testing.assert_close(grads[name], want_grads[name] * mask, atol=1e-9, rtol=0, msg=backend)
            assert (grads[name][mask == 0] == 0).all()
        torch.testing.assert_close(grads["layers.0.weight_ih"], want_grads["layers.0.weight_ih"], atol=1e-9, rtol=0)
    # eval mode: no mask, the weights as they are
    dropped.eval()
    dropped.backend = "reference"
    with torch.no_grad():
        for cell, w in zip(plain.layers, originals):
            cell.weight_hh.copy_(w)
    plain.eval()
    torch.testing.assert_close(dropped(x, state)[0], plain(x, state)[0], atol=0, rtol=0)


def nan_pattern(stack, x, state):
    with torch.no_grad():
        out, final = stack(x, state)
    return torch.isnan(out), [torch.isnan(s) for s in final]


@pytest.mark.parametrize(
    "cell_type,poison", [(t, "input") for t in CELL_TYPES] + [(t, "weight_hh") for t in WITH_WEIGHT_HH]
)
def test_every_backend_gives_the_same_non_finite_outcome(loops, cell_type, poison):
    """A NaN entering a gate comes out NaN in every backend: never quietly finite in one of them."""
    torch.manual_seed(5)
    stack = RecurrentStack(cell_type, 6, 8, 2)
    x = torch.randn(7, 3, 6)
    state = stack.init_state(3)
    if poison == "input":
        x[2, 1, 0] = float("nan")  # stream 1 from step 2 on; the other streams stay finite
    else:
        with torch.no_grad():
            stack.layers[0].weight_hh[0, 0] = float("nan")
    patterns = {}
    for backend in stack.spec.backends:
        stack.backend = backend
        patterns[backend] = nan_pattern(stack, x, state)
    out, final = patterns["reference"]
    assert out.any() and not out.all() if poison == "input" else out.any()
    for backend in set(patterns) - {"reference"}:
        assert torch.equal(patterns[backend][0], out), backend
        assert all(torch.equal(a, b) for a, b in zip(patterns[backend][1], final)), backend


# bf16 keeps 8 significant bits: unit roundoff u = 2^-9. A bf16 GEMM rounds its operands (x, W,
# h) and its result, each by at most u, and accumulates in fp32; the gate arithmetic and the
# carried state stay fp32. So each step's pre-activations carry a relative error of a few u,
# which the recurrence passes on without amplifying (the gates are contractions). Outputs and
# states are held to 8u norm-wise, gradients (twice the rounded GEMMs: forward and backward) to
# 16u; and for the LSTM, to no worse than 1.5x the error of oneDNN's own bf16 LSTM on the same
# weights, the kernel torch.nn.LSTM runs under autocast.
BF16 = [cell_type for cell_type in CELL_TYPES if lookup(cell_type).native_bf16]
U = 2.0**-9


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def run_autocast(stack, x, state, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out, final = stack(x, state)
    return run_outputs(out, final, stack)


def run_outputs(out, final, stack):
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    ((out.float() * weights).sum() + sum((s.float() * 0.7).sum() for s in final)).backward()
    grads = {name: p.grad.clone() for name, p in stack.named_parameters()}
    stack.zero_grad()
    return out.detach(), [s.detach() for s in final], grads


# (hidden, batch): 64 x 8 fills whole register tiles of the packed step GEMM; 48 x 5 leaves a
# 16-column panel and a 5-row tile over; 24 is no multiple of 16 and takes ATen's GEMM instead.
@pytest.mark.parametrize("hidden,batch", [(64, 8), (48, 5), (24, 3)])
@pytest.mark.parametrize("cell_type", BF16)
def test_bf16_native_equals_fp32_within_bf16_precision(cell_type, hidden, batch):
    if cpp_loops() is None:
        pytest.skip("the bf16 loops are C++ only")
    torch.manual_seed(7)
    stack = RecurrentStack(cell_type, 32, hidden, 2)
    x = torch.randn(48, batch, 32)
    state = tuple(0.5 * torch.randn(2, batch, hidden) for _ in range(stack.state_size))
    stack.backend = "reference"
    want = run_autocast(stack, x, state, bf16=False)  # fp32
    stack.backend = "native"
    got = run_autocast(stack, x, state, bf16=True)
    assert got[0].dtype == torch.bfloat16  # the mixed-precision loops ran, not the fp32 ones
    errors = {"output": relative_error(got[0], want[0])}
    errors.update({f"state {k}": relative_error(a, b) for k, (a, b) in enumerate(zip(got[1], want[1]))})
    assert all(U / 16 < e < 8 * U for e in errors.values()), errors  # > u/16: bf16 rounding really happened
    grad_errors = {name: relative_error(got[2][name], want[2][name]) for name in want[2]}
    assert max(grad_errors.values()) < 16 * U, grad_errors
    assert all(g.dtype == torch.float32 for g in got[2].values())  # fp32 master weights get fp32 grads
    if cell_type == "lstm" and hidden == 64:
        stack.backend = "fused"
        onednn = run_autocast(stack, x, state, bf16=True)
        assert errors["output"] < 1.5 * relative_error(onednn[0], want[0])
        assert max(grad_errors.values()) < 1.5 * max(relative_error(onednn[2][n], want[2][n]) for n in want[2])


@pytest.mark.parametrize("hidden,steps", [(8, 7), (48, 9)])  # ATen's step GEMM; the packed one
def test_bf16_lstm_without_gradients_equals_the_training_forward(hidden, steps):
    if cpp_loops() is None:
        pytest.skip("the bf16 loops are C++ only")
    torch.manual_seed(11)
    stack = RecurrentStack("lstm", 6, hidden, 2)
    stack.backend = "native"
    x = torch.randn(steps, 3, 6)
    state = stack.init_state(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = stack(x, state)  # gradients on: the loop that keeps the gates for a backward
        with torch.no_grad():
            inferred = stack(x, state)  # the loop that keeps only h and the last c
    assert torch.equal(trained[0].detach(), inferred[0])
    for a, b in zip(trained[1], inferred[1]):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("hidden,steps", [(8, 7), (16, 9)])  # ATen's step GEMM; the packed one
@pytest.mark.parametrize("cell_type", BF16)
def test_bf16_nan_comes_out_nan(cell_type, hidden, steps):
    if cpp_loops() is None:
        pytest.skip("the bf16 loops are C++ only")
    torch.manual_seed(5)
    stack = RecurrentStack(cell_type, 6, hidden, 2)
    x = torch.randn(steps, 3, 6)
    x[2, 1, 0] = float("nan")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = stack(x, stack.init_state(3))
    nan = torch.isnan(out.float())
    assert nan[2:, 1].all() and not nan[:, 0].any() and not nan[:2].any()
