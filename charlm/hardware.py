"""What this machine's CPU can do, and how far charlm may use it: the one place that reads /proc/cpuinfo
and CHARLM_MAX_ISA. Plain Python (no torch), so the config, the build and `charlm doctor` can all ask.

ISA levels, lowest first: avx2 (256-bit FMA), avx512 (512-bit F/BW/DQ/VL), avx512_bf16 (its bf16
dot product, vdpbf16ps), amx (AMX-BF16 tiles). CHARLM_MAX_ISA caps the level charlm's own kernels
are built for, so one modern CPU can measure what an older one would do (each level is a build of
its own). A CPU that is not x86 has no level (None): the kernels are then portable C++.
"""

from __future__ import annotations

import functools
import os
import platform

from charlm.errors import UserError

ISA_LEVELS: tuple[str, ...] = ("avx2", "avx512", "avx512_bf16", "amx")
ISA_ENV = "CHARLM_MAX_ISA"

# The /proc/cpuinfo flags each level needs on top of the one below it.
_LEVEL_FLAGS: dict[str, frozenset[str]] = {
    "avx2": frozenset({"avx2", "fma"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    "avx512_bf16": frozenset({"avx512_bf16"}),
    "amx": frozenset({"amx_bf16", "amx_tile"}),
}

# oneDNN's and MKL's own caps for the same levels (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS):
# what scripts/bench.py --isa-matrix sets so torch.nn and fused are held to the level charlm is.
ONEDNN_ISA = {"avx2": "AVX2", "avx512": "AVX512_CORE", "avx512_bf16": "AVX512_CORE_BF16", "amx": "AVX512_CORE_AMX"}
MKL_ISA = {"avx2": "AVX2", "avx512": "AVX512", "avx512_bf16": "AVX512", "amx": "AVX512"}


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if not line.strip():
                    if fields:
                        break
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    """The CPU's name as the OS gives it, with family/model where known: 'AMD EPYC (family 25, model 17)'."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info and "model" in info:
        return f"{name} (family {info['cpu family']}, model {info['model']})"
    return name


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def cpu_isa_level(flags: frozenset[str] | None = None) -> str | None:
    """The highest level whose flags this CPU (or `flags`) has, each level needing the ones below it."""
    if flags is None:
        if not is_x86():
            return None
        flags = cpu_flags()
    level = None
    for name in ISA_LEVELS:
        if not _LEVEL_FLAGS[name] <= flags:
            break
        level = name
    return level


def isa_cap() -> str | None:
    """CHARLM_MAX_ISA, checked (None when unset); a value it does not know is a one-line error."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ISA_LEVELS:
        raise UserError(
            f"{ISA_ENV}={value!r} is not a level charlm knows; use one of {', '.join(ISA_LEVELS)} (or unset it)"
        )
    return value


def capped(level: str | None, cap: str | None) -> str | None:
    """The lower of a CPU's level and a cap (None: no level at all)."""
    if level is None or cap is None:
        return level
    return ISA_LEVELS[min(ISA_LEVELS.index(level), ISA_LEVELS.index(cap))]


def isa_level() -> str | None:
    """The level charlm's kernels are built for here: the CPU's own, capped by CHARLM_MAX_ISA."""
    return capped(cpu_isa_level(), isa_cap())


def at_least(level: str | None, wanted: str) -> bool:
    return level is not None and ISA_LEVELS.index(level) >= ISA_LEVELS.index(wanted)


def bf16_units_allowed() -> bool:
    """False where CHARLM_MAX_ISA caps below avx512_bf16: charlm then treats the CPU as one without
    bf16 units (bf16 runs fp32, as on such a CPU). The hardware check itself is torch's (runtime.py)."""
    cap = isa_cap()
    return cap is None or at_least(cap, "avx512_bf16")


def physical_cores() -> int:
    """Cores, not hyper-threads: two threads of one core share its FMA units, so recurrent kernels
    seldom gain from the second. From /proc/cpuinfo's (physical id, core id) pairs, else os.cpu_count()."""
    pairs, physical, core = set(), "0", None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "physical id":
                    physical = value.strip()
                elif name == "core id":
                    core = value.strip()
                elif not line.strip() and core is not None:
                    pairs.add((physical, core))
                    core = None
        if core is not None:
            pairs.add((physical, core))
    except OSError:
        pass
    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return max(1, min(len(pairs) or logical, usable))
