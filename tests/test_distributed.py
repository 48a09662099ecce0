"""Data parallelism with torchrun (gloo, 2 CPU processes), gradient accumulation, precision, compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from charlm.config import validate_config
from charlm.run import train
from conftest import ROOT, tiny_config
from test_trainer import quiet


def torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m charlm ARGS`, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "charlm", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def params(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def assert_same_params(a, b, tol=1e-5):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=0, msg=name)


@pytest.fixture
def config(tmp_path, text_file, write_config):
    # dropout off: masks are drawn per process, everything else must match exactly
    return write_config(tiny_config(text_file, model={"num_layers": 2},
                                    train={"batch_size": 8, "max_steps": 6, "eval_interval": 3,
                                           "lr_schedule": "constant"}))  # resumes change max_steps


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, config, cli):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert cli("train", "--config", str(config), "--out", str(single)).returncode == 0
    result = torchrun("train", "--config", str(config), "--out", str(ddp))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_params(params(single), params(ddp))
    # rank 0 alone wrote files and printed the report
    assert sorted(p.name for p in ddp.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]
    starts = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()
              if '"start"' in line]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    assert result.stdout.count("done: 6 steps") == 1 and "2 processes (torchrun)" in result.stdout
    # the checkpoint holds the global state, like a single process's
    assert torch.load(ddp / "last.pt", weights_only=True)["train_state"][0].shape == (2, 8, 16)


def test_resume_across_ddp_and_single_process(tmp_path, config, cli):
    whole, mixed = tmp_path / "whole", tmp_path / "mixed"
    assert cli("train", "--config", str(config), "--out", str(whole)).returncode == 0
    first = torchrun("train", "--config", str(config), "--out", str(mixed), "--set", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli("train", "--resume", "--out", str(mixed), "--set", "train.max_steps=4")  # DDP -> one process
    assert second.returncode == 0, second.stderr
    third = torchrun("train", "--resume", "--out", str(mixed), "--set", "train.max_steps=6")  # and back
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming from step 4" in third.stdout
    assert_same_params(params(whole), params(mixed))


def test_gradient_accumulation_equals_the_full_batch(tmp_path, text_file):
    base = tiny_config(text_file, model={"num_layers": 2}, train={"batch_size": 8, "max_steps": 5})
    full = train(validate_config(base), tmp_path / "full", display=quiet())
    accumulated = validate_config(tiny_config(text_file, model={"num_layers": 2},
                                              train={"batch_size": 8, "max_steps": 5, "gradient_accumulation_steps": 4}))
    train(accumulated, tmp_path / "acc", display=quiet())
    assert full.step == 5
    assert_same_params(params(tmp_path / "full"), params(tmp_path / "acc"))


def test_batch_must_split_evenly(tmp_path, text_file, capsys):
    from test_cli import assert_user_error, call
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(tiny_config(text_file, train={"batch_size": 6, "gradient_accumulation_steps": 4})))
    assert_user_error(call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "r")),
                      "train.batch_size (6) must divide evenly into 1 process(es) x 4 accumulation step(s)")


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_bf16_autocast_on_the_cpu(tmp_path, text_file, backend):
    cfg = validate_config(tiny_config(text_file, model={"backend": backend},
                                      train={"precision": "bf16", "max_steps": 6, "lr": 0.02}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.step == 6 and outcome.best_val_loss is not None and outcome.best_val_loss < 4.0
    weights = params(tmp_path / "run")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # master weights


def test_fp16_with_loss_scaling(tmp_path, text_file):
    cfg = validate_config(tiny_config(text_file, train={"precision": "fp16", "max_steps": 4}))
    train(cfg, tmp_path / "run", display=quiet())
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]  # GradScaler state kept


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(tmp_path, text_file):
    cfg = validate_config(tiny_config(text_file, model={"backend": "reference"}, train={"compile": True, "max_steps": 3}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.step == 3
    names = list(params(tmp_path / "run"))
    assert names and not any(n.startswith("_orig_mod") for n in names)  # loads into a plain CharLM


def test_compile_failure_falls_back_to_eager(tmp_path, text_file, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler backend")

    monkeypatch.setattr(torch, "compile", broken)
    from rich.console import Console
    from charlm.progress import TrainingDisplay
    cfg = validate_config(tiny_config(text_file, train={"compile": True, "max_steps": 2}))
    outcome = train(cfg, tmp_path / "run", display=TrainingDisplay(Console(force_terminal=False)))
    assert outcome.step == 2 and "torch.compile is unavailable here (no compiler backend)" in capsys.readouterr().out
