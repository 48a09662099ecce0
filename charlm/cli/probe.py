"""`charlm probe gradients` and `charlm probe context`: what trained models do with time, as a
PNG and the numbers as JSON, several checkpoints side by side."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from charlm.atomic import write_text_atomic
from charlm.cli import library as lib
from charlm.cli.common import load_model
from charlm.cli.options import CheckpointsOption, DeviceOption
from charlm.config import Config
from charlm.errors import UserError

if TYPE_CHECKING:
    import torch

    from charlm.models.model import CharLM

T = TypeVar("T")
ProbeText = Annotated[str, typer.Option("--text", help="Text to probe on: a file, folder or glob of UTF-8 text.")]
ProbeOut = Annotated[
    Path, typer.Option("--out", "-o", help="Where the figure and the numbers go: OUT.png and OUT.json.")
]


def gradients(
    checkpoints: CheckpointsOption,
    text: ProbeText,
    out: ProbeOut = Path("probe_gradients"),
    max_k: Annotated[int, typer.Option("--max-k", help="Steps back to follow the gradient.", min=1, max=4096)] = 256,
    positions: Annotated[int, typer.Option("--positions", help="Places in the text to average over.", min=1)] = 32,
    device: DeviceOption = "cpu",
) -> None:
    """The norm of d loss_t / d h_{t-k} (and c for an LSTM) against k: the vanishing gradient."""
    entries = []
    for checkpoint, model, cfg, ids in _models_and_text(checkpoints, text, device):
        norms = _or_user_error(lib.gradient_norms, model, ids, max_k, positions)
        entries.append(
            {
                **_label(checkpoint, cfg),
                "k": norms.ks,
                "hidden_grad_norm": norms.hidden,
                "cell_grad_norm": norms.cell,
                "positions": norms.positions,
            }
        )
    _write(out, {"probe": "gradients", "text": text, "models": entries}, lib.plot_gradient_probe)


def context(
    checkpoints: CheckpointsOption,
    text: ProbeText,
    out: ProbeOut = Path("probe_context"),
    max_k: Annotated[
        int, typer.Option("--max-k", help="The longest context: k = 1, 2, 4, ... up to this.", min=1, max=65536)
    ] = 1024,
    positions: Annotated[int, typer.Option("--positions", help="Predictions to average over.", min=1)] = 512,
    device: DeviceOption = "cpu",
) -> None:
    """The loss when the model may read only the last k characters, k = 1, 2, 4, ...: the context it uses."""
    entries = []
    for checkpoint, model, cfg, ids in _models_and_text(checkpoints, text, device):
        losses = _or_user_error(lib.context_losses, model, ids, lib.doubling(max_k), positions)
        entries.append(
            {
                **_label(checkpoint, cfg),
                "k": losses.ks,
                "loss_nats": losses.losses,
                "carried_loss_nats": losses.carried,
                "positions": losses.positions,
            }
        )
    _write(out, {"probe": "context", "text": text, "models": entries}, lib.plot_context_probe)


def _models_and_text(
    checkpoints: list[Path], text: str, device: str
) -> Iterator[tuple[Path, CharLM, Config, torch.Tensor]]:
    """Each checkpoint's model and the text encoded with its own vocabulary and text settings."""
    raw = lib.read_text(text)
    for checkpoint in checkpoints:
        _, model, vocab, cfg = load_model(checkpoint, device)
        _, encoded = lib.encode_for_scoring(vocab, raw, lib.TextSettings.from_config(cfg.data))
        yield checkpoint, model, cfg, encoded.ids


def _label(checkpoint: Path, cfg: Config) -> dict[str, str]:
    m = cfg.model
    name = checkpoint.parent.name if checkpoint.suffix == ".pt" else checkpoint.name
    return {"checkpoint": str(checkpoint), "label": f"{name} ({m.type} {m.num_layers}x{m.hidden_size})"}


def _or_user_error(compute: Callable[..., T], *args: Any) -> T:
    try:
        return compute(*args)
    except ValueError as err:
        raise UserError(f"{err}; give a longer --text or a smaller --max-k") from None


def _write(out: Path, facts: dict[str, Any], plot: Callable[[list[dict[str, Any]], Path], None]) -> None:
    stem = out.with_suffix("") if out.suffix in (".png", ".json") else out
    png, numbers = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".json")
    plot(facts["models"], png)  # says so in one line if `out` cannot be written
    write_text_atomic(numbers, json.dumps(facts, indent=1) + "\n")
    print(png)
    print(numbers)
