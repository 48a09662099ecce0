"""Dynamic evaluation: no character is predicted by weights that learned from it; it adapts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, call, train_tiny_run

from charlm.config import ModelConfig
from charlm.inference.dynamic import DynamicSettings, read_dynamically
from charlm.inference.evaluate import evaluate_ids
from charlm.models.model import CharLM

V = 11


def model(cell_type: str = "lstm", backend: str = "native") -> CharLM:
    torch.manual_seed(0)
    return CharLM(ModelConfig(type=cell_type, hidden_size=12, num_layers=2, embedding_dim=6), V, backend).double()


def weights(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("rule", ["sgd", "rms"])
@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "gru"])
def test_no_character_is_predicted_by_weights_that_learned_from_it(cell_type, rule):
    # changing the text from position p on may change no loss of a target before p, not even
    # the loss of the earlier characters of p's own segment (the updates come after scoring)
    settings = DynamicSettings(segment=10, lr=0.3 if rule == "sgd" else 3e-3, rule=rule)
    ids = torch.randint(0, V, (80,), generator=torch.Generator().manual_seed(1))
    p = 45  # mid-segment: targets 0..43 come before it; segment 4 holds targets 40..49
    changed = ids.clone()
    changed[p:] = (changed[p:] + 1) % V
    first = read_dynamically(model(cell_type), ids, settings, keep_losses=True).losses
    second = read_dynamically(model(cell_type), changed, settings, keep_losses=True).losses
    assert first[: p - 1] == second[: p - 1]  # bit for bit
    assert first[p - 1] != second[p - 1]  # the first changed target
    # and the updates do reach later segments: without them the losses differ
    static = read_dynamically(model(cell_type), ids, DynamicSettings(segment=10, lr=0.0), keep_losses=True).losses
    assert first[:10] == static[:10] and first[10:] != static[10:]


def test_with_no_learning_rate_it_is_one_static_pass():
    m = model()
    ids = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(2))
    totals = read_dynamically(m, ids, DynamicSettings(segment=7, lr=0.0))
    static = evaluate_ids(m, ids, streams=1)
    assert totals.count == static.chars == 299
    assert totals.total_nats / totals.count == pytest.approx(static.loss_nats, rel=1e-12)


@pytest.mark.parametrize("rule,lr", [("sgd", 2.0), ("rms", 1e-2)])
def test_it_learns_a_text_that_repeats_while_reading_it(rule, lr):
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7] * 60)
    static = evaluate_ids(model(), ids, streams=1).loss_nats
    totals = read_dynamically(model(), ids, DynamicSettings(segment=20, lr=lr, rule=rule))
    assert totals.total_nats / totals.count < static - 0.4  # 2.42 -> 1.83 (sgd), 1.80 (rms)


@pytest.mark.parametrize("rule,lr", [("sgd", 0.2), ("rms", 2e-3)])
def test_decay_pulls_the_weights_back_toward_the_trained_ones(rule, lr):
    ids = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(3))
    trained = weights(model())
    drift = {}
    for decay in (0.0, 0.2):
        m = model()
        read_dynamically(m, ids, DynamicSettings(segment=10, lr=lr, rule=rule, decay=decay))
        drift[decay] = sum(float((p - q).norm()) for p, q in zip(weights(m), trained))
    assert 0 < drift[0.2] < 0.5 * drift[0.0]


def test_the_model_is_left_adapted_and_in_the_mode_it_was_in():
    m = model()
    m.train()
    before = weights(m)
    read_dynamically(m, torch.randint(0, V, (50,)), DynamicSettings(segment=10, lr=0.1, rule="sgd"))
    assert m.training
    assert any(not torch.equal(p, q) for p, q in zip(weights(m), before))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir, text_file, _, _ = train_tiny_run(tmp_path_factory.mktemp("dynamic"), train={"max_steps": 30})
    return run_dir, text_file


@pytest.mark.slow
def test_eval_dynamic_json_reports_static_and_dynamic_side_by_side(trained, capsys):
    run_dir, text_file = trained
    code, out, err = call(
        capsys,
        "eval",
        "--checkpoint",
        str(run_dir),
        "--text",
        str(text_file),
        "--json",
        "--dynamic",
        "--rule",
        "sgd",
        "--dynamic-lr",
        "0.05",
        "--segment",
        "32",
    )
    assert code == 0, err
    facts = json.loads(out)
    plain = json.loads(call(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--json")[1])
    assert facts["loss_nats_static"] == plain["loss_nats"]
    assert facts["loss_nats_dynamic"] < facts["loss_nats_static"]  # the text repeats: reading it teaches it
    assert facts["dynamic"] == {"segment": 32, "lr": 0.05, "rule": "sgd", "decay": 0.0}
    code, out, _ = call(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--dynamic")
    assert code == 0 and "static:" in out and "dynamic:" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--rule", "adam"], "update rule must be one of sgd, rms"),
        (["--segment", "0"], "segment length must be at least 1"),
        (["--decay", "1"], "decay must be in [0, 1)"),
        (["--dynamic-lr", "-1"], "learning rate must be a number >= 0"),
    ],
)
def test_bad_dynamic_options_are_one_line(trained, capsys, args, fragment):
    run_dir, text_file = trained
    assert_user_error(
        call(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--dynamic", *args), fragment
    )


@pytest.mark.slow
def test_sample_adapt_to_reads_the_file_first(trained, capsys, tmp_path):
    run_dir, _ = trained
    style = tmp_path / "style.txt"
    style.write_text("the the the the " * 40, encoding="utf-8")
    args = ["sample", "--checkpoint", str(run_dir), "--prompt", "t", "--length", "40", "--temperature", "0"]
    code, plain, _ = call(capsys, *args)
    assert code == 0
    code, adapted, err = call(capsys, *args, "--adapt-to", str(style), "--rule", "sgd", "--dynamic-lr", "0.2")
    assert code == 0, err
    assert "adapted to" in err and "639 characters read" in err
    assert adapted != plain and adapted.count("the") > plain.count("the")
