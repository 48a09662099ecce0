"""What the commands share: the error console, the `--backend` check and loading a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from charlm.config import BACKEND_CHOICES, validate_config
from charlm.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, sample and evaluate character-level RNN/LSTM language models.")
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

CHECKPOINT_HELP = "A checkpoint file, a run dir (its best.pt, else last.pt), or a .safetensors export."
BACKEND_HELP = ("Run the weights with another backend: auto, native, fused or reference (default: the "
                "checkpoint's model.backend; auto: the one charlm picks for this device).")


def console() -> Console:
    """Where a command prints its results (stdout, no markup guessing, long lines kept whole)."""
    return Console(highlight=False, soft_wrap=True)


def check_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in BACKEND_CHOICES:
        raise UserError(f"--backend must be one of {', '.join(BACKEND_CHOICES)} (got {backend!r})")
    return backend


def load_model(checkpoint: Path, device: str = "cpu", backend: Optional[str] = None, precision: str = "fp32",
               workload=None):
    """A checkpoint's payload, its model on `device` (run with `backend`; auto measured for the device,
    `precision` and `workload`, a charlm.models.autotune.Workload, and said in one line when measured
    just now), its vocabulary and its config."""
    from charlm.store.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: PLC0415
    from charlm.training.runtime import resolve_device  # noqa: PLC0415

    backend = check_backend(backend)
    if Path(checkpoint).suffix == ".safetensors":  # `charlm export --format safetensors`: its training facts
        from charlm.export.safetensors_format import load_safetensors  # noqa: PLC0415 - stand in for the payload

        loaded = load_safetensors(Path(checkpoint), resolve_device(device), backend, precision, workload, _say)
        return loaded.training, loaded.model, loaded.vocab, loaded.config
    payload = load_checkpoint(checkpoint)
    model, vocab = model_from_checkpoint(payload, resolve_device(device), backend, precision, workload, _say)
    return payload, model, vocab, validate_config(payload["config"], "checkpoint config")


def _say(line: str) -> None:
    err_console.print(f"[dim]{line}[/]")


def use_threads(threads: Optional[int]) -> None:
    """--threads, or the machine's physical cores, for torch's CPU kernels and the native loops."""
    from charlm.training.runtime import use_threads as set_threads  # noqa: PLC0415 - imports torch

    set_threads(threads)
