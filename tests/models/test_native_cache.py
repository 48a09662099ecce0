"""A damaged C++ build in the cache (a disk that filled up, a partial copy) is rebuilt, not fatal to every later run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from torch.utils import cpp_extension

from charlm.models import native

# A tiny forward through the native backend; prints whether the C++ loops ran it.
FORWARD = """
import torch
from charlm.models import native
from charlm.config import validate_config
from charlm.models.model import CharLM
cfg = validate_config({"data": {"path": "x.txt"}, "model": {"hidden_size": 8, "num_layers": 1, "embedding_dim": 4},
                       "train": {"max_steps": 1}})
logits, _ = CharLM(cfg.model, 5, "native")(torch.randint(0, 5, (2, 6)))
assert logits.shape == (2, 6, 5)
print(native.cpp_loops() is not None)
"""


def forward_in(cache) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FORWARD],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CHARLM_CACHE_DIR": str(cache), "CHARLM_NO_CPP": ""},
    )


@pytest.mark.slow
def test_a_truncated_cached_library_is_rebuilt(tmp_path):
    if native.cpp_loops() is None:  # builds it into the tests' own cache, once
        pytest.skip("the C++ step loop cannot be built on this machine")
    built = native.library_path()
    damaged = tmp_path / built.name  # the same key: the copy is what a run with this cache would load
    shutil.copyfile(built, damaged)
    shutil.copyfile(built.with_name(built.name + ".sha256"), tmp_path / (built.name + ".sha256"))
    with open(damaged, "r+b") as handle:
        handle.truncate(built.stat().st_size // 3)
    result = forward_in(tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
    assert f"the cached C++ step loop {built.name} is damaged" in result.stderr and "rebuilding" in result.stderr
    assert damaged.stat().st_size > built.stat().st_size // 3
    again = forward_in(tmp_path)  # the rebuilt library now loads as it is
    assert again.returncode == 0 and again.stdout.strip() == "True" and again.stderr == "", again.stderr
    assert not list(tmp_path.glob(".build-*"))


def test_when_the_rebuild_fails_too_the_pytorch_loops_take_over(tmp_path, monkeypatch, capsys):
    damaged = tmp_path / "recurrent-0123456789abcdef.so"
    damaged.write_bytes(b"\x7fELF cut short")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "library_path", lambda: damaged)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.delenv("CHARLM_NO_CPP", raising=False)
    assert native.cpp_loops() is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "is damaged (recurrent-0123456789abcdef.so.sha256 is missing)" in lines[0]
    assert lines[1] == (
        "charlm: the C++ step loop could not be built (Error building extension: g++ not found); "
        "using the PyTorch step loop (slower)"
    )
    assert not damaged.exists()  # the next run tries a build again instead of loading it
