"""`charlm doctor`: what this machine offers charlm, and what `auto` picks here, as one dict of facts."""

from __future__ import annotations

import os
import platform

import torch

from charlm import hardware
from charlm.config import ModelConfig
from charlm.models import autotune, native, registry
from charlm.training.runtime import cpu_has_bf16_units, usable_precision

PRECISIONS = ("fp32", "bf16")


def machine_facts() -> dict:
    """The CPU, its ISA levels, cores, torch and its libraries, the native build, bf16 / CUDA / MPS."""
    level, cap = hardware.cpu_isa_level(), hardware.isa_cap()
    ops = native.cpp_loops()
    cflags, ldflags = native.build_flags()
    mps = getattr(torch.backends, "mps", None)
    return {
        "cpu": hardware.cpu_model(),
        "machine": f"{platform.system()} {platform.machine()}",
        "isa_levels": [name for name in hardware.ISA_LEVELS if hardware.at_least(level, name)],
        "isa_cap": cap,
        "kernels_isa": hardware.isa_level(),
        "onednn_cap": os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
        "physical_cores": hardware.physical_cores(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onednn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "cpp_loops": ops is not None,
        "cpp_loops_path": str(native.library_path()) if ops is not None else None,
        "cpp_flags": " ".join(cflags + ldflags),
        "bf16_step_gemm": ops.bf16_step_gemm() if ops is not None else None,
        "cpp_disabled": os.environ.get("CHARLM_NO_CPP", "") not in ("", "0"),
        "bf16_units": cpu_has_bf16_units(),
        "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "mps": bool(mps is not None and mps.is_available()),
    }


def auto_choices(
    model_cfg: ModelConfig | None = None, vocab_size: int = 65, batch: int = 32, steps: int = 128
) -> list[dict]:
    """For each cell type and precision, the backend auto runs a training step of this shape with on
    the CPU, with its figures (measured now, or from the cache)."""
    base = model_cfg or ModelConfig()
    rows = []
    cpu = torch.device("cpu")
    for cell in registry.CELL_TYPES:
        cfg = base.model_copy(update={"type": cell, "weight_dropout": 0.0, "backend": registry.AUTO})
        for asked in PRECISIONS:
            precision, _ = usable_precision(cpu, asked)
            choice = autotune.choose(
                registry.AUTO, cfg, vocab_size, cpu, precision, autotune.Workload.training(batch, steps)
            )
            fastest = min(choice.seconds.values()) if choice.seconds else None
            rows.append(
                {
                    "cell": cell,
                    "precision": asked,
                    "ran_as": precision,
                    "backend": choice.backend,
                    "how": choice.how,
                    "measured_now": choice.measured,
                    "chars_per_s": {b: batch * steps / s for b, s in choice.seconds.items()},
                    "vs_others": {b: s / fastest for b, s in choice.seconds.items() if b != choice.backend}
                    if fastest
                    else {},
                }
            )
    return rows
