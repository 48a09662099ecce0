"""The options several commands share, declared once: name, short flag, help and checks. Each
command gives its own default (`device: DeviceOption = "auto"`); an option that differs in any of
these from one command to the next is declared by its command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

CHECKPOINT_HELP = "A checkpoint file, a run dir (its best.pt, else last.pt), or a .safetensors export."
BACKEND_HELP = (
    "Run the weights with another backend: auto, native, fused or reference (default: the "
    "checkpoint's model.backend; auto: the one charlm picks for this device)."
)
PRECISION_HELP = (
    "fp32, or bf16: bf16 matmuls with the state kept in fp32, faster where the hardware has bf16 "
    "units (a CPU without them runs fp32, saying so)."
)
THREADS_HELP = "CPU threads for the model's kernels (default: the machine's physical cores)."

CheckpointOption = Annotated[Path, typer.Option("--checkpoint", help=CHECKPOINT_HELP)]
CheckpointsOption = Annotated[
    list[Path], typer.Option("--checkpoint", help=CHECKPOINT_HELP + " Repeat to compare models.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
BackendOption = Annotated[str | None, typer.Option("--backend", help=BACKEND_HELP)]
PrecisionOption = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]
ThreadsOption = Annotated[int | None, typer.Option("--threads", min=1, help=THREADS_HELP)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
