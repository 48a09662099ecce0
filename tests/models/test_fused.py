"""The fused backend's CUDA path, checked on the CPU where its logic can be: the weights moved into one
flat buffer (with a CPU stand-in for cuDNN's flattening) before the trainer holds them, a contiguous
state for the kernel, and the precision rule under autocast. tests/test_gpu.py checks them on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import params, quiet, tiny_config
from kernel_dtypes import KernelDtypes

from charlm.config import ModelConfig, validate_config
from charlm.models import fused
from charlm.models.model import CharLM
from charlm.training import trainer as trainer_module
from charlm.training.run import train


class FakeCudnnFlatten:
    """A CPU stand-in for torch._cudnn_rnn_flatten_weight with its effect: the weights' values are
    copied into one new buffer, in order, and each weight is pointed at its slice of it."""

    def __init__(self):
        self.calls = []

    def __call__(self, weights, stride0, input_size, mode, hidden_size, proj_size, layers, batch_first, bidirectional):
        self.calls.append((stride0, input_size, mode, hidden_size, proj_size, layers, batch_first, bidirectional))
        buffer = torch.cat([w.detach().reshape(-1) for w in weights])
        offset = 0
        for w in weights:
            w.set_(buffer.untyped_storage(), offset, w.shape)
            offset += w.numel()
        return buffer


@pytest.fixture
def fake_cudnn(monkeypatch):
    """Flattening runs on the CPU: every check that cuDNN could read the weights says yes."""
    flatten = FakeCudnnFlatten()
    monkeypatch.setattr(fused, "_cudnn_reads_in_place", lambda weights: True)
    monkeypatch.setattr(fused, "cudnn_mode", lambda kernel: kernel)
    monkeypatch.setattr(torch, "_cudnn_rnn_flatten_weight", flatten, raising=False)
    return flatten


def in_one_buffer(model: CharLM) -> bool:
    """The recurrent weights sit back to back in one storage, in torch.nn.RNN's order."""
    weights = fused.layer_weights(model.rnn.cells, [cell.weight_hh for cell in model.rnn.cells])
    storage = weights[0].untyped_storage().data_ptr()
    offsets = [w.storage_offset() for w in weights]
    expected = [sum(w.numel() for w in weights[:k]) for k in range(len(weights))]
    return all(w.untyped_storage().data_ptr() == storage for w in weights) and offsets == expected


def test_moving_a_fused_model_flattens_its_weights_keeping_names_and_values(fake_cudnn):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(type="lstm", hidden_size=6, num_layers=2, embedding_dim=5), 11, "native")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    parameters = list(model.parameters())
    model.rnn.backend = "fused"  # switching to fused flattens...
    model.to("cpu")  # ...and so does every move, as torch.nn.LSTM's _apply does
    assert in_one_buffer(model) and len(fake_cudnn.calls) == 2
    assert fake_cudnn.calls[-1] == (4, 5, "lstm", 6, 0, 2, False, False)  # 4 weights a layer, input E=5
    assert list(model.parameters()) == parameters  # the same objects: an optimiser built before still holds them
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)


def test_only_the_fused_backend_flattens(fake_cudnn):
    for kind, backend in (("lstm", "native"), ("gru", "reference"), ("mingru", "native")):
        CharLM(ModelConfig(type=kind, hidden_size=4, num_layers=2), 7, backend).to("cpu")
    assert fake_cudnn.calls == []


def test_the_trainer_builds_its_optimiser_and_average_on_the_flat_weights(fake_cudnn, tmp_path, text_file, monkeypatch):
    """Flattening moves the weights' storage, so it must come before the weight average takes its
    references; with weight dropout cuDNN gets a masked weight_hh outside the buffer: it trains on."""
    built = []
    real_init = trainer_module.Trainer.__init__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy_init)
    cfg = validate_config(
        tiny_config(
            text_file,
            model={"backend": "fused", "num_layers": 2, "weight_dropout": 0.3},
            train={"ema_decay": 0.9, "max_steps": 4},
        )
    )
    train(cfg, tmp_path / "flat", display=quiet())
    trainer = built[0]
    assert in_one_buffer(trainer.model)
    live = dict(zip(trainer.ema.names, trainer.ema._live))
    for name, parameter in trainer.model.named_parameters():
        assert live[name].data_ptr() == parameter.data_ptr(), name  # the average follows the live weights
    monkeypatch.undo()  # the same run without flattening ends with the same weights, bit for bit
    train(cfg, tmp_path / "plain", display=quiet())
    flat, plain = params(tmp_path / "flat"), params(tmp_path / "plain")
    assert all(torch.equal(flat[name], plain[name]) for name in plain)


def test_the_fused_kernel_gets_a_contiguous_state_under_gradient_accumulation(tmp_path, text_file, monkeypatch):
    """A micro-batch's rows of the carried [L, B, H] state are a strided view; cuDNN checks
    hx.is_contiguous() and would refuse it (2 layers, 2 micro-batches)."""
    seen, real = [], torch.lstm

    def spy(x, hx, *args):
        seen.append([h.is_contiguous() for h in hx])
        return real(x, hx, *args)

    monkeypatch.setattr(torch, "lstm", spy)
    cfg = validate_config(
        tiny_config(
            text_file,
            model={"backend": "fused", "num_layers": 2},
            train={"batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 3},
        )
    )
    train(cfg, tmp_path / "run", display=quiet())
    assert len(seen) >= 6 and all(all(flags) for flags in seen)


@pytest.mark.parametrize(
    "device_type,dtype,honoured",
    [("cuda", torch.bfloat16, False), ("cuda", torch.float16, True), ("cpu", torch.bfloat16, True)],
)
def test_autocast_leaves_the_fused_kernel_where_it_would_change_its_dtype(device_type, dtype, honoured):
    """cuDNN's autocast path runs fp16 whatever dtype was asked: under bf16 the recurrence leaves it."""
    assert fused.autocast_runs_kernel_in(device_type, dtype) is honoured


def test_cpu_bf16_autocast_still_runs_onednn_in_bf16():
    """On the CPU autocast runs oneDNN's LSTM in the dtype asked, so the fused path stays under it."""
    model = CharLM(ModelConfig(type="lstm", hidden_size=8, num_layers=2), 9, "fused")
    with KernelDtypes("mkldnn_rnn_layer") as record, torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(torch.randint(0, 9, (3, 5)))
    assert record.seen == [("mkldnn_rnn_layer", torch.bfloat16)] * 2
    assert state[0].dtype == torch.bfloat16  # what a CPU bf16 run carries, and may save (see test_trainer)
