"""`charlm doctor`: one screen on what this machine offers charlm and what `model.backend: auto` picks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from charlm.cli import library as lib
from charlm.cli.common import console
from charlm.cli.options import JsonOption
from charlm.config import Config, load_config


def doctor(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Measure auto's choices on this config's model and batch shape (default: 2x256, E 64, B 32, T 128).",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="CPU threads (default: physical cores).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The CPU, its ISA levels and cores, torch, the C++ loops, bf16 / CUDA / MPS, and auto's
    measured backend for each cell type in fp32 and bf16 (timed once, then cached)."""
    lib.use_threads(threads)
    cfg = load_config(config) if config is not None else None
    facts = lib.machine_facts()
    choices = _auto_choices(cfg)
    if as_json:
        print(json.dumps({**facts, "auto": choices}))
        return
    _print(facts, choices)


def _auto_choices(cfg: Config | None) -> list[dict[str, Any]]:
    """What auto picks for each cell type and precision, timed on `cfg`'s model and batch shape, if given."""
    if cfg is None:
        return lib.auto_choices()
    step = lib.Workload.of_training(cfg.train)
    return lib.auto_choices(model_cfg=cfg.model, batch=step.batch, steps=step.steps)


_BF16_GEMM = {
    "amx-tiles": "AMX tiles (oneDNN's micro-kernel)",
    "brgemm": "oneDNN's micro-kernel, unpacked (forced)",
    "vdpbf16ps": "AVX512-BF16 dot products (vdpbf16ps)",
    "aten": "ATen's bf16 GEMM",
}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print(facts: dict[str, Any], choices: list[dict[str, Any]]) -> None:
    out = console()
    levels = ", ".join(facts["isa_levels"]) or "none charlm uses (portable C++ kernels)"
    cap = f"; CHARLM_MAX_ISA={facts['isa_cap']}" if facts["isa_cap"] else ""
    onednn = f"; ONEDNN_MAX_CPU_ISA={facts['onednn_cap']}" if facts["onednn_cap"] else ""
    loops = (
        f"built, {facts['cpp_loops_path']}"
        if facts["cpp_loops"]
        else "disabled (CHARLM_NO_CPP)"
        if facts["cpp_disabled"]
        else "not built: the PyTorch step loops run (slower)"
    )
    rows = [
        ("CPU", f"{facts['cpu']}, {facts['machine']}"),
        ("ISA levels", f"{levels} (charlm's kernels: {facts['kernels_isa'] or 'portable'}{cap}{onednn})"),
        (
            "cores",
            f"{facts['physical_cores']} physical, {facts['logical_cpus']} logical; {facts['threads']} "
            f"thread{'s' if facts['threads'] != 1 else ''}",
        ),
        ("torch", f"{facts['torch']} (oneDNN {_yes(facts['onednn'])}, MKL {_yes(facts['mkl'])})"),
        ("C++ loops", loops),
        ("build flags", facts["cpp_flags"]),
        (
            "bf16",
            ("bf16 units: yes" if facts["bf16_units"] else "no bf16 units: bf16 configs run fp32")
            + (
                f"; step GEMM: {_BF16_GEMM.get(facts['bf16_step_gemm'], facts['bf16_step_gemm'])}"
                if facts["bf16_step_gemm"]
                else ""
            ),
        ),
        ("CUDA", ", ".join(facts["cuda_devices"]) if facts["cuda"] else "not available"),
        ("MPS", "available" if facts["mps"] else "not available"),
    ]
    for name, value in rows:
        out.print(f"{name:>12}  {value}")
    out.print("\nmodel.backend: auto on the CPU (training step; measured once per shape, then cached):")
    for row in choices:
        ran = f" (runs {row['ran_as']})" if row["ran_as"] != row["precision"] else ""
        out.print(f"  {row['cell']:6} {row['precision']}{ran:13} -> {row['backend']:7} {row['how']}")
