"""Measuring and describing a trained model: `charlm eval` and `charlm info`."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Annotated, Any

import typer

from charlm.cli import library as lib
from charlm.cli.common import checked_precision, console, dynamic_settings, in_precision, load_model
from charlm.cli.options import BackendOption, CheckpointOption, DeviceOption, JsonOption, PrecisionOption, ThreadsOption
from charlm.errors import UserError

if TYPE_CHECKING:
    from charlm.inference.dynamic import DynamicSettings
    from charlm.inference.evaluate import EvalResult


def evaluate(
    checkpoint: CheckpointOption,
    text: Annotated[str, typer.Option("--text", help="Text to score: a file, folder or glob of UTF-8 text.")],
    as_json: JsonOption = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Parallel streams the text is cut into.", min=1)] = 64,
    device: DeviceOption = "auto",
    backend: BackendOption = None,
    precision: PrecisionOption = "fp32",
    threads: ThreadsOption = None,
    window: Annotated[
        int | None,
        typer.Option(
            "--window",
            min=1,
            help="Score as nanoGPT does: independent windows of this many characters, each from a "
            "blank state (no carried state).",
        ),
    ] = None,
    dynamic: Annotated[
        bool,
        typer.Option(
            "--dynamic",
            help="Also score with dynamic evaluation: the model takes a gradient step on each segment after "
            "scoring it.",
        ),
    ] = False,
    segment: Annotated[int, typer.Option("--segment", help="--dynamic: characters per update.")] = 50,
    dynamic_lr: Annotated[
        float | None, typer.Option("--dynamic-lr", help="--dynamic: learning rate (default 3e-4 for rms, 0.1 for sgd).")
    ] = None,
    rule: Annotated[str, typer.Option("--rule", help="--dynamic: update rule, rms or sgd.")] = "rms",
    decay: Annotated[
        float, typer.Option("--decay", help="--dynamic: pull toward the trained weights per update, in [0, 1).")
    ] = 0.0,
) -> None:
    """Measure loss, bits per character and perplexity on a text."""
    precision = checked_precision(device, precision)
    adapt = dynamic_settings(segment, dynamic_lr, rule, decay) if dynamic else None
    if adapt is not None and window is not None:
        raise UserError("--window and --dynamic do not go together: dynamic evaluation carries the state")
    lib.use_threads(threads)
    # dynamic evaluation takes a gradient step per segment: a training step's work
    workload = (
        lib.Workload.training(batch_size, segment)
        if adapt is not None
        else lib.Workload.evaluation(batch_size, window or 64)
    )
    _, model, vocab, cfg = load_model(checkpoint, device, backend, precision, workload)
    text_settings = lib.TextSettings.from_config(cfg.data)
    dynamic_result: EvalResult | None = None
    with in_precision(model, precision):
        if adapt is None:
            result = lib.evaluate_text(model, vocab, lib.read_text(text), batch_size, text_settings, window)
        else:
            result, dynamic_result = lib.evaluate_text_dynamic(
                model, vocab, lib.read_text(text), adapt, text_settings, batch_size
            )
    if as_json:
        facts = {
            **result.to_dict(),
            "checkpoint": str(lib.resolve_checkpoint(checkpoint)),
            "text": text,
            "scoring": f"windows of {window}, no carried state" if window else "state carried",
        }
        if adapt is not None and dynamic_result is not None:
            facts.update(
                loss_nats_static=result.loss_nats,
                bpc_static=result.bpc,
                loss_nats_dynamic=dynamic_result.loss_nats,
                bpc_dynamic=dynamic_result.bpc,
                dynamic={"segment": adapt.segment, "lr": adapt.lr, "rule": adapt.rule, "decay": adapt.decay},
            )
        print(json.dumps(facts))
        return
    _print_evaluation(result, dynamic_result, adapt)
    if window is not None:
        console().print(f"(scored in independent windows of {window} characters, each from a blank state)")


def _print_evaluation(result: EvalResult, dynamic_result: EvalResult | None, adapt: DynamicSettings | None) -> None:
    out = console()
    per = "byte" if result.unit == "bytes" else "char"
    if dynamic_result is not None and adapt is not None:
        out.print(f"static:  loss {result.loss_nats:.4f} nats/{per} | {result.bpc:.4f} bits/char")
        out.print(
            f"dynamic: loss {dynamic_result.loss_nats:.4f} nats/{per} | {dynamic_result.bpc:.4f} bits/char "
            f"({adapt.rule}, lr {adapt.lr:g}, segments of {adapt.segment}, decay {adapt.decay:g}; "
            f"{dynamic_result.loss_nats - result.loss_nats:+.4f} nats)"
        )
    elif result.unit == "bytes":
        out.print(
            f"loss {result.loss_nats:.4f} nats/byte | {result.bits_per_byte:.4f} bits/byte | "
            f"{result.bpc:.4f} bits/char | perplexity {result.perplexity:.3f} per byte | "
            f"{result.bytes:,} bytes ({result.chars:,} characters) scored"
        )
    else:
        out.print(
            f"loss {result.loss_nats:.4f} nats/char | {result.bpc:.4f} bits/char | "
            f"perplexity {result.perplexity:.3f} | {result.chars:,} characters scored"
        )
    if result.oov_chars:
        how = "scored as <unk>" if result.oov_rule != "skipped" else "skipped (neither fed to the model nor scored)"
        out.print(f"{result.oov_chars:,} characters not in the model's vocabulary were {how}")


def info(checkpoint: CheckpointOption, as_json: JsonOption = False) -> None:
    """Describe a checkpoint: model, size, vocabulary, progress, best validation loss."""
    payload, model, vocab, cfg = load_model(checkpoint)
    best = payload.get("best_val_loss")
    facts: dict[str, Any] = {
        "checkpoint": str(lib.resolve_checkpoint(checkpoint)),
        "model": lib.describe_model(cfg.model, payload.get("backend")),  # the backend it trained on
        "backend": payload.get("backend") or cfg.model.backend,  # older checkpoints: their config's (concrete)
        "parameters": lib.count_parameters(model),
        "vocab_size": len(vocab),
        "step": payload.get("step"),
        "epoch": payload.get("epoch"),
        "best_val_loss": best,
        "best_val_bpc": None if best is None else best / math.log(2),
        "best_step": payload.get("best_step"),
        "device": payload.get("device"),
        "elapsed_seconds": payload.get("elapsed"),
        "data": cfg.data.path,
    }
    if as_json:
        print(json.dumps(facts))
        return
    out = console()
    for key, value in facts.items():
        shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        out.print(f"{key.replace('_', ' '):>16}  {shown}")
