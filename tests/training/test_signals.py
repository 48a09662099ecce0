"""Signals outside the training loop: Ctrl-C or SIGTERM while the corpus is encoded, during the final
evaluation, or in sample, ends with at most one line and 130 / 143, leaving no lock, scratch folder or traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PARAGRAPH, ROOT, call, run_cli, tiny_config, wait_for

from charlm.config import config_yaml
from charlm.errors import Interrupted
from charlm.store.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> Path:
    """30 MB: about 1.5 s of encoding on an idle machine, time enough to be interrupted in the middle of it."""
    path = tmp_path_factory.mktemp("big") / "big.txt"
    path.write_text(PARAGRAPH * (30_000_000 // len(PARAGRAPH)), encoding="utf-8")
    return path


def start(tmp_path: Path, config: dict, *args: str) -> subprocess.Popen:
    """`python -m charlm train` on `config` into tmp_path/run, with a corpus cache of its own."""
    (tmp_path / "c.yaml").write_text(config_yaml(config), encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHARLM_CACHE_DIR": str(tmp_path / "cache"), "CHARLM_NO_CPP": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charlm",
            "train",
            "--config",
            str(tmp_path / "c.yaml"),
            "--out",
            str(tmp_path / "run"),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def ended_with_one_line(proc: subprocess.Popen, signum: int, tmp_path: Path) -> str:
    """The process ended with 128 + signum, one line on stderr and nothing left behind; returns the line."""
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, (out, err)
    assert "Traceback" not in err and "done:" not in out, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"charlm: interrupted ({signal.Signals(signum).name}) "), err
    assert not (tmp_path / "run" / ".lock").exists()
    assert not list((tmp_path / "cache" / "data").glob(".build-*"))  # the encoder's scratch folder is gone
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_corpus_is_encoded(tmp_path, big_text, signum):
    proc = start(tmp_path, tiny_config(big_text))
    assert wait_for(lambda: list((tmp_path / "cache" / "data").glob(".build-*")), 60), proc.communicate()
    time.sleep(0.1)  # well inside the ~1.5 s the encoding takes
    proc.send_signal(signum)
    line = ended_with_one_line(proc, signum, tmp_path)
    assert line.endswith("while reading and encoding the corpus; nothing was trained")
    assert not list((tmp_path / "cache" / "data").iterdir())  # nothing half-encoded was cached
    assert not list((tmp_path / "run").glob("*.pt"))


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text(PARAGRAPH * 1200, encoding="utf-8")
    # 190,000 validation characters read as one stream, one step at a time: ~5 s of evaluation
    config = tiny_config(
        text,
        data={"val_fraction": 0.7},
        train={"max_steps": 1, "log_interval": 1, "eval_interval": 100, "eval_batch_size": 1},
    )
    proc = start(tmp_path, config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and '"train"' in metrics.read_text(), 60), proc.communicate()
    time.sleep(0.3)  # past the end of the loop (which would stop at a step boundary) and its save
    proc.send_signal(signal.SIGINT)
    line = ended_with_one_line(proc, signal.SIGINT, tmp_path)
    assert "during the final evaluation; training had finished" in line
    assert f"{tmp_path / 'run' / 'last.pt'} holds the trained model (step 1)" in line
    assert f"charlm train --resume --out {tmp_path / 'run'} --set train.max_steps=" in line
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 1  # saved before the evaluation began
    events = [json.loads(row) for row in metrics.read_text().splitlines()]
    assert not [e for e in events if e["event"] == "eval"]  # it was indeed cut short
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "interrupted"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    (folder / "input.txt").write_text(PARAGRAPH * 20, encoding="utf-8")
    (folder / "c.yaml").write_text(config_yaml(tiny_config(folder / "input.txt")), encoding="utf-8")
    assert run_cli("train", "--config", str(folder / "c.yaml"), "--out", str(folder / "run")).returncode == 0
    return folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sample_stops_quietly(trained, signum):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charlm",
            "sample",
            "--checkpoint",
            str(trained),
            "--length",
            "1000000",
            "--prompt",
            "It was",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout.read(20)  # it is streaming the sample
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum and err.decode().strip() == ""


# --- under torchrun: a signal that reaches rank 1 only -----------------------------------------


def torchrun(tmp_path: Path, config: dict) -> subprocess.Popen:
    """Two CPU processes (gloo); each rank's output goes to its own files under tmp_path/logs."""
    (tmp_path / "c.yaml").write_text(config_yaml(config), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "CHARLM_NO_CPP": "1",
        "CHARLM_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "--log-dir",
            str(tmp_path / "logs"),
            "--redirects",
            "3",
            "-m",
            "charlm",
            "train",
            "--config",
            str(tmp_path / "c.yaml"),
            "--out",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The worker process torchrun started as `rank` (its children, told apart by their RANK variable)."""
    for task in os.listdir(f"/proc/{launcher.pid}/task"):
        for child in Path(f"/proc/{launcher.pid}/task/{task}/children").read_text().split():
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return int(child)
    raise AssertionError(f"torchrun has no rank {rank} worker")


def rank_output(tmp_path: Path, rank: int, stream: str) -> str:
    (path,) = (tmp_path / "logs").glob(f"*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def finish(launcher: subprocess.Popen) -> None:
    try:
        launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0  # torchrun reports the signalled worker as failed


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers in /proc")


@pytest.mark.slow
@needs_proc
def test_ddp_rank_1_signalled_while_rank_0_encodes(tmp_path, big_text):
    launcher = torchrun(tmp_path, tiny_config(big_text, train={"batch_size": 8}))
    assert wait_for(lambda: list((tmp_path / "cache" / "data").glob(".build-*")), 120), launcher.communicate()
    os.kill(rank_pid(launcher, 1), signal.SIGTERM)  # rank 1 is waiting for rank 0 in a collective
    finish(launcher)
    rank1 = rank_output(tmp_path, 1, "stderr").strip().splitlines()
    assert len(rank1) == 1 and rank1[0].startswith("charlm: interrupted (SIGTERM) while "), rank1
    rank0 = rank_output(tmp_path, 0, "stderr")
    # Rank 0 ends either by torchrun's SIGTERM or by the broken connection to rank 1: one line either way.
    assert "Traceback" not in rank0 and len(rank0.strip().splitlines()) <= 1, rank0
    assert all(line.startswith("charlm: ") for line in rank0.strip().splitlines()), rank0
    assert not (tmp_path / "run" / ".lock").exists()
    assert not list((tmp_path / "cache" / "data").glob(".build-*"))


@pytest.mark.slow
@needs_proc
def test_ddp_rank_1_signalled_while_training(tmp_path, text_file):
    config = tiny_config(
        text_file,
        train={"batch_size": 8, "max_steps": None, "max_time": "5m", "log_interval": 1, "eval_interval": 100_000},
    )
    launcher = torchrun(tmp_path, config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and '"train"' in metrics.read_text(), 120), launcher.communicate()
    os.kill(rank_pid(launcher, 1), signal.SIGTERM)
    finish(launcher)
    # The ranks agree on the stop at a step boundary, and on the signal: rank 0 reports it as its own.
    assert "SIGTERM: stopped at step" in rank_output(tmp_path, 0, "stdout")
    assert rank_output(tmp_path, 0, "stderr") == "" and rank_output(tmp_path, 1, "stderr") == ""
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] >= 1
    assert not (tmp_path / "run" / ".lock").exists()


def test_ctrl_c_while_the_command_line_loads_ends_in_one_line(monkeypatch, capsys):
    import charlm.entry as entry

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "_load_cli", interrupted)
    with pytest.raises(SystemExit) as done:
        entry.main()
    assert done.value.code == 130
    assert capsys.readouterr().err == "charlm: interrupted while starting\n"


def test_the_console_script_runs_the_command():
    script = Path(sys.executable).with_name("charlm")
    if not script.exists():
        pytest.skip("charlm is not installed as a console script beside this python")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout


def test_ctrl_c_while_train_loads_torch_ends_in_one_line(monkeypatch, capsys, tmp_path):
    """The library (torch) loads on first use, seconds on a cold start: a signal then is before the run began."""
    import charlm.cli.train as train_command

    class LoadingLibrary:
        @property
        def train(self):
            raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(train_command, "lib", LoadingLibrary())
    config = tmp_path / "c.yaml"
    config.write_text(config_yaml(tiny_config(tmp_path / "text.txt")), encoding="utf-8")
    code, out, err = call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert code == 130
    assert err == "charlm: interrupted (SIGINT) while loading torch; nothing was written\n"
    assert not (tmp_path / "run").exists()
