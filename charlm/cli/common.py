"""What the commands share: the consoles, checking --backend, --precision and the dynamic-evaluation
options, and loading a trained model."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

from rich.console import Console

from charlm.cli import library as lib
from charlm.config import BACKEND_CHOICES, Config, validate_config
from charlm.errors import UserError

if TYPE_CHECKING:
    from charlm.data.vocab import Vocab
    from charlm.inference.dynamic import DynamicSettings
    from charlm.models.autotune import Workload
    from charlm.models.model import CharLM

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def console() -> Console:
    """Where a command prints its results (stdout, no markup guessing, long lines kept whole)."""
    return Console(highlight=False, soft_wrap=True)


def check_backend(backend: str | None) -> str | None:
    if backend is not None and backend not in BACKEND_CHOICES:
        raise UserError(f"--backend must be one of {', '.join(BACKEND_CHOICES)} (got {backend!r})")
    return backend


class TrainedModel(NamedTuple):
    payload: dict[str, Any]  # the checkpoint's; of a .safetensors export, its training facts (step, best_val_loss, ...)
    model: CharLM
    vocab: Vocab
    config: Config


def load_model(
    checkpoint: Path,
    device: str = "cpu",
    backend: str | None = None,
    precision: str = "fp32",
    workload: Workload | None = None,
) -> TrainedModel:
    """A checkpoint (or a .safetensors export) and its model on `device`, run with `backend`: auto is measured
    for the device, `precision` and `workload`, and said in one line when measured just now."""
    backend = check_backend(backend)
    if Path(checkpoint).suffix == ".safetensors":  # `charlm export --format safetensors`
        loaded = lib.load_safetensors(Path(checkpoint), lib.resolve_device(device), backend, precision, workload, _say)
        return TrainedModel(loaded.training, loaded.model, loaded.vocab, loaded.config)
    payload = lib.load_checkpoint(checkpoint)
    model, vocab = lib.model_from_checkpoint(payload, lib.resolve_device(device), backend, precision, workload, _say)
    return TrainedModel(payload, model, vocab, validate_config(payload["config"], "checkpoint config"))


def _say(line: str) -> None:
    err_console.print(f"[dim]{line}[/]")


def checked_precision(device: str, precision: str) -> str:
    """The precision asked for, checked; fp32 with a notice where this device cannot do bf16 at speed."""
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16 (got {precision!r})")
    precision, notice = lib.usable_precision(lib.resolve_device(device), precision)
    if notice:
        err_console.print(f"note: {notice}")
    return precision


def in_precision(model: CharLM, precision: str) -> AbstractContextManager[Any]:
    """A context that runs the model in `precision` (bf16: under autocast)."""
    return lib.autocast(next(model.parameters()).device, precision)


def dynamic_settings(segment: int, lr: float | None, rule: str, decay: float) -> DynamicSettings:
    """The dynamic-evaluation options (sample --adapt-to, eval --dynamic) as checked settings (a mistake is one
    line)."""
    if lr is None:
        lr = 3e-4 if rule == "rms" else 0.1
    # any rule but these two is named by check()
    settings = lib.DynamicSettings(segment=segment, lr=lr, rule=cast(Literal["sgd", "rms"], rule), decay=decay)
    problem = settings.check()
    if problem:
        raise UserError(f"{problem}: see charlm eval --help")
    return settings
