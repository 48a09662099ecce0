"""Shared fixtures: small texts, tiny configs, and ways to run the real CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from charlm.config import config_yaml

# The tests build the C++ step loop and encode corpora into a cache of their own, never the user's.
os.environ["CHARLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="charlm-test-cache-")
# `model.backend: auto` from the fixed table, not from timing this machine: the same backend on every
# run (tests/models/test_autotune.py measures, with this unset).
os.environ["CHARLM_AUTO"] = "fixed"

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"

# A short, varied English text; tests repeat it to get the length they need.
PARAGRAPH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness.\n"
)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text(PARAGRAPH * 20, encoding="utf-8")
    return path


def tiny_config(data_path: Path, **sections) -> dict:
    """A config that trains in about a second; `sections` update its parts."""
    config: dict[str, dict[str, Any]] = {
        "data": {"path": str(data_path), "val_fraction": 0.2},
        "model": {"type": "lstm", "hidden_size": 16, "num_layers": 1, "embedding_dim": 8},
        "train": {
            "batch_size": 4,
            "seq_len": 16,
            "lr": 0.01,
            "max_steps": 6,
            "eval_interval": 3,
            "log_interval": 2,
            "device": "cpu",
        },
        "sample": {"length": 20},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


@pytest.fixture
def write_config(tmp_path: Path):
    def write(config: dict, name: str = "tiny.yaml") -> Path:
        path = tmp_path / name
        path.write_text(config_yaml(config), encoding="utf-8")
        return path

    return write


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m charlm ARGS` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "charlm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def cli():
    return run_cli


def train_tiny_run(folder: Path, **sections) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """Train a tiny run on PARAGRAPH * 20 in `folder` through the real CLI (a subprocess);
    `sections` update tiny_config. Returns the run dir, the text file, the config and the result."""
    text_file = folder / "input.txt"
    text_file.write_text(PARAGRAPH * 20, encoding="utf-8")
    config = folder / "tiny.yaml"
    config.write_text(config_yaml(tiny_config(text_file, **sections)), encoding="utf-8")
    run_dir = folder / "run"
    result = run_cli("train", "--config", str(config), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir, text_file, config, result


def needs_shared_data(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (shared corpora not mounted)")


class Collect:
    """The events of one engine request (its sink), and when it is done. `beside` (another Collect)
    is looked at when this request ends, to record whether that one was still running then (so the
    two really shared the batch)."""

    def __init__(self, beside: Collect | None = None):
        self.events: list[dict] = []
        self.done, self.beside = threading.Event(), beside
        self.overlapped: bool | None = None  # None until the request ends

    def __call__(self, event):  # runs in the engine's thread
        self.events.append(event)
        if event.get("done") or "error" in event:
            if self.beside is not None:
                self.overlapped = not self.beside.done.is_set()
            self.done.set()

    def texts(self, n=1):
        out = [""] * n
        for event in self.events:
            if "text" in event:
                out[event["index"]] += event["text"]
        return out

    def finals(self):
        return [e for e in self.events if "finish_reason" in e]

    def errors(self):
        return [e["error"] for e in self.events if "error" in e]


def call(capsys, *argv):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from charlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_user_error(result, fragment):
    """A user's mistake: exit 2 and one line on stderr that says `fragment`."""
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err


def wait_for(predicate, seconds=60.0):
    """Poll `predicate` until it holds (True) or `seconds` pass (False)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def quiet():
    """A training display that prints nothing."""
    from rich.console import Console

    from charlm.report.progress import TrainingDisplay

    return TrainingDisplay(Console(quiet=True))


def params(run_dir):
    """The weights of a run's last.pt."""
    import torch

    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


class InfGradients:
    """Makes the training loss infinite on chosen calls (counted from 1): its gradients overflow."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0
        from charlm.training import trainer as trainer_module

        self.real = trainer_module.Trainer.loss

    def __call__(self, logits, targets):
        self.calls += 1
        loss = self.real(logits, targets)
        return loss * float("inf") if self.calls in self.bad_calls else loss


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained once per module through the real entry point (a subprocess)."""
    run_dir, _, config, result = train_tiny_run(tmp_path_factory.mktemp("trained"))
    return run_dir, config, result


def load_script(name: str):
    """scripts/NAME.py imported as a module (the scripts are not a package), registered under its name."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module
