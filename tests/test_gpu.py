"""The CUDA path: every backend against the reference on the GPU, NaN parity, fp16 and bf16 training.

Marked `gpu` and skipped without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine.
Each check is a function of the device, so it reads the same as its CPU counterpart.
"""

from __future__ import annotations

import math

import pytest
import torch

from charlm.training import trainer as trainer_module
from charlm.config import validate_config
from charlm.models.layers import RecurrentStack
from charlm.models.registry import CELL_TYPES
from charlm.training.metrics import read_metrics
from charlm.training.run import train
from conftest import tiny_config
from test_distributed import InfGradients, params
from test_trainer import quiet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
KINDS = CELL_TYPES


def outputs_and_grads(stack: RecurrentStack, x: torch.Tensor, state: tuple):
    out, final = stack(x, state)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    ((out * weights).sum() + sum(s.sum() for s in final)).backward()
    grads = {name: p.grad.clone() for name, p in stack.named_parameters()}
    stack.zero_grad()
    return out.detach(), [s.detach() for s in final], grads


def check_backends_agree(kind: str, device: str) -> None:
    torch.manual_seed(3)
    stack = RecurrentStack(kind, 16, 32, 2).to(device)
    x = torch.randn(20, 8, 16, device=device)
    state = tuple(torch.randn(2, 8, 32, device=device) for _ in range(stack.state_size))
    stack.backend = "reference"
    want = outputs_and_grads(stack, x, state)
    for backend in set(stack.spec.backends) - {"reference"}:
        stack.backend = backend
        got = outputs_and_grads(stack, x, state)
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0, msg=backend)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=backend)
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], atol=1e-3, rtol=1e-3, msg=f"{backend} {name}")


def check_nan_parity(kind: str, device: str) -> None:
    torch.manual_seed(5)
    stack = RecurrentStack(kind, 6, 8, 2).to(device)
    x = torch.randn(7, 3, 6, device=device)
    x[2, 1, 0] = float("nan")
    patterns = {}
    for backend in stack.spec.backends:
        stack.backend = backend
        with torch.no_grad():
            out, final = stack(x, stack.init_state(3, device=device))
        patterns[backend] = (torch.isnan(out).cpu(), [torch.isnan(s).cpu() for s in final])
    assert patterns["reference"][0].any() and not patterns["reference"][0].all()
    for backend in set(patterns) - {"reference"}:
        assert torch.equal(patterns[backend][0], patterns["reference"][0]), backend
        assert all(torch.equal(a, b) for a, b in zip(patterns[backend][1], patterns["reference"][1])), backend


@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_on_cuda(kind):
    check_backends_agree(kind, "cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_nan_comes_out_nan_in_every_backend_on_cuda(kind):
    check_nan_parity(kind, "cuda")


def test_fp16_on_cuda_skips_overflows_and_shrinks_the_scale(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(trainer_module.Trainer, "loss", staticmethod(InfGradients({3, 4})))
    cfg = validate_config(tiny_config(text_file, train={"device": "cuda", "precision": "fp16", "max_steps": 8}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.step == 8
    assert [m["step"] for m in read_metrics(tmp_path / "run") if m["event"] == "skip"] == [3, 4]
    scale = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]["scale"]
    assert scale == torch.amp.GradScaler("cuda").get_scale() * 0.25


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_bf16_on_cuda_learns_as_fp32_does(tmp_path, text_file, backend):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = validate_config(tiny_config(text_file, model={"backend": backend, "hidden_size": 32},
                                          train={"device": "cuda", "precision": precision, "max_steps": 40,
                                                 "eval_interval": 40, "lr": 0.02}))
        losses[precision] = train(cfg, tmp_path / precision, display=quiet()).best_val_loss
    assert losses["bf16"] < math.log(len(set(text_file.read_text()))) - 1.0, losses
    assert abs(losses["bf16"] - losses["fp32"]) < 0.1, losses


def test_accumulation_with_weight_dropout_equals_the_full_batch_on_cuda(tmp_path, text_file):
    model = {"num_layers": 2, "weight_dropout": 0.3}
    for name, steps in (("full", 1), ("acc", 4)):
        cfg = validate_config(tiny_config(text_file, model=model, train={
            "device": "cuda", "batch_size": 8, "max_steps": 5, "gradient_accumulation_steps": steps}))
        train(cfg, tmp_path / name, display=quiet())
    full, acc = params(tmp_path / "full"), params(tmp_path / "acc")
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=1e-5, rtol=0, msg=name)
