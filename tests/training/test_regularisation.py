"""Regularisers: per-element and locked (variational) dropout, input and embedding dropout, AR/TAR."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config

from charlm.config import ConfigError, ModelConfig, validate_config
from charlm.models.dropout import drop, dropped_embedding_rows
from charlm.models.model import CharLM, Trace
from charlm.training.objective import activation_penalties


def test_per_element_dropout_keeps_the_expectation_and_drops_p():
    torch.manual_seed(0)
    x = torch.ones(50, 40, 30)
    y = drop(x, 0.3, training=True)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7)
    assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    # a new mask at every step
    assert not torch.equal(y[0] == 0, y[1] == 0)


def test_locked_dropout_holds_one_mask_for_all_steps():
    torch.manual_seed(0)
    x = torch.randn(20, 8, 16)
    y = drop(x, 0.5, training=True, locked=True)
    zeroed = y == 0
    assert torch.equal(zeroed, zeroed[:1].expand_as(zeroed))  # the same units off at every step
    assert 0.3 < zeroed[0].float().mean().item() < 0.7
    kept = ~zeroed
    torch.testing.assert_close(y[kept], x[kept] * 2)


def test_dropout_is_the_identity_in_eval_mode_and_at_p0():
    x = torch.randn(5, 3, 4)
    assert drop(x, 0.5, training=False) is x
    assert drop(x, 0.0, training=True) is x
    w = torch.randn(7, 3)
    assert dropped_embedding_rows(w, 0.5, training=False) is w


def test_embedding_dropout_zeroes_whole_rows():
    torch.manual_seed(0)
    w = torch.randn(200, 6)
    d = dropped_embedding_rows(w, 0.25, training=True)
    rows_off = (d == 0).all(dim=1)
    assert 0.15 < rows_off.float().mean().item() < 0.35
    torch.testing.assert_close(d[~rows_off], w[~rows_off] / 0.75)


def test_dropout_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(6, 4, 5, dtype=torch.double, requires_grad=True)
    torch.manual_seed(2)
    y = drop(x, 0.4, training=True, locked=True)
    y.sum().backward()
    torch.manual_seed(2)
    mask = drop(torch.ones_like(x), 0.4, training=True, locked=True)
    torch.testing.assert_close(x.grad, mask)


@pytest.mark.parametrize("backend", ["native", "fused", "reference"])
def test_locked_dropout_model_matches_its_layers_by_hand(backend):
    """A 2-layer model with locked dropout: rebuilt by hand from its parts with the same masks."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        type="lstm", hidden_size=8, num_layers=2, dropout=0.5, embedding_dim=6, locked_dropout=True, input_dropout=0.3
    )
    model = CharLM(cfg, 13, backend).double().train()
    idx = torch.randint(0, 13, (3, 9))
    refs = []  # built first: their initialisation draws from the RNG the masks come from
    for cell in model.rnn.layers:
        ref = torch.nn.LSTM(cell.weight_ih.shape[1], 8).double()
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l0").copy_(getattr(cell, name))
        refs.append(ref)
    torch.manual_seed(5)
    logits, _ = model(idx)
    torch.manual_seed(5)
    x = model.embedding(idx.t())
    x = x * drop(torch.ones(1, 3, 6, dtype=torch.double), 0.3, True)  # the input's mask
    zeros = torch.zeros(1, 3, 8, dtype=torch.double)
    for ref in refs:
        x, _ = ref(x, (zeros, zeros))
        x = x * drop(torch.ones(1, 3, 8, dtype=torch.double), 0.5, True)  # between layers, then before the head
    expected = model.head(x).transpose(0, 1)
    torch.testing.assert_close(logits, expected)


def test_ar_and_tar_by_hand():
    h = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]], [[0.0, 0.0]]])  # [T=3, B=1, H=2]
    dropped = h * 2
    top = Trace(h, dropped)
    # AR: mean of (2h)^2 = 4 * (1 + 4 + 9) / 6; TAR: diffs (2, -2), (-3, 0) -> mean (4 + 4 + 9 + 0) / 4
    assert activation_penalties(top, 1.0, 0.0).item() == pytest.approx(4 * 14 / 6)
    assert activation_penalties(top, 0.0, 1.0).item() == pytest.approx(17 / 4)
    assert activation_penalties(top, 0.5, 2.0).item() == pytest.approx(0.5 * 4 * 14 / 6 + 2 * 17 / 4)


def test_model_reports_its_top_outputs():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(type="gru", hidden_size=5, num_layers=2, dropout=0.5, embedding_dim=4), 11, "native")
    _, _, trace = model.train()(torch.randint(0, 11, (2, 7)), trace="top")
    assert trace.top.shape == trace.top_dropped.shape == (7, 2, 5) and trace.gates == []
    assert (trace.top_dropped == 0).any() and not (trace.top == 0).any()


def test_embedding_dropout_needs_an_embedding(tmp_path):
    with pytest.raises(ConfigError, match="model.embedding_dropout needs model.input: embedding"):
        validate_config(tiny_config(tmp_path / "t.txt", model={"input": "onehot", "embedding_dropout": 0.1}))
    cfg = validate_config(
        tiny_config(
            tmp_path / "t.txt",
            model={"locked_dropout": True, "input_dropout": 0.1, "embedding_dropout": 0.1},
            train={"ar": 2.0, "tar": 1.0},
        )
    )
    assert cfg.model.locked_dropout and cfg.train.ar == 2.0 and cfg.train.tar == 1.0


@pytest.mark.slow
def test_a_run_with_every_regulariser_learns(tmp_path, text_file, cli, write_config):
    """Through the CLI: locked, input and embedding dropout, AR and TAR, bf16 native; the val loss
    falls well below the untrained model's ln(V), and the logged loss is the cross-entropy alone."""
    config = write_config(
        tiny_config(
            text_file,
            model={
                "num_layers": 2,
                "dropout": 0.2,
                "locked_dropout": True,
                "input_dropout": 0.1,
                "embedding_dropout": 0.1,
                "backend": "native",
            },
            train={"max_steps": 60, "eval_interval": 60, "lr": 0.02, "ar": 2.0, "tar": 1.0, "precision": "bf16"},
        )
    )
    result = cli("train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first_train = next(e for e in events if e["event"] == "train")
    vocab = len(set(text_file.read_text(encoding="utf-8")))
    assert first_train["loss"] < 1.05 * math.log(vocab)
    val = [e["val_loss"] for e in events if e["event"] == "eval"][-1]
    assert val < 0.8 * math.log(vocab)
