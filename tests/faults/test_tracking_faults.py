"""A tracker can fail, training cannot (issue 25): a TensorBoard or MLflow logger that raises, hangs or
cannot be reached is turned off with one warning line; the run trains to its end, writes every
checkpoint and exits 0; metrics.jsonl keeps every event."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("tensorboard", reason="needs the track extra: pip install 'charlm[track]'")
pytest.importorskip("mlflow", reason="needs the track extra: pip install 'charlm[track]'")

from conftest import (
    call,
    run_cli,
    tiny_config,
)

from charlm.config import config_yaml
from charlm.store.checkpoint import load_checkpoint
from charlm.store.metrics import read_metrics
from charlm.training import tracking as tracking_module

STEPS = 6  # evaluations at 3 and 6 (tiny_config)


def write_tiny(tmp_path, text_file, **train) -> str:
    config = tmp_path / "tiny.yaml"
    config.write_text(config_yaml(tiny_config(text_file, train={"max_steps": STEPS, **train})), encoding="utf-8")
    return str(config)


def warnings(out: str, err: str) -> list[str]:
    return [line for line in (out + err).splitlines() if line.startswith("warning:")]


def assert_trained_to_the_end(run_dir, code, out, err) -> None:
    assert code == 0, err
    assert "Traceback" not in out + err
    end = [e for e in read_metrics(run_dir) if e["event"] == "end"]
    assert len(end) == 1 and end[0]["reason"] == "budget" and end[0]["step"] == STEPS
    assert load_checkpoint(run_dir / "last.pt")["step"] == STEPS
    assert load_checkpoint(run_dir / "best.pt")["step"] == end[0]["best_step"]
    assert [e["step"] for e in read_metrics(run_dir) if e["event"] == "eval"] == [3, 6]  # metrics.jsonl has all


@pytest.mark.slow
def test_a_tracker_that_raises_is_turned_off_with_one_warning(tmp_path, text_file, monkeypatch, capsys):
    calls = []

    def broken(self, event):
        calls.append(event.name)
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(tracking_module.TensorBoardLogger, "log", broken)
    run_dir = tmp_path / "run"
    code, out, err = call(
        capsys, "train", "--config", write_tiny(tmp_path, text_file, loggers=["tensorboard"]), "--out", str(run_dir)
    )
    assert_trained_to_the_end(run_dir, code, out, err)
    lines = warnings(out, err)
    assert len(lines) == 1 and "tensorboard" in lines[0] and "tracking server went away" in lines[0], out + err
    assert len(calls) == 1  # turned off at its first failure, not called again


@pytest.mark.slow
def test_a_tracker_that_raises_at_the_first_evaluation_costs_no_checkpoint(tmp_path, text_file, monkeypatch, capsys):
    """The reproduced defect: the sink was called before the evaluation's checkpoint was written."""

    def broken_at_eval(self, event):
        if event.name == "eval":
            raise RuntimeError("boom")

    monkeypatch.setattr(tracking_module.TensorBoardLogger, "log", broken_at_eval)
    run_dir = tmp_path / "run"
    code, out, err = call(
        capsys, "train", "--config", write_tiny(tmp_path, text_file, loggers=["tensorboard"]), "--out", str(run_dir)
    )
    assert_trained_to_the_end(run_dir, code, out, err)
    assert len(warnings(out, err)) == 1


@pytest.mark.slow
def test_a_tracker_that_hangs_neither_holds_training_nor_its_end(tmp_path, text_file, monkeypatch, capsys):
    release = threading.Event()

    def hung(self, event):
        release.wait(30)  # bounded: a fix that still waits for it fails the time check below

    monkeypatch.setattr(tracking_module.TensorBoardLogger, "log", hung)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    try:
        code, out, err = call(
            capsys,
            "train",
            "--config",
            write_tiny(tmp_path, text_file, loggers=["tensorboard"], logger_timeout=1),
            "--out",
            str(run_dir),
        )
    finally:
        seconds = time.monotonic() - started
        release.set()
    assert seconds < 20, f"the run waited {seconds:.0f} s for a hung logger"
    assert_trained_to_the_end(run_dir, code, out, err)
    lines = warnings(out, err)
    assert len(lines) == 1 and "tensorboard" in lines[0] and "1 s" in lines[0], out + err


@pytest.mark.slow
def test_an_unreachable_mlflow_server_is_one_warning_and_the_run_trains(tmp_path, text_file, monkeypatch):
    """Through the real CLI: a server that refuses connections (MLflow's retries cut short for the test)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run_dir = tmp_path / "run"
    config = write_tiny(tmp_path, text_file, loggers=["mlflow"], mlflow_uri="http://user:secret@127.0.0.1:9")
    result = run_cli("train", "--config", config, "--out", str(run_dir), timeout=120)
    assert_trained_to_the_end(run_dir, result.returncode, result.stdout, result.stderr)
    lines = warnings(result.stdout, result.stderr)
    assert len(lines) == 1 and "mlflow" in lines[0], result.stdout + result.stderr
    assert "secret" not in result.stdout + result.stderr  # the URI's password is not printed


@pytest.mark.slow
def test_a_torn_mlflow_run_file_does_not_stop_a_resume(tmp_path, text_file, capsys):
    """mlflow-run.json is written atomically now; one torn by an older charlm (or by hand) starts a new MLflow run."""
    run_dir = tmp_path / "run"
    config = write_tiny(tmp_path, text_file, loggers=["mlflow"])
    code, _, err = call(capsys, "train", "--config", config, "--out", str(run_dir))
    assert code == 0, err
    record = run_dir / "mlflow-run.json"
    first = json.loads(record.read_text())["run_id"]
    record.write_text(record.read_text()[:12])  # cut short mid-write
    code, out, err = call(capsys, "train", "--resume", "--out", str(run_dir), "--set", "train.max_steps=9")
    assert code == 0, err
    assert "Traceback" not in out + err and not warnings(out, err)
    assert f"{record} is unreadable; starting a new MLflow run" in out + err
    assert json.loads(record.read_text())["run_id"] != first
    assert not list(run_dir.glob(".mlflow-run.json.tmp-*"))
