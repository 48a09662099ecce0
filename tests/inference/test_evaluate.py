"""Evaluation: closed forms, hand-computed cross-entropy, carried state and OOV rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.inference.evaluate import IGNORE, evaluate_ids, evaluate_text, stream_layout
from charlm.models.model import CharLM


class Uniform(torch.nn.Module):
    """A 'model' whose logits are all zero: every character has probability 1/V."""

    def __init__(self, V):
        super().__init__()
        self.vocab_size = V
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, state=None):
        return torch.zeros(*idx.shape, self.vocab_size) + 0 * self.dummy, state


def test_uniform_logits_give_ln_v_and_log2_v():
    result = evaluate_ids(Uniform(65), torch.randint(0, 65, (1000,)), streams=7, min_stream=1)
    assert result.loss_nats == pytest.approx(math.log(65))
    assert result.bpc == pytest.approx(math.log2(65))
    assert result.perplexity == pytest.approx(65)
    assert result.chars == 999


def test_stream_layout_scores_every_prediction_once():
    ids = torch.arange(100, 111)  # 10 predictions -> 3 streams of 4 (2 padded), warmup 2
    inputs, targets = stream_layout(ids, 3, min_stream=1, warmup=2)
    assert inputs.shape == (3, 6)
    scored = targets[targets != IGNORE]
    assert torch.equal(scored.sort().values, torch.arange(101, 111))
    mask = targets != IGNORE
    assert torch.equal(targets[mask], inputs[mask] + 1)  # every target is its input's successor
    assert inputs[0, :4].tolist() == [100, 101, 102, 103]  # stream 0 starts at the text's start
    assert inputs[1].tolist() == [102, 103, 104, 105, 106, 107]  # warmup = the 2 ids before its part
    assert (targets[1, :2] == IGNORE).all()


def tiny_model(V=5):
    torch.manual_seed(0)
    return CharLM(ModelConfig(type="lstm", hidden_size=4, num_layers=2, input="onehot"), V, "native").double().eval()


def test_matches_hand_computed_cross_entropy():
    model = tiny_model()
    ids = torch.tensor([0, 3, 1, 4, 4, 2, 0, 1])
    logits, _ = model(ids[None, :-1])
    probs = torch.softmax(logits[0], dim=-1)
    by_hand = -sum(math.log(probs[t, ids[t + 1]].item()) for t in range(7)) / 7
    result = evaluate_ids(model, ids, streams=1, window=3)
    assert result.loss_nats == pytest.approx(by_hand, abs=1e-12)


def test_windows_with_carried_state_equal_one_long_pass():
    model = tiny_model()
    ids = torch.randint(0, 5, (200,))
    logits, _ = model(ids[None, :-1])
    one_pass = F.cross_entropy(logits[0], ids[1:]).item()
    for window in (1, 7, 64, 500):
        assert evaluate_ids(model, ids, streams=1, window=window).loss_nats == pytest.approx(one_pass, abs=1e-12)


def test_parallel_streams_are_independent_passes():
    model = tiny_model()
    ids = torch.randint(0, 5, (41,))  # 40 predictions -> 4 streams of 10
    total = 0.0
    for s in range(4):
        part = ids[s * 10 : s * 10 + 11]
        total += evaluate_ids(model, part, streams=1).loss_nats * 10
    assert evaluate_ids(model, ids, streams=4, min_stream=10, warmup=0).loss_nats == pytest.approx(
        total / 40, abs=1e-12
    )


def test_warmed_up_streams_agree_with_one_long_pass():
    model = tiny_model()
    ids = torch.randint(0, 5, (4001,))
    one_pass = evaluate_ids(model, ids, streams=1).loss_nats
    cold = evaluate_ids(model, ids, streams=40, min_stream=100, warmup=0).loss_nats
    warm = evaluate_ids(model, ids, streams=40, min_stream=100, warmup=50).loss_nats
    assert abs(warm - one_pass) < 1e-6 < abs(cold - one_pass)


def test_streams_are_long_enough_for_context():
    inputs, _ = stream_layout(torch.arange(2001), streams=64, min_stream=500, warmup=100)
    assert inputs.shape == (4, 600)


def test_oov_characters_are_dropped_and_counted():
    vocab = Vocab(list("abcde"))
    model = tiny_model()
    with_oov = evaluate_text(model, vocab, "abXcdYYea", streams=1)
    clean = evaluate_text(model, vocab, "abcdea", streams=1)
    assert with_oov.oov_chars == 3 and with_oov.chars == 5
    assert with_oov.loss_nats == pytest.approx(clean.loss_nats)


def test_eval_restores_training_mode():
    model = tiny_model().train()
    evaluate_ids(model, torch.randint(0, 5, (30,)))
    assert model.training


def test_windowed_scoring_reads_each_window_from_a_blank_state():
    from charlm.inference.evaluate import evaluate_windows

    torch.manual_seed(5)
    model = CharLM(ModelConfig(type="gru", hidden_size=6, num_layers=2, embedding_dim=3), 7, "native").double()
    ids = torch.randint(0, 7, (53,))
    # one window longer than the text: one pass from a blank state
    assert evaluate_windows(model, ids, 100).loss_nats == pytest.approx(
        evaluate_ids(model, ids, streams=1).loss_nats, rel=1e-12
    )
    # windows of 10: 52 predictions in 6 windows, the last one of 2, each read on its own
    with torch.no_grad():
        by_hand = sum(
            float(
                F.cross_entropy(
                    model(ids[s : min(s + 10, 52)][None])[0][0], ids[s + 1 : min(s + 11, 53)], reduction="sum"
                )
            )
            for s in range(0, 52, 10)
        )
    result = evaluate_windows(model, ids, 10, batch=4)
    assert result.chars == 52 and result.loss_nats == pytest.approx(by_hand / 52, rel=1e-12)
