"""`charlm probe gradients` and `charlm probe context`: what trained models do with time, as a
PNG and the numbers as JSON, several checkpoints side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from charlm.cli.common import CHECKPOINT_HELP, app, load_model
from charlm.errors import UserError

probe_app = typer.Typer(no_args_is_help=True, help="Measure what trained models do with time (PNG + JSON).")
app.add_typer(probe_app, name="probe")

CHECKPOINTS_HELP = CHECKPOINT_HELP + " Repeat to compare models."
OUT_HELP = "Where the figure and the numbers go: OUT.png and OUT.json."


@probe_app.command("gradients")
def gradients(
    checkpoints: List[Path] = typer.Option(..., "--checkpoint", help=CHECKPOINTS_HELP),
    text: str = typer.Option(..., "--text", help="Text to probe on: a file, folder or glob of UTF-8 text."),
    out: Path = typer.Option(Path("probe_gradients"), "--out", "-o", help=OUT_HELP),
    max_k: int = typer.Option(256, "--max-k", help="Steps back to follow the gradient.", min=1, max=4096),
    positions: int = typer.Option(32, "--positions", help="Places in the text to average over.", min=1),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """The norm of d loss_t / d h_{t-k} (and c for an LSTM) against k: the vanishing gradient."""
    from charlm.inference.probe import gradient_norms  # noqa: PLC0415
    from charlm.report.plots import plot_gradient_probe  # noqa: PLC0415

    entries = []
    for checkpoint, model, cfg, ids in _models_and_text(checkpoints, text, device):
        norms = _or_user_error(lambda: gradient_norms(model, ids, max_k, positions))
        entries.append({**_label(checkpoint, cfg), "k": norms.ks, "hidden_grad_norm": norms.hidden,
                        "cell_grad_norm": norms.cell, "positions": norms.positions})
    _write(out, {"probe": "gradients", "text": text, "models": entries}, plot_gradient_probe)


@probe_app.command("context")
def context(
    checkpoints: List[Path] = typer.Option(..., "--checkpoint", help=CHECKPOINTS_HELP),
    text: str = typer.Option(..., "--text", help="Text to probe on: a file, folder or glob of UTF-8 text."),
    out: Path = typer.Option(Path("probe_context"), "--out", "-o", help=OUT_HELP),
    max_k: int = typer.Option(1024, "--max-k", help="The longest context: k = 1, 2, 4, ... up to this.",
                              min=1, max=65536),
    positions: int = typer.Option(512, "--positions", help="Predictions to average over.", min=1),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """The loss when the model may read only the last k characters, k = 1, 2, 4, ...: the context it uses."""
    from charlm.inference.probe import context_losses, doubling  # noqa: PLC0415
    from charlm.report.plots import plot_context_probe  # noqa: PLC0415

    entries = []
    for checkpoint, model, cfg, ids in _models_and_text(checkpoints, text, device):
        losses = _or_user_error(lambda: context_losses(model, ids, doubling(max_k), positions))
        entries.append({**_label(checkpoint, cfg), "k": losses.ks, "loss_nats": losses.losses,
                        "carried_loss_nats": losses.carried, "positions": losses.positions})
    _write(out, {"probe": "context", "text": text, "models": entries}, plot_context_probe)


def _models_and_text(checkpoints: List[Path], text: str, device: str):
    """Each checkpoint's model and the text encoded with its own vocabulary and text settings."""
    from charlm.data.sources import read_text  # noqa: PLC0415
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.inference.evaluate import encode_for_scoring  # noqa: PLC0415

    raw = read_text(text)
    for checkpoint in checkpoints:
        _, model, vocab, cfg = load_model(checkpoint, device)
        _, encoded = encode_for_scoring(vocab, raw, TextSettings.from_config(cfg.data))
        yield checkpoint, model, cfg, encoded.ids


def _label(checkpoint: Path, cfg) -> dict:
    m = cfg.model
    name = checkpoint.parent.name if checkpoint.suffix == ".pt" else checkpoint.name
    return {"checkpoint": str(checkpoint), "label": f"{name} ({m.type} {m.num_layers}x{m.hidden_size})"}


def _or_user_error(compute):
    try:
        return compute()
    except ValueError as err:
        raise UserError(f"{err}; give a longer --text or a smaller --max-k") from None


def _write(out: Path, facts: dict, plot) -> None:
    from charlm.atomic import write_text_atomic  # noqa: PLC0415

    stem = out.with_suffix("") if out.suffix in (".png", ".json") else out
    png, numbers = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".json")
    plot(facts["models"], png)  # says so in one line if `out` cannot be written
    write_text_atomic(numbers, json.dumps(facts, indent=1) + "\n")
    print(png)
    print(numbers)
