"""charlm probe: gradient norms over time and the loss with limited context, checked by hand."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import PARAGRAPH, assert_user_error, call, run_cli, tiny_config

from charlm.config import ModelConfig, config_yaml
from charlm.inference.probe import context_losses, doubling, gradient_norms
from charlm.models.model import CharLM

V = 9


def text(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_a_linear_rnn_gradient_shrinks_by_the_spectral_radius_per_step():
    # zero input weights and biases keep h = 0, where tanh' = 1: the step is h_t = W h_{t-1},
    # so d loss / d h_{t-k} = (W^T)^k d loss / d h_t, and with W = a Q (Q orthogonal) its norm is a^k times
    torch.manual_seed(0)
    model = CharLM(ModelConfig(type="rnn", hidden_size=6, num_layers=1, input="onehot"), V, "native").double()
    a = 0.7
    with torch.no_grad():
        cell = model.rnn.layers[0]
        for p in (cell.weight_ih, cell.bias_ih, cell.bias_hh):
            p.zero_()
        q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
        cell.weight_hh.copy_(a * q)
    norms = gradient_norms(model, text(200), max_k=12, positions=5, warmup=8)
    assert norms.cell is None and norms.positions == 5 and norms.ks == list(range(13))
    for k in range(13):
        assert norms.hidden[k] == pytest.approx(norms.hidden[0] * a**k, rel=1e-10)


@pytest.mark.parametrize("cell_type", ["lstm", "gru", "rnn"])
def test_each_k_is_the_gradient_at_a_state_made_a_leaf_k_steps_back(cell_type):
    # the probe steps one character at a time on the reference backend; here the state k steps
    # back is a leaf and the k steps after it are one forward call of the model's own backend
    torch.manual_seed(1)
    model = CharLM(ModelConfig(type=cell_type, hidden_size=5, num_layers=2, embedding_dim=4), V, "native").double()
    ids, max_k, warmup = text(120, seed=2), 6, 10
    norms = gradient_norms(model, ids, max_k=max_k, positions=3, warmup=warmup)
    starts = [0, (120 - (warmup + max_k + 2)) // 2, 120 - (warmup + max_k + 2)]
    windows = torch.stack([ids[s : s + warmup + max_k + 2] for s in starts])
    for k in (0, 1, 3, max_k):
        with torch.no_grad():
            _, state = model(windows[:, : warmup + max_k + 1 - k])
        leaf = tuple(s.clone().requires_grad_() for s in state)
        logits, _ = model(windows[:, warmup + max_k + 1 - k : warmup + max_k + 1], leaf) if k else (None, None)
        if k == 0:  # the state that made the prediction: only the head lies between
            logits = model.head(leaf[0][-1])[:, None]
        loss = F.cross_entropy(logits[:, -1], windows[:, -1], reduction="sum")
        grads = torch.autograd.grad(loss, leaf, allow_unused=True)  # k = 0: the LSTM's c is not used
        expected = [0.0 if g is None else float(g.transpose(0, 1).reshape(3, -1).norm(dim=1).mean()) for g in grads]
        assert norms.hidden[k] == pytest.approx(expected[0], rel=1e-6)  # native loops: a fast exp
        if cell_type == "lstm":
            assert norms.cell[k] == pytest.approx(expected[1], rel=1e-6)
    assert (norms.cell is not None) == (cell_type == "lstm")


def test_context_losses_are_the_losses_of_windows_read_from_a_blank_state():
    torch.manual_seed(3)
    model = CharLM(ModelConfig(type="lstm", hidden_size=7, num_layers=2, embedding_dim=4), V, "native").double()
    ids = text(300, seed=4)
    ks = doubling(20)
    assert ks == [1, 2, 4, 8, 16, 20]
    result = context_losses(model, ids, ks, positions=10)
    targets = [19 + round(i * (298 - 19) / 9) for i in range(10)]  # spread over [max k - 1, N - 2]
    assert result.positions == 10
    with torch.no_grad():
        for k, loss in zip(ks, result.losses):
            by_hand = [
                float(F.cross_entropy(model(ids[t - k + 1 : t + 1][None])[0][0, -1], ids[t + 1])) for t in targets
            ]
            assert loss == pytest.approx(sum(by_hand) / 10, rel=1e-10)
        logits, _ = model(ids[None, :-1])
        every = F.cross_entropy(logits[0], ids[1:], reduction="none")
    assert result.carried == pytest.approx(float(every[targets].mean()), rel=1e-10)


def test_a_text_too_short_is_a_value_error():
    model = CharLM(ModelConfig(type="rnn", hidden_size=4, num_layers=1), V, "native")
    with pytest.raises(ValueError, match="at least 268 characters"):
        gradient_norms(model, text(100), max_k=10)
    with pytest.raises(ValueError, match="at least 65 characters"):
        context_losses(model, text(50), doubling(64))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("probe")
    text_file = tmp_path / "input.txt"
    text_file.write_text(PARAGRAPH * 20, encoding="utf-8")
    dirs = []
    for cell_type in ("rnn", "lstm"):
        config = tmp_path / f"{cell_type}.yaml"
        config.write_text(config_yaml(tiny_config(text_file, model={"type": cell_type})), encoding="utf-8")
        run_dir = tmp_path / cell_type
        result = run_cli("train", "--config", str(config), "--out", str(run_dir))
        assert result.returncode == 0, result.stderr
        dirs.append(run_dir)
    return dirs, text_file


@pytest.mark.slow
def test_probe_gradients_and_context_write_a_png_and_json(runs, capsys, tmp_path):
    (rnn, lstm), text_file = runs
    code, out, err = call(
        capsys,
        "probe",
        "gradients",
        "--checkpoint",
        str(rnn),
        "--checkpoint",
        str(lstm),
        "--text",
        str(text_file),
        "--out",
        str(tmp_path / "grad.png"),
        "--max-k",
        "30",
        "--positions",
        "4",
    )
    assert code == 0, err
    assert out.split() == [str(tmp_path / "grad.png"), str(tmp_path / "grad.json")]
    assert (tmp_path / "grad.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    facts = json.loads((tmp_path / "grad.json").read_text())
    assert facts["probe"] == "gradients" and [m["label"] for m in facts["models"]] == [
        "rnn (rnn 1x16)",
        "lstm (lstm 1x16)",
    ]
    assert len(facts["models"][0]["hidden_grad_norm"]) == 31 and facts["models"][0]["cell_grad_norm"] is None
    assert len(facts["models"][1]["cell_grad_norm"]) == 31

    code, out, err = call(
        capsys,
        "probe",
        "context",
        "--checkpoint",
        str(lstm),
        "--text",
        str(text_file),
        "--out",
        str(tmp_path / "ctx"),
        "--max-k",
        "64",
        "--positions",
        "50",
    )
    assert code == 0, err
    facts = json.loads((tmp_path / "ctx.json").read_text())
    entry = facts["models"][0]
    assert entry["k"] == [1, 2, 4, 8, 16, 32, 64] and len(entry["loss_nats"]) == 7 and entry["positions"] == 50
    assert entry["loss_nats"][-1] < entry["loss_nats"][0]  # even a tiny model uses more than one character
    assert (tmp_path / "ctx.png").exists()


@pytest.mark.slow
def test_probe_on_a_text_too_short_is_one_line(runs, capsys, tmp_path):
    (rnn, _), _ = runs
    short = tmp_path / "short.txt"
    short.write_text("It was the best", encoding="utf-8")
    assert_user_error(
        call(capsys, "probe", "context", "--checkpoint", str(rnn), "--text", str(short), "--out", str(tmp_path / "c")),
        "give a longer --text or a smaller --max-k",
    )


@pytest.mark.slow
def test_probe_to_a_path_that_cannot_be_written_is_one_line(runs, capsys, tmp_path):
    (rnn, _), text_file = runs
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder", encoding="utf-8")
    assert_user_error(
        call(
            capsys,
            "probe",
            "gradients",
            "--checkpoint",
            str(rnn),
            "--text",
            str(text_file),
            "--out",
            str(blocked / "grad"),
            "--max-k",
            "8",
            "--positions",
            "2",
        ),
        "cannot write",
    )
    assert blocked.read_text(encoding="utf-8") == "not a folder"
