"""Data parallelism with torchrun (gloo, 2 CPU processes), gradient accumulation, precision, compile."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, InfGradients, params, quiet, tiny_config

from charlm.config import validate_config
from charlm.errors import UserError
from charlm.store.metrics import read_metrics
from charlm.training import trainer as trainer_module
from charlm.training.distributed import World, any_rank_flag
from charlm.training.run import train
from charlm.training.runtime import process_device_note, resolve_device


def torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m charlm ARGS`, as a user would."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "charlm", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def assert_same_params(a, b, tol=1e-5):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=0, msg=name)


@pytest.fixture
def config(tmp_path, text_file, write_config):
    # dropout off: its masks are drawn per process. Weight dropout's masks are drawn once per
    # update from the seed and the step, the same on every rank, so it is on.
    return write_config(
        tiny_config(
            text_file,
            model={"num_layers": 2, "weight_dropout": 0.3},
            train={"batch_size": 8, "max_steps": 6, "eval_interval": 3, "lr_schedule": "constant"},
        )
    )  # resumes change max_steps


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, config, cli):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert cli("train", "--config", str(config), "--out", str(single)).returncode == 0
    result = torchrun("train", "--config", str(config), "--out", str(ddp))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_params(params(single), params(ddp))
    # rank 0 alone wrote files and printed the report
    assert sorted(p.name for p in ddp.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]
    starts = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    assert result.stdout.count("done: 6 steps") == 1 and "2 processes (torchrun)" in result.stdout
    # the checkpoint holds the global state, like a single process's
    assert torch.load(ddp / "last.pt", weights_only=True)["train_state"][0].shape == (2, 8, 16)


@pytest.mark.slow
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


@pytest.mark.slow
def test_ddp_with_dropout_resumes_exactly(tmp_path, text_file, write_config):
    """Each rank's dropout stream is saved and continued: 3 + resumed 3 steps = 6 steps."""
    config = write_config(
        tiny_config(
            text_file,
            model={"num_layers": 2, "dropout": 0.3},
            train={"batch_size": 8, "max_steps": 6, "eval_interval": 3, "lr_schedule": "constant"},
        ),
        name="dropout.yaml",
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert torchrun("train", "--config", str(config), "--out", str(whole)).returncode == 0
    first = torchrun("train", "--config", str(config), "--out", str(split), "--set", "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun("train", "--resume", "--out", str(split), "--set", "train.max_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_params(params(whole), params(split), tol=0)


@pytest.mark.parametrize("weight_dropout", [0.0, 0.3])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, text_file, weight_dropout):
    """Also with weight dropout: one mask per update, shared by its micro-batches."""
    model = {"num_layers": 2, "weight_dropout": weight_dropout}
    base = tiny_config(text_file, model=model, train={"batch_size": 8, "max_steps": 5})
    full = train(validate_config(base), tmp_path / "full", display=quiet())
    accumulated = validate_config(
        tiny_config(text_file, model=model, train={"batch_size": 8, "max_steps": 5, "gradient_accumulation_steps": 4})
    )
    train(accumulated, tmp_path / "acc", display=quiet())
    assert full.step == 5
    assert_same_params(params(tmp_path / "full"), params(tmp_path / "acc"))


def test_batch_must_split_evenly(tmp_path, text_file, capsys):
    from conftest import assert_user_error, call

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(tiny_config(text_file, train={"batch_size": 6, "gradient_accumulation_steps": 4})))
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "r")),
        "train.batch_size (6) must divide evenly into 1 process(es) x 4 accumulation step(s)",
    )


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_bf16_autocast_on_the_cpu_learns_as_fp32_does(tmp_path, text_file, backend):
    """bf16 must learn: its val loss ends far below the untrained ln V and close to fp32's."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = validate_config(
            tiny_config(
                text_file,
                model={"backend": backend, "hidden_size": 32},
                train={"precision": precision, "max_steps": 40, "eval_interval": 40, "lr": 0.02},
            )
        )
        runs[precision] = train(cfg, tmp_path / precision, display=quiet())
    vocab = len(set(text_file.read_text()))
    untrained = math.log(vocab)  # 3.3 nats: what uniform predictions score
    bf16, fp32 = runs["bf16"].best_val_loss, runs["fp32"].best_val_loss
    assert bf16 < untrained - 1.0, (bf16, untrained)
    assert abs(bf16 - fp32) < 0.1, (bf16, fp32)
    weights = params(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # master weights


def test_fp16_skips_overflowing_steps_and_shrinks_the_loss_scale(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(trainer_module.Trainer, "loss", staticmethod(InfGradients({3, 4, 7})))
    cfg = validate_config(tiny_config(text_file, train={"precision": "fp16", "max_steps": 10, "eval_interval": 5}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.step == 10
    skips = [m["step"] for m in read_metrics(tmp_path / "run") if m["event"] == "skip"]
    assert skips == [3, 4, 7]  # a skipped step still counts as a step
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    initial = torch.amp.GradScaler("cpu").get_scale()
    assert payload["scaler"]["scale"] == initial * 0.5**3  # halved once per overflowing step
    assert all(torch.isfinite(w).all() for w in payload["model"].values())


@pytest.mark.slow
def test_fp16_with_a_huge_learning_rate_ends_without_a_traceback(tmp_path, text_file, write_config, cli):
    config = write_config(
        tiny_config(text_file, train={"precision": "fp16", "lr": 1000, "max_steps": 30, "eval_interval": 10})
    )
    result = cli("train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode in (0, 2), result.stderr[-3000:]
    if result.returncode == 2:  # gave up: one line naming what to lower
        assert result.stderr.strip().splitlines()[-1].startswith("charlm: error: training diverged")


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(tmp_path, text_file):
    cfg = validate_config(
        tiny_config(text_file, model={"backend": "reference"}, train={"compile": True, "max_steps": 3})
    )
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.step == 3
    names = list(params(tmp_path / "run"))
    assert names and not any(n.startswith("_orig_mod") for n in names)  # loads into a plain CharLM


def test_compile_failure_falls_back_to_eager(tmp_path, text_file, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler backend")

    monkeypatch.setattr(torch, "compile", broken)
    from rich.console import Console

    from charlm.report.progress import TrainingDisplay

    cfg = validate_config(tiny_config(text_file, train={"compile": True, "max_steps": 2}))
    outcome = train(cfg, tmp_path / "run", display=TrainingDisplay(Console(force_terminal=False)))
    assert outcome.step == 2 and "torch.compile is unavailable here (no compiler backend)" in capsys.readouterr().out


@pytest.fixture
def four_gpus(monkeypatch):
    """What torch reports on a node with 4 GPUs (nothing here touches one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


@pytest.mark.parametrize(
    "spec,local_rank,expected",
    [
        ("auto", 2, "cuda:2"),
        ("cuda", 2, "cuda:2"),
        ("cuda:3", 1, "cuda:1"),
        ("cuda:1", 1, "cuda:1"),
        ("cpu", 3, "cpu"),
        ("cuda:3", None, "cuda:3"),
        ("auto", None, "cuda"),
    ],
)
def test_each_torchrun_process_takes_its_own_gpu(four_gpus, spec, local_rank, expected):
    """Under torchrun (a local rank) auto, cuda and cuda:N all mean GPU LOCAL_RANK: a fixed N would put
    every process of the node on one GPU. Without torchrun an explicit device is kept."""
    assert resolve_device(spec, local_rank) == torch.device(expected)


def test_an_overridden_cuda_index_is_said_in_one_line(four_gpus):
    note = process_device_note("cuda:3", resolve_device("cuda:3", 1))
    assert note == (
        "train.device cuda:3 is not used under torchrun: each process takes its own GPU, "
        "cuda:LOCAL_RANK (this one cuda:1)"
    )
    assert process_device_note("cuda", resolve_device("cuda", 1)) is None
    assert process_device_note("cuda:1", resolve_device("cuda:1", 1)) is None


def test_more_processes_than_gpus_is_one_line(four_gpus):
    with pytest.raises(UserError, match=r"LOCAL_RANK 5\) has no GPU of its own: this machine has 4; start at most 4"):
        resolve_device("cuda", 5)


def test_without_cuda_torchrun_processes_stay_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available here"):
        resolve_device("cuda:1", 1)


def test_the_skip_agreement_reads_one_flag():
    """One process: the device flag itself (a CPU read is free); under torchrun it is reduced first."""
    assert any_rank_flag(torch.tensor(True), World()) is True
    assert any_rank_flag(~torch.tensor(True), World()) is False


def test_a_process_that_joined_a_group_ends_without_the_interpreter_teardown(monkeypatch, tmp_path):
    # gloo's threads outlive destroy_process_group (DDP's reducer keeps the group): the CLI ends
    # such a process with os._exit and the command's own exit code, streams flushed
    from charlm import cli
    from charlm.training import distributed

    left = []
    monkeypatch.setattr(distributed, "_joined", True)
    monkeypatch.setattr(distributed, "leave_process", left.append)
    with pytest.raises(SystemExit):
        cli.main(["info", "--checkpoint", str(tmp_path / "missing")])
    assert left == [2]
    monkeypatch.setattr(distributed, "_joined", False)
    with pytest.raises(SystemExit):
        cli.main(["info", "--checkpoint", str(tmp_path / "missing")])
    assert left == [2]
