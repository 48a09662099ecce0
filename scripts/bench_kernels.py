"""What runs where, for scripts/bench.py: the vendor RNN ops (oneDNN, cuDNN) each variant runs as
torch.profiler records them, whether bf16 can run here, the device's libraries, and the peak RSS
of a fresh process per variant."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import torch
from bench_variants import VARIANTS, E, L, V, build_variant, key
from torch import nn

PROFILE_T = 5  # steps of the profiled forward: small, and distinct from L in the op counts


@contextlib.contextmanager
def silenced_stderr():
    """fd 2 to /dev/null: the profiler's tracing library logs its start and stop there."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profiled_ops(module: nn.Module, x: torch.Tensor, dtype=None) -> collections.Counter:
    """Op names (with counts) that one forward + backward of `module` on x runs, recorded by torch.profiler."""
    with silenced_stderr(), torch.profiler.profile() as prof:
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
            out = module(x)[0]
        out.float().sum().backward()
    return collections.Counter(event.name for event in prof.events())


def vendor_rnn_ops(kind: str, variant: str, device: torch.device, dtype=None) -> list[str]:
    """The oneDNN (mkldnn) and cuDNN RNN ops one training forward + backward of a small variant runs."""
    x = torch.randint(0, V, (2, PROFILE_T), device=device)
    ops = profiled_ops(build_variant(kind, variant, 16, device), x, dtype)
    return sorted(n for n in ops if n.startswith("aten::") and ("mkldnn" in n or "cudnn_rnn" in n))


def step_loop_evidence(kind: str, device: torch.device) -> tuple[int, int]:
    """torch.nn's recurrent module alone: its aten::linear calls and the autograd matmul nodes of its backward."""
    rnn = cast(nn.Module, build_variant(kind, "torch.nn", 16, device).rnn)  # nn.Module types it as Tensor | Module
    ops = profiled_ops(rnn, torch.randn(2, PROFILE_T, E, device=device))
    return ops["aten::linear"], ops["AddmmBackward0"] + ops["MmBackward0"]


def rnn_kernel_check(device: torch.device, bf16: bool) -> dict[str, dict[str, list[str]]]:
    """Per model kind and variant, the vendor RNN ops it runs; the LSTMs under bf16 autocast too."""
    found = {kind: {v: vendor_rnn_ops(kind, v, device) for v in VARIANTS} for kind in ("lstm", "gru", "rnn")}
    if bf16:
        found["lstm_bf16"] = {v: vendor_rnn_ops("lstm", v, device, torch.bfloat16) for v in ("native", "torch.nn")}
    return found


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 rows can run here, and a line that says why."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"bf16: {'supported' if ok else 'not supported'} on this GPU"
    try:  # the check torch itself uses before it picks oneDNN's bf16 kernels
        ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        ok = False
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if not ok:
        return False, "bf16: this CPU lacks bf16 support in oneDNN; bf16 rows skipped"
    how = f"bf16 instructions: {', '.join(native)}" if native else "no bf16 instructions, so oneDNN emulates it"
    return True, f"bf16: supported by oneDNN on this CPU ({how})"


def describe_device(device: torch.device) -> tuple[str, list[str]]:
    """The device in words, and lines on the vendor libraries torch can use there."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
        return where, [
            f"cuDNN: available {torch.backends.cudnn.is_available()}, "
            f"version {torch.backends.cudnn.version()}, enabled {torch.backends.cudnn.enabled}"
        ]
    where = f"CPU, {torch.get_num_threads()} threads"
    return where, [
        f"oneDNN (mkldnn): available {torch.backends.mkldnn.is_available()}, "
        f"enabled {torch.backends.mkldnn.enabled} (torch.backends.mkldnn)"
    ]


def describe_kernels(found: dict) -> list[str]:
    """One line per model kind: the vendor RNN ops each variant ran ('none' when it ran none)."""
    lines = []
    for kind, per_variant in found.items():
        parts = [f"{v}: {', '.join(ops) if ops else 'none'}" for v, ops in per_variant.items()]
        lines.append(f"  {kind:9} " + "   ".join(parts))
    return lines


def report_kernels(device: torch.device, bf16: bool, results: dict) -> None:
    """Print, from profiled runs, which variants use a vendor RNN kernel, and what torch.nn runs otherwise."""
    found = rnn_kernel_check(device, bf16)
    print(
        f"vendor RNN kernels (ops named *mkldnn* / *cudnn_rnn*) seen by torch.profiler in one forward + "
        f"backward of each variant on {device.type}:"
    )
    print("\n".join(describe_kernels(found)))
    for kind in ("lstm", "gru", "rnn"):
        if not found[kind]["torch.nn"]:
            calls, backward = step_loop_evidence(kind, device)
            loop = (
                " (per layer one input projection + one per step): torch's generic step loop, differentiated "
                "by autograd"
                if calls == backward == L * (PROFILE_T + 1)
                else ""
            )
            print(
                f"  torch.nn.{kind.upper()}: no vendor RNN kernel; at T={PROFILE_T}, L={L} it ran {calls} "
                f"aten::linear and {backward} matmul backward nodes{loop}"
            )
    results["rnn_kernel_ops"] = found


def peak_rss_mb(kind: str, variant: str, batch: int, seq: int, hidden: int, device: str) -> float:
    """Peak RSS of a fresh process that trains a few steps of one variant."""
    code = (
        "import sys, torch; sys.argv=['bench']; import bench_variants as bench; "
        f"d=torch.device('{device}'); m=bench.build_variant('{kind}','{variant}',{hidden},d); "
        "o=torch.optim.AdamW(m.parameters()); "
        f"x=torch.randint(0,bench.V,({batch},{seq}),device=d); "
        "[bench.train_step(m,o,x,x) for _ in range(3)]; "
        "print(bench.own_peak_rss_kb())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def report_peak_rss(device: str, results: dict) -> None:
    print("\npeak RSS, fresh process per variant, 3 training steps at B=32 T=128 H=256")
    for kind in ("lstm", "rnn", "gru"):
        rss = {v: peak_rss_mb(kind, v, 32, 128, 256, device) for v in VARIANTS}
        print(f"{kind:6} " + "   ".join(f"{v} {rss[v]:6.0f} MB" for v in VARIANTS))
        results.update({f"{kind}_{key(v)}_peak_rss_mb": rss[v] for v in VARIANTS})
