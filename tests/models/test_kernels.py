"""Which bf16 step GEMM the C++ loops take: AMX tiles only on a CPU with AMX (and not under a lower
CHARLM_MAX_ISA), and the tile code itself checked where no AMX exists by forcing oneDNN's micro-kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from charlm import hardware
from charlm.models.native import cpp_loops

KIND = "from charlm.models.native import cpp_loops; print(cpp_loops().bf16_step_gemm())"


def kernel_in_fresh_process(**env) -> str:
    done = subprocess.run(
        [sys.executable, "-c", KIND], env={**os.environ, **env}, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def ops():
    loops = cpp_loops()
    if loops is None:
        pytest.skip("the C++ loops are not built here")
    return loops


def test_amx_tiles_only_where_the_cpu_has_amx(ops):
    kind = ops.bf16_step_gemm()
    if "amx_bf16" not in hardware.cpu_flags():
        assert kind != "amx-tiles"
        assert kind == ("vdpbf16ps" if hardware.at_least(hardware.isa_level(), "avx512_bf16") else "aten")
    else:
        assert kind == "amx-tiles"


@pytest.mark.slow
def test_a_lower_isa_cap_keeps_the_tiles_off(ops):
    kind = kernel_in_fresh_process(CHARLM_MAX_ISA="avx512_bf16", CHARLM_BF16_GEMM="brgemm")
    assert kind in ("vdpbf16ps", "aten")


@pytest.mark.slow
def test_the_tile_code_computes_what_the_loops_expect(ops):
    """Forced onto oneDNN's micro-kernel (unpacked where there is no AMX), the bf16 layer tests pass."""
    if kernel_in_fresh_process(CHARLM_BF16_GEMM="brgemm") != "brgemm" and "amx_bf16" not in hardware.cpu_flags():
        pytest.skip("this torch build or CPU has no bf16 micro-kernel")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/models/test_layers.py", "-k", "bf16"],
        env={**os.environ, "CHARLM_BF16_GEMM": "brgemm"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
