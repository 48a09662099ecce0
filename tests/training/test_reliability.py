"""Nothing is lost: kill -9 at any moment, signals, blow-ups, locks, full disks, early stopping."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import assert_user_error, call, run_cli, tiny_config, wait_for
from rich.console import Console

import charlm.training.checkpoint_contents as contents_module
import charlm.training.trainer as trainer_module
import charlm.training.validation as validation_module
from charlm.config import validate_config
from charlm.models.model import CharLM
from charlm.report.progress import TrainingDisplay
from charlm.store.checkpoint import load_checkpoint
from charlm.store.metrics import read_metrics
from charlm.training.run import train


def quiet():
    return TrainingDisplay(Console(quiet=True))


def start_training(config, run_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "charlm", "train", "--config", str(config), "--out", str(run_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, text_file, write_config):
    """SIGKILL a real training process again and again, mostly mid-save (a save every step)."""
    config = write_config(
        tiny_config(
            text_file,
            model={"hidden_size": 64, "num_layers": 2},
            train={
                "max_steps": None,
                "max_time": "10m",
                "checkpoint_interval": 1,
                "eval_interval": 7,
                "log_interval": 1,
            },
        )
    )
    run_dir = tmp_path / "run"
    proc = start_training(config, run_dir)
    assert wait_for(lambda: (run_dir / "last.pt").exists())
    rng = random.Random(0)
    steps = []
    for _ in range(8):
        time.sleep(rng.uniform(0.3, 4.0))  # sometimes during start-up, mostly while training and saving
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps.append(load_checkpoint(run_dir / "last.pt")["step"])  # never half a file
        if (run_dir / "best.pt").exists():
            load_checkpoint(run_dir / "best.pt")
        proc = start_training(config, run_dir, "--resume")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = run_cli(
        "train",
        "--resume",
        "--out",
        str(run_dir),
        "--set",
        "train.max_time=null",
        "--set",
        f"train.max_steps={load_checkpoint(run_dir / 'last.pt')['step'] + 3}",
    )
    assert final.returncode == 0, final.stderr
    assert "taking over the lock" in final.stdout
    assert steps == sorted(steps) and steps[-1] > 0  # progress was kept across kills
    assert not list(run_dir.glob(".*.tmp-*"))  # unfinished writes were cleaned up


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(tmp_path, text_file, write_config):
    config = write_config(
        tiny_config(text_file, train={"max_steps": None, "max_time": "5m", "log_interval": 1, "eval_interval": 100_000})
    )
    run_dir = tmp_path / "run"
    proc = start_training(config, run_dir)
    assert wait_for(
        lambda: (run_dir / "metrics.jsonl").exists() and '"train"' in (run_dir / "metrics.jsonl").read_text()
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM: stopped at step" in out
    assert load_checkpoint(run_dir / "last.pt")["step"] >= 1
    assert not (run_dir / ".lock").exists()


class InjectNaN:
    """Replaces the training loss with NaN on chosen calls (counted from 1)."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0
        self.real = trainer_module.Trainer.loss

    def __call__(self, logits, targets):
        self.calls += 1
        loss = self.real(logits, targets)
        return loss * float("nan") if self.calls in self.bad_calls else loss


