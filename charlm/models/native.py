"""The native step loops: charlm/models/csrc/recurrent.cpp built on first use, or the same loops in PyTorch.

Both provide lstm_forward/backward, rnn_forward/backward and gru_forward/backward with the
signatures documented in recurrent.cpp. The C++ build is used on the CPU for float32/float64;
the PyTorch loops everywhere else (CUDA, other dtypes) and wherever the build fails, which
is announced once, in one line, on stderr. CHARLM_NO_CPP=1 skips the build.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from charlm import hardware
from charlm.atomic import replace, write_text_atomic
from charlm.cache import cache_root

# fp32/fp64 loops, and the mixed-precision (bf16 GEMM, fp32 state) loops
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("recurrent.cpp", "recurrent_bf16.cpp")]
_HEADERS = [
    Path(__file__).parent / "csrc" / name for name in ("step_gemm.h", "tile_gemm.h")
]  # part of the cache key, not compiled alone
# The parts of -ffast-math that let the compiler vectorise the gate loops, without
# -ffinite-math-only: that one lets it assume no NaN or Inf exists, so a NaN entering a gate
# could come out finite here but not in torch's kernels, silently corrupting a model the
# trainer's non-finite check would otherwise catch.
_MATH_FLAGS = [
    "-O3",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
    "-freciprocal-math",
    "-ffp-contract=fast",
]
# What each CHARLM_MAX_ISA level turns off of -march=native (gcc and clang spell these alike).
_CAP_FLAGS = {"avx2": ["-mno-avx512f"], "avx512": ["-mno-avx512bf16"], "avx512_bf16": [], "amx": []}
_loaded: dict[str, Any] = {}


def build_flags(
    system: str | None = None, machine: str | None = None, libc: str | None = None, level: str | None = None
) -> tuple[list[str], list[str]]:
    """Compiler and linker flags for this platform (arguments: to ask for another one).

    x86: -march=native, right because the build happens on the machine that runs it, less what
    CHARLM_MAX_ISA caps, with 512-bit vectors preferred where the level has them. Elsewhere (ARM,
    Apple Silicon) portable code the compiler vectorises itself. -lmvec (glibc's vector maths,
    which gcc calls for the vectorised exp/tanh) only on glibc; -fopenmp (the gate loops on
    torch's threads) except on macOS, whose clang has no OpenMP by default."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    libc = libc if libc is not None else platform.libc_ver()[0]
    cflags, ldflags = list(_MATH_FLAGS), []
    if machine in ("x86_64", "amd64"):
        level = level if level is not None else hardware.isa_level()
        cflags.append("-march=native")
        cap = hardware.isa_cap()
        if cap is not None:
            cflags += _CAP_FLAGS[cap]
        cflags.append(
            "-mprefer-vector-width=512" if hardware.at_least(level, "avx512") else "-mprefer-vector-width=256"
        )
    if system != "Darwin":
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if system == "Linux" and libc == "glibc":
        ldflags.append("-lmvec")
    return cflags, ldflags


def build_id() -> str:
    """The native build in use here, as part of a measurement's key: its cache name, or 'none'."""
    if cpp_loops() is None:
        return "none"
    return library_path().stem


def library_path() -> Path:
    """Where the built library is cached: keyed by the source, flags (so each CHARLM_MAX_ISA level has
    a build of its own), torch and machine."""
    key = hashlib.sha256()
    cflags, ldflags = build_flags()
    for part in (
        *(source.read_bytes() for source in _SOURCES + _HEADERS),
        " ".join(cflags + ldflags).encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        platform.machine().encode(),
        platform.node().encode(),
    ):
        key.update(part)
    return cache_root() / f"recurrent-{key.hexdigest()[:16]}.so"


def _build() -> Any:
    """Load the cached library, or build it first.

    torch's JIT loader holds a lock file in its build folder while it runs, which a process
    killed at that moment leaves behind, and every later load then waits on it forever. So
    each build happens in a private temporary folder and the finished library is renamed
    into the cache (atomic and fsynced; concurrent builders just both rename), and a cached
    library is loaded directly, with no lock at all. A damaged cached library (cut short by a
    full disk, a partial copy) would fail every later run: it is removed and rebuilt."""
    path = library_path()
    checksum = path.with_name(path.name + ".sha256")
    announce = "charlm: building the C++ step loop (once per machine and version, ~10 s)"
    if path.exists():
        damage = _load_cached(path, checksum)
        if damage is None:
            return torch.ops.charlm
        announce = f"charlm: the cached C++ step loop {path.name} is damaged ({damage}); rebuilding it (~10 s)"
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension  # noqa: PLC0415 - heavy, and only needed to build

    print(announce, file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as folder:
        name = f"charlm_recurrent_{path.stem.split('-')[1]}"
        cflags, ldflags = build_flags()
        cpp_extension.load(
            name=name,
            sources=[str(source) for source in _SOURCES],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=folder,
            is_python_module=False,
            verbose=False,
        )
        built = Path(folder) / f"{name}.so"
        write_text_atomic(checksum, hashlib.sha256(built.read_bytes()).hexdigest())
        replace(built, path)  # fsynced first: a power cut must not cache a torn library
    return torch.ops.charlm  # cpp_extension.load has loaded it into this process


def _load_cached(path: Path, checksum: Path) -> str | None:
    """Load the cached library; None when it loaded, else what is wrong with it.

    A library cut short can pass dlopen and then kill the process with SIGBUS when a missing
    page is touched, so its bytes are checked against the checksum written with it first."""
    if not checksum.exists():
        return f"{checksum.name} is missing"
    if checksum.read_text().strip() != hashlib.sha256(path.read_bytes()).hexdigest():
        return "its bytes do not match its checksum"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        return str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
    return None


def cpp_loops() -> Any | None:
    """torch.ops.charlm once built (None if disabled or if the build failed)."""
    if "ops" not in _loaded:
        _loaded["ops"] = None
        hardware.isa_cap()  # a CHARLM_MAX_ISA it does not know is the user's to fix, not a failed build
        if os.environ.get("CHARLM_NO_CPP", "") not in ("", "0"):
            return None
        try:
            _loaded["ops"] = _build()
        except Exception as err:  # any build failure means: use the PyTorch loops
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(
                f"charlm: the C++ step loop could not be built ({reason[:160]}); using the PyTorch step loop (slower)",
                file=sys.stderr,
            )
    return _loaded["ops"]


def step_loops(like: torch.Tensor):
    """The loop implementation for tensors like `like`: C++ on the CPU when built, else PyTorch."""
    if like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64):
        ops = cpp_loops()
        if ops is not None:
            return ops
    return TORCH_LOOPS


# --- the same loops in PyTorch ------------------------------------------------------------


def _previous_states(h0: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    return torch.cat([h0.unsqueeze(0), hs[:-1]]).reshape(-1, hs.shape[2])  # [T*B, H]


def lstm_forward(gates, h0, c0, w_hh):
    """In place: gates [T, B, 4H] (input part on entry) become the activations i f g o."""
    T, B, G = gates.shape
    H = G // 4
    hs, cs = gates.new_empty(T, B, H), gates.new_empty(T, B, H)
    h, c = h0, c0
    for t in range(T):
        a = gates[t].addmm_(h, w_hh.t())  # [B, 4H]
        a[:, : 2 * H].sigmoid_()
        a[:, 2 * H : 3 * H].tanh_()
        a[:, 3 * H :].sigmoid_()
        i, f, g, o = a.chunk(4, dim=1)
        c = torch.mul(f, c, out=cs[t]).addcmul_(i, g)
        h = torch.tanh(c, out=hs[t]).mul_(o)
    return hs, cs


def lstm_backward(dhs, dh_last, dc_last, acts, hs, cs, h0, c0, w_hh):
    T, B, G = acts.shape
    dg = torch.empty_like(acts)
    dh_next, dc = dh_last.clone(), dc_last.clone()
    for t in range(T - 1, -1, -1):
        i, f, g, o = acts[t].chunk(4, dim=1)
        c_prev = cs[t - 1] if t > 0 else c0
        dh = dhs[t] + dh_next
        tc = torch.tanh(cs[t])
        dc = dc + dh * o * (1 - tc * tc)
        di, df, dgg, do = dg[t].chunk(4, dim=1)
        torch.mul(dc * g, i * (1 - i), out=di)
        torch.mul(dc * c_prev, f * (1 - f), out=df)
        torch.mul(dc * i, 1 - g * g, out=dgg)
        torch.mul(dh * tc, o * (1 - o), out=do)
        dc = dc * f
        dh_next = dg[t] @ w_hh
    dw = dg.reshape(-1, G).t() @ _previous_states(h0, hs)
    return dg, dh_next, dc, dw


def rnn_forward(gates, h0, w_hh):
    """In place: gates [T, B, H] (input part on entry) become the outputs h_t."""
    h = h0
    for t in range(gates.shape[0]):
        h = gates[t].addmm_(h, w_hh.t()).tanh_()
    return gates


def rnn_backward(dhs, dh_last, hs, h0, w_hh):
    dg = torch.empty_like(hs)
    dh_next = dh_last.clone()
    for t in range(hs.shape[0] - 1, -1, -1):
        torch.mul(dhs[t] + dh_next, 1 - hs[t] * hs[t], out=dg[t])
        dh_next = dg[t] @ w_hh
    dw = dg.reshape(-1, hs.shape[2]).t() @ _previous_states(h0, hs)
    return dg, dh_next, dw


def gru_forward(gx, h0, w_hh, b_hn):
    T, B, G = gx.shape
    H = G // 3
    acts, ghn, hs = torch.empty_like(gx), gx.new_empty(T, B, H), gx.new_empty(T, B, H)
    bias = torch.cat([b_hn.new_zeros(2 * H), b_hn])
    h = h0
    for t in range(T):
        gh = torch.addmm(bias, h, w_hh.t())  # [B, 3H]
        xr, xz, xn = gx[t].chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r, z, n = acts[t].chunk(3, dim=1)
        torch.sigmoid(xr + hr, out=r)
        torch.sigmoid(xz + hz, out=z)
        torch.tanh(xn + r * hn, out=n)
        ghn[t] = hn
        h = torch.add(n, z * (h - n), out=hs[t])  # (1 - z) * n + z * h
    return hs, acts, ghn


def gru_backward(dhs, dh_last, acts, ghn, hs, h0, w_hh):
    T, B, G = acts.shape
    dgx, dgh = torch.empty_like(acts), torch.empty_like(acts)
    dh_next = dh_last.clone()
    for t in range(T - 1, -1, -1):
        r, z, n = acts[t].chunk(3, dim=1)
        h_prev = hs[t - 1] if t > 0 else h0
        dh = dhs[t] + dh_next
        dpn = dh * (1 - z) * (1 - n * n)
        dpr = dpn * ghn[t] * r * (1 - r)
        dpz = dh * (h_prev - n) * z * (1 - z)
        dgx[t] = torch.cat([dpr, dpz, dpn], dim=1)
        dgh[t] = torch.cat([dpr, dpz, dpn * r], dim=1)
        dh_next = torch.addmm(dh * z, dgh[t], w_hh)
    flat = dgh.reshape(-1, G)
    return dgx, dh_next, flat.t() @ _previous_states(h0, hs), flat[:, 2 * (G // 3) :].sum(0)


TORCH_LOOPS = SimpleNamespace(
    lstm_forward=lstm_forward,
    lstm_backward=lstm_backward,
    rnn_forward=rnn_forward,
    rnn_backward=rnn_backward,
    gru_forward=gru_forward,
    gru_backward=gru_backward,
)
