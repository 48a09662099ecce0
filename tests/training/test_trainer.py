"""The trainer, through its library entry point: schedule, learning, best checkpoint."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import quiet, tiny_config
from rich.console import Console

from charlm.config import TrainConfig, validate_config
from charlm.data.corpus import load_corpus
from charlm.inference.evaluate import evaluate_ids
from charlm.report.progress import TrainingDisplay
from charlm.store.checkpoint import load_checkpoint, model_from_checkpoint
from charlm.store.events import Event
from charlm.store.metrics import read_metrics
from charlm.training.optim import Budget, WeightAverage, learning_rate
from charlm.training.run import train


def schedule(**kwargs):
    return TrainConfig(max_steps=100, lr=1.0, **kwargs)


def test_warmup_then_constant():
    cfg = schedule(lr_schedule="constant", warmup_steps=4)
    assert [learning_rate(cfg, s, 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_runs_from_lr_to_min_lr_over_the_budget():
    cfg = schedule(lr_schedule="cosine", min_lr=0.1)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 50, 0.5) == pytest.approx(0.55)
    assert learning_rate(cfg, 100, 1.0) == pytest.approx(0.1)


def test_budget_is_whichever_ends_first():
    budget = Budget(TrainConfig(max_steps=100, max_time="10s"))
    assert budget.fraction(50, 2.0) == 0.5 and budget.fraction(10, 8.0) == 0.8
    assert budget.reached(100, 0.0) and budget.reached(1, 10.0) and not budget.reached(99, 9.9)


def bigram_entropy(text: str) -> float:
    """H(next char | current char) in nats: what a model that looks back one character can reach."""
    pairs, firsts = Counter(zip(text, text[1:])), Counter(text[:-1])
    n = len(text) - 1
    return -sum(c / n * math.log(c / firsts[a]) for (a, _), c in pairs.items())


def test_small_lstm_memorises_a_short_text(tmp_path, write_config):
    sentence = "the quick brown fox jumps over the lazy dog; "
    path = tmp_path / "fox.txt"
    path.write_text(sentence * 200, encoding="utf-8")
    # The sentence repeats, so the next character is certain given enough context (entropy 0),
    # while a model that sees one character back cannot go below the bigram entropy (~0.3 nats).
    # Ending well under a third of that means the LSTM uses longer context: it has memorised.
    floor = bigram_entropy(sentence * 200)
    assert floor > 0.25
    cfg = validate_config(
        tiny_config(
            path,
            model={"hidden_size": 48},
            data={"val_fraction": 0.1},
            train={
                "max_steps": 300,
                "eval_interval": 300,
                "log_interval": 300,
                "batch_size": 8,
                "seq_len": 32,
                "lr": 0.01,
                "lr_schedule": "cosine",
            },
        )
    )
    outcome = train(cfg, tmp_path / "run", display=quiet())
    final_train = [m for m in read_metrics(tmp_path / "run") if m["event"] == "train"][-1]["loss"]
    assert final_train < floor / 3
    assert outcome.best_val_loss < floor / 3


def test_best_checkpoint_holds_the_lowest_val_loss(text_file, tmp_path):
    cfg = validate_config(tiny_config(text_file, train={"max_steps": 24, "eval_interval": 4, "lr": 0.05}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    evals = [m for m in read_metrics(tmp_path / "run") if m["event"] == "eval"]
    assert [m["step"] for m in evals] == [4, 8, 12, 16, 20, 24]
    best_eval = min(evals, key=lambda m: m["val_loss"])
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["step"] == best_eval["step"] == outcome.best_step
    assert best["best_val_loss"] == pytest.approx(best_eval["val_loss"])
    # re-evaluating the saved weights gives the recorded loss
    model, _ = model_from_checkpoint(best)
    corpus = load_corpus(cfg.data)
    assert evaluate_ids(model, corpus.val_ids, 64).loss_nats == pytest.approx(best_eval["val_loss"], abs=1e-6)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 24


def test_weight_average_by_hand():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(4.0)
    average = WeightAverage(model, decay=0.5)
    expected = torch.tensor([1.0, -2.0, 4.0])
    for n, value in enumerate([3.0, -1.0, 0.5, 2.0, 7.0, -3.0, 1.5, 0.0, 2.5, 6.0, -4.0], start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        rate = 1 - min(0.5, n / (n + 9))  # 0.9, 0.818..., ..., then 0.5 from n = 10 on
        assert average.rate() == pytest.approx(rate)
        average.update()
        expected = expected + rate * (value - expected)
        got = torch.cat([average.average["weight"].flatten(), average.average["bias"]])
        torch.testing.assert_close(got, expected)
    assert average.updates == 11 and average.rate() == 0.5
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with average.applied(model):
        torch.testing.assert_close(model.weight.flatten(), expected[:2])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, own[name])  # the model's own weights come back exactly


def test_ema_validates_and_saves_the_average(text_file, tmp_path):
    cfg = validate_config(
        tiny_config(text_file, train={"max_steps": 24, "eval_interval": 8, "lr": 0.05, "ema_decay": 0.9})
    )
    train(cfg, tmp_path / "run", display=quiet())
    evals = [m for m in read_metrics(tmp_path / "run") if m["event"] == "eval"]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["ema_updates"] == 24
    assert not torch.equal(last["model"]["head.weight"], last["raw_model"]["head.weight"])
    corpus = load_corpus(cfg.data)
    model, _ = model_from_checkpoint(last)  # what sample and eval load: the average
    assert evaluate_ids(model, corpus.val_ids, 64).loss_nats == pytest.approx(evals[-1]["val_loss"], abs=1e-6)
    raw = model_from_checkpoint({**last, "model": last["raw_model"]})[0]
    assert evaluate_ids(raw, corpus.val_ids, 64).loss_nats != pytest.approx(evals[-1]["val_loss"], abs=1e-6)


@pytest.mark.slow
def test_max_time_budget_stops_training(text_file, tmp_path):
    cfg = validate_config(tiny_config(text_file, train={"max_steps": None, "max_time": "2s", "eval_interval": 10_000}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.stop_reason == "budget" and 2.0 <= outcome.elapsed < 6.0 and outcome.step > 5


@pytest.mark.parametrize("first,then", [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_carried_state_resumes_across_precisions(text_file, tmp_path, first, then):
    """A bf16 run of the fused LSTM on the CPU carries (and saves) its state in bf16; oneDNN's fp32
    kernel refuses a bf16 state, so a resume casts it to the model's own dtype (and the reverse)."""
    model = {"backend": "fused", "num_layers": 2}
    run_dir = tmp_path / "run"
    train(
        validate_config(tiny_config(text_file, model=model, train={"precision": first, "max_steps": 4})),
        run_dir,
        display=quiet(),
    )
    saved = load_checkpoint(run_dir / "last.pt")["train_state"]
    assert saved[0].dtype == (torch.bfloat16 if first == "bf16" else torch.float32)
    resumed = validate_config(tiny_config(text_file, model=model, train={"precision": then, "max_steps": 6}))
    assert train(resumed, run_dir, resume=True, display=quiet()).step == 6