def test_a_nan_step_is_skipped_and_logged(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(trainer_module.Trainer, "loss", staticmethod(InjectNaN({5})))
    cfg = validate_config(tiny_config(text_file, train={"max_steps": 12, "eval_interval": 6}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.step == 12
    skips = [m for m in read_metrics(tmp_path / "run") if m["event"] == "skip"]
    assert [m["step"] for m in skips] == [5]
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["progress"]["skipped_steps"] == 1 and payload["progress"]["lr_scale"] == 1.0
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


class NaNInput:
    """Puts one NaN into the recurrent layers' input (one stream, one time step) on chosen calls."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0
        self.real = CharLM.embed

    def __call__(self, model, idx):
        x = self.real(model, idx)  # [T, B, D]
        if model.training:
            self.calls += 1
            if self.calls in self.bad_calls:
                x = x.clone()
                x[3, 1, 0] = float("nan")
        return x


@pytest.mark.parametrize("backend", ["native", "fused", "reference"])
def test_a_nan_inside_the_recurrence_is_seen_by_every_backend(tmp_path, text_file, monkeypatch, backend):
    """No backend turns a NaN gate input into a finite output: the step is caught and skipped."""
    inject = NaNInput({4})
    monkeypatch.setattr(CharLM, "embed", lambda model, idx: inject(model, idx))
    cfg = validate_config(tiny_config(text_file, model={"backend": backend}, train={"max_steps": 8}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.step == 8
    assert [m["step"] for m in read_metrics(tmp_path / "run") if m["event"] == "skip"] == [4]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "run" / "last.pt")["model"].values())


def test_a_run_of_nans_rolls_back_with_a_lower_learning_rate(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(trainer_module.Trainer, "loss", staticmethod(InjectNaN(range(9, 12))))
    cfg = validate_config(
        tiny_config(
            text_file, train={"max_steps": 16, "eval_interval": 4, "max_bad_steps": 3, "rollback_lr_factor": 0.25}
        )
    )
    outcome = train(cfg, tmp_path / "run", display=quiet())
    events = read_metrics(tmp_path / "run")
    rollbacks = [m for m in events if m["event"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 8 and rollbacks[0]["lr_scale"] == 0.25
    assert outcome.step == 16
    progress = load_checkpoint(tmp_path / "run" / "last.pt")["progress"]
    assert progress["lr_scale"] == 0.25 and progress["rollbacks"] == 1 and progress["skipped_steps"] == 3


def test_endless_nans_give_up_with_a_clear_message(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setattr(trainer_module.Trainer, "loss", staticmethod(InjectNaN(range(3, 10_000))))
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(tiny_config(text_file, train={"max_steps": 100, "max_bad_steps": 2, "max_rollbacks": 2}))
    )
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run")),
        "training diverged: 2 non-finite steps in a row after 2 rollback(s)",
    )
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 0  # the last good checkpoint is intact
    rollbacks = [m for m in read_metrics(tmp_path / "run") if m["event"] == "rollback"]
    assert [m["rollbacks"] for m in rollbacks] == [1, 2]  # it tried every rollback it was allowed first


def test_early_stopping(tmp_path, text_file, monkeypatch):
    losses = iter([2.0, 1.5, 1.6, 1.7, 1.4])  # best at the 2nd eval, then two without improvement

    def fake_totals(model, ids, streams, part=(0, 1)):
        return next(losses) * 10, 10

    monkeypatch.setattr(validation_module, "evaluate_totals", fake_totals)
    cfg = validate_config(tiny_config(text_file, train={"max_steps": 50, "eval_interval": 2, "patience": 2}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.stop_reason == "early_stop" and outcome.step == 8
    assert outcome.best_step == 4 and load_checkpoint(tmp_path / "run" / "best.pt")["step"] == 4


def test_checkpoint_interval_in_steps(tmp_path, text_file, monkeypatch):
    saved = []
    real = contents_module.save_checkpoint
    monkeypatch.setattr(
        contents_module, "save_checkpoint", lambda p, path: (saved.append((p["step"], path.name)), real(p, path))
    )
    cfg = validate_config(
        tiny_config(text_file, train={"max_steps": 10, "eval_interval": 100, "checkpoint_interval": 3})
    )
    train(cfg, tmp_path / "run", display=quiet())
    # step 10 twice: before the final evaluation (which a signal may cut short) and with its result
    assert [s for s, name in saved if name == "last.pt"] == [0, 3, 6, 9, 10, 10]


def test_second_trainer_on_a_run_dir_refuses(tmp_path, text_file, write_config, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(str(owner.pid))
        config = write_config(tiny_config(text_file))
        assert_user_error(
            call(capsys, "train", "--config", str(config), "--out", str(run_dir)),
            f"is in use by another charlm train (pid {owner.pid})",
        )
    finally:
        owner.kill()
        owner.wait()
    code, out, err = call(capsys, "train", "--config", str(config), "--out", str(run_dir))
    assert code == 0, err
    assert f"taking over the lock of {run_dir} left by pid {owner.pid}" in out
    assert not (run_dir / ".lock").exists()


def test_overwrite_moves_the_old_run_aside_and_says_where(tmp_path, text_file, write_config, capsys):
    config = write_config(tiny_config(text_file))
    run_dir = tmp_path / "run"
    assert call(capsys, "train", "--config", str(config), "--out", str(run_dir))[0] == 0
    old = (run_dir / "last.pt").read_bytes()
    code, out, err = call(capsys, "train", "--config", str(config), "--out", str(run_dir), "--overwrite")
    assert code == 0, err
    kept = list(run_dir.glob("replaced-*"))
    assert len(kept) == 1 and (kept[0] / "last.pt").read_bytes() == old
    assert "moved the earlier run's" in out and str(kept[0]) in out


def test_full_disk_during_a_save_keeps_the_earlier_checkpoint(tmp_path, text_file, write_config, capsys, monkeypatch):
    config = write_config(tiny_config(text_file, train={"max_steps": 20, "eval_interval": 5}))
    run_dir = tmp_path / "run"
    real, calls = torch.save, []

    def disk_fills_up(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 3:  # step 0 and step 5 (last) are written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    assert_user_error(call(capsys, "train", "--config", str(config), "--out", str(run_dir)), "No space left on device")
    monkeypatch.setattr(torch, "save", real)
    assert load_checkpoint(run_dir / "last.pt")["step"] in (0, 5)
    assert not list(run_dir.glob(".*.tmp-*"))


def test_unwritable_and_read_only_run_dirs(tmp_path, text_file, write_config, capsys, monkeypatch):
    config = write_config(tiny_config(text_file))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(blocker / "run")), "cannot write to run dir"
    )
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(blocker)), "exists and is not a directory"
    )

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("pathlib.Path.mkdir", read_only)
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "ro" / "run")), "Read-only file system"
    )
