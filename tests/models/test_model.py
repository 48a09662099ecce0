"""CharLM: shapes, carried state, one-hot and embedding input, compared with torch.nn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_cells import WITH_TORCH_NN, reference_for
from torch import nn

from charlm.config import ModelConfig
from charlm.models.model import CharLM
from charlm.models.registry import CELL_TYPES


def make(cell_type="lstm", input="embedding", dropout=0.0, layers=2, V=11, H=6):
    torch.manual_seed(0)
    cfg = ModelConfig(type=cell_type, hidden_size=H, num_layers=layers, dropout=dropout, input=input, embedding_dim=5)
    return CharLM(cfg, V, "native").double()


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_forward_shapes(cell_type):
    model = make(cell_type)
    idx = torch.randint(0, 11, (3, 9))
    logits, state = model(idx)
    assert logits.shape == (3, 9, 11)
    assert len(state) == (2 if cell_type == "lstm" else 1)
    assert all(s.shape == (2, 3, 6) for s in state)


def test_built_from_scratch():
    for cell_type in CELL_TYPES:
        model = make(cell_type)
        assert not any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in model.modules())


@pytest.mark.parametrize("cell_type", CELL_TYPES)
@pytest.mark.parametrize("input", ["onehot", "embedding"])
def test_one_pass_equals_three_with_carried_state(cell_type, input):
    model = make(cell_type, input).eval()
    idx = torch.randint(0, 11, (4, 12))
    full, full_state = model(idx)
    state, pieces = None, []
    for chunk in idx.split(4, dim=1):
        logits, state = model(chunk, state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=0)
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cell_type", WITH_TORCH_NN)
def test_onehot_model_equals_torch_nn_on_one_hot_vectors(cell_type):
    model = make(cell_type, "onehot")
    ref = reference_for(model.rnn, cell_type, 11).double()
    idx = torch.randint(0, 11, (2, 7))
    one_hot = F.one_hot(idx.t(), 11).double()  # [T, B, V]: the spec's x_t
    out, _ = ref(one_hot)
    expected = (out @ model.head.weight.T + model.head.bias).transpose(0, 1)
    logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, atol=1e-12, rtol=0)


def test_embedding_model_equals_torch_nn_on_embedded_input():
    model = make("lstm", "embedding")
    ref = reference_for(model.rnn, "lstm", 5).double()
    idx = torch.randint(0, 11, (3, 5))
    out, _ = ref(model.embedding(idx.t()))
    expected = model.head(out).transpose(0, 1)
    torch.testing.assert_close(model(idx)[0], expected, atol=1e-12, rtol=0)


def test_dropout_only_while_training():
    model = make("lstm", dropout=0.5)
    idx = torch.randint(0, 11, (2, 6))
    model.eval()
    a, b = model(idx)[0], model(idx)[0]
    torch.testing.assert_close(a, b)
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