def test_the_display_shows_the_figures_an_event_brings():
    """The plain lines (not a terminal): the known figures in their places, any others after them."""
    console = Console(record=True, force_terminal=False, width=200)
    display = TrainingDisplay(console)
    display.log(
        Event(
            "train",
            4,
            {
                "epoch": 1,
                "loss": 2.5,
                "lr": 0.01,
                "grad_norm": 1.5,
                "chars_per_sec": 1234.0,
                "elapsed": 2.0,
                "grad_norm/embedding": 0.25,
                "grad_norm/rnn.0": 1.25,
            },
        )
    )
    display.log(
        Event(
            "train", 6, {"epoch": 1, "loss": 2.25, "lr": 0.01, "grad_norm": 1.5, "chars_per_sec": 999.0, "elapsed": 3.0}
        )
    )
    display.log(
        Event(
            "eval",
            6,
            {
                "epoch": 1,
                "val_loss": 2.0,
                "val_bpc": 2.885,
                "best_val_loss": 2.0,
                "elapsed": 3.5,
                "eval_seconds": 0.5,
                "new_best": True,
            },
        )
    )
    display.log(Event("sample", 6, {"text": "ab\ncd"}))
    display.log(Event("skip", 7, {"loss": float("nan"), "grad_norm": 1.0, "streak": 1}))  # the record's alone
    assert console.export_text().splitlines() == [
        "step 4 epoch 1 | loss 2.5000 | lr 1.00e-02 | grad norm 1.500 | 1.2k chars/s | grad_norm embedding 0.25, rnn.0 1.25",
        "step 6 epoch 1 | loss 2.2500 | lr 1.00e-02 | grad norm 1.500 | 999 chars/s",
        "step 6 | val loss 2.0000 nats | 2.8850 bpc | eval 0.5s  new best",
        "  sample at step 6: ab⏎ cd",
    ]
