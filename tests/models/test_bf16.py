"""bf16 through the commands: sample and eval take --precision, and a CPU without bf16 units runs fp32, saying so."""

from __future__ import annotations

import json

import pytest
from conftest import assert_user_error, call, quiet, tiny_config

import charlm.training.runtime as runtime
from charlm.config import validate_config
from charlm.models.native import cpp_loops
from charlm.training.run import train

needs_bf16 = pytest.mark.skipif(
    not runtime.cpu_has_bf16_units() or cpp_loops() is None,
    reason="this CPU has no bf16 units (or the C++ loops are not built)",
)


def eval_json(capsys, run_dir, text, *options):
    code, out, err = call(
        capsys, "eval", "--checkpoint", str(run_dir), "--text", str(text), "--json", "--device", "cpu", *options
    )
    assert code == 0, err
    return json.loads(out), err


@pytest.mark.slow
@needs_bf16
def test_eval_in_bf16_scores_as_fp32_does(trained, capsys):
    run_dir, config, _ = trained
    text = run_dir.parent / "input.txt"
    fp32, _ = eval_json(capsys, run_dir, text)
    bf16, err = eval_json(capsys, run_dir, text, "--precision", "bf16")
    assert "note:" not in err
    assert bf16["loss_nats"] != fp32["loss_nats"]  # it really ran in bf16
    assert bf16["loss_nats"] == pytest.approx(fp32["loss_nats"], rel=1e-2)


@pytest.mark.slow
@needs_bf16
def test_sample_in_bf16(trained, capsys):
    code, out, err = call(
        capsys,
        "sample",
        "--checkpoint",
        str(trained[0]),
        "--device",
        "cpu",
        "--length",
        "30",
        "--seed",
        "3",
        "--precision",
        "bf16",
        "--prompt",
        "it was",
    )
    assert code == 0, err
    assert out.startswith("it was") and len(out) >= 30


def test_a_cpu_without_bf16_units_evaluates_in_fp32_saying_so(trained, capsys, monkeypatch):
    run_dir = trained[0]
    text = run_dir.parent / "input.txt"
    fp32, _ = eval_json(capsys, run_dir, text)
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: False)
    fallback, err = eval_json(capsys, run_dir, text, "--precision", "bf16")
    assert "no bf16 units" in err and "fp32 instead" in err and len(err.strip().splitlines()) == 1
    assert fallback["loss_nats"] == fp32["loss_nats"]


def test_a_cpu_without_bf16_units_trains_in_fp32_saying_so(tmp_path, text_file, monkeypatch, capsys):
    from rich.console import Console

    from charlm.report.progress import TrainingDisplay

    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: False)
    cfg = validate_config(tiny_config(text_file, train={"precision": "bf16", "max_steps": 3}))
    plain = validate_config(tiny_config(text_file, train={"max_steps": 3}))
    outcome = train(cfg, tmp_path / "bf16", display=TrainingDisplay(Console(force_terminal=False)))
    assert "no bf16 units" in capsys.readouterr().out
    reference = train(plain, tmp_path / "fp32", display=quiet())
    assert outcome.best_val_loss == reference.best_val_loss  # the same run, in fp32


def test_precision_must_be_fp32_or_bf16(trained, capsys):
    assert_user_error(
        call(capsys, "eval", "--checkpoint", str(trained[0]), "--text", "x", "--precision", "fp8"),
        "--precision must be fp32 or bf16",
    )
