"""Using a trained model: `charlm sample`, `charlm eval` and `charlm info`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from charlm.cli.common import BACKEND_HELP, CHECKPOINT_HELP, app, console, err_console, load_model
from charlm.config import sample_settings
from charlm.errors import UserError

PRECISION_HELP = ("fp32, or bf16: bf16 matmuls with the state kept in fp32, faster where the hardware has bf16 "
                  "units (a CPU without them runs fp32, saying so).")


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=CHECKPOINT_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to start from (default: sample.prompt)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a UTF-8 file."),
    length: Optional[int] = typer.Option(None, "--length", "-n", help="Characters to generate per sample."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy; <1 safer, >1 wilder."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Draw only from the k most likely characters."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Draw only from the nucleus of probability p, in (0, 1]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text."),
    num_samples: int = typer.Option(1, "--num-samples", help="Draw this many samples in one batch.", min=1, max=10_000),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    backend: Optional[str] = typer.Option(None, "--backend", help=BACKEND_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    stop_at_end: bool = typer.Option(False, "--stop-at-end", help="End each sample at its document's end marker "
                                     "(models trained with data.documents: lines)."),
) -> None:
    """Generate text from a trained model, streamed as it is drawn."""
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.data.vocab import EOS_TOKEN  # noqa: PLC0415
    from charlm.inference.sample import Decoding, generate, make_generator, prompt_ids  # noqa: PLC0415

    precision = _usable_precision(device, precision)
    _, model, vocab, cfg = load_model(checkpoint, device, backend, precision)
    settings = sample_settings(cfg.sample, length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed)
    if stop_at_end and not vocab.documents:
        raise UserError("--stop-at-end needs a model trained with data.documents: lines (it has no end marker)")
    text = _prompt_text(prompt, prompt_file, settings.prompt)
    context, unknown = prompt_ids(vocab, text, TextSettings.from_config(cfg.data))
    if unknown:
        err_console.print(f"warning: the prompt's characters {', '.join(map(repr, unknown[:10]))} never occurred in "
                          "training; they are read as <unk>")
    generator, used_seed = make_generator(next(model.parameters()).device, settings.seed)
    stop_id = vocab.special_id(EOS_TOKEN) if stop_at_end else None
    with _in_precision(model, precision):
        _print_samples(vocab, text, num_samples, stop_id, lambda on_step: generate(
            model, context, settings.length, num_samples, Decoding.of(settings), generator, on_step, stop_id))
    if settings.seed is None:
        err_console.print(f"[dim]seed {used_seed} (pass --seed {used_seed} to draw the same text again)[/]")


def _usable_precision(device: str, precision: str) -> str:
    """The precision asked for, checked; fp32 with a notice where this device cannot do bf16 at speed."""
    from charlm.training.runtime import resolve_device, usable_precision  # noqa: PLC0415

    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16 (got {precision!r})")
    precision, notice = usable_precision(resolve_device(device), precision)
    if notice:
        err_console.print(f"note: {notice}")
    return precision


def _in_precision(model, precision: str):
    """A context that runs the model in `precision` (bf16: under autocast)."""
    from charlm.training.runtime import autocast  # noqa: PLC0415

    return autocast(next(model.parameters()).device, precision)


def _prompt_text(prompt: Optional[str], prompt_file: Optional[Path], default: str) -> str:
    if prompt is not None and prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        from charlm.data.sources import read_text_file  # noqa: PLC0415

        text = read_text_file(prompt_file)
        if not text:
            raise UserError(f"prompt file {prompt_file} is empty; put the prompt text in it")
        return text
    return prompt if prompt else default


def _print_samples(vocab, prompt: str, num_samples: int, stop_id: Optional[int], run) -> None:
    """One sample streams as it is drawn; several are printed one after another when done."""
    stream = sys.stdout
    if num_samples == 1:
        decoder, done = vocab.stream_decoder(), [False]

        def on_step(ids) -> None:
            index = int(ids[0])
            if done[0] or index == stop_id:
                done[0] = True
                return
            stream.write(decoder.feed(index))
            stream.flush()

        stream.write(prompt)
        run(on_step)
        stream.write(decoder.flush() + "\n")
    else:
        for k, row in enumerate(run(None)):
            row = row.tolist()
            if stop_id is not None and stop_id in row:
                row = row[:row.index(stop_id)]
            stream.write(f"==> sample {k + 1} <==\n{prompt}{vocab.decode(row)}\n")
    stream.flush()


@app.command(name="eval")
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=CHECKPOINT_HELP),
    text: str = typer.Option(..., "--text", help="Text to score: a file, folder or glob of UTF-8 text."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    batch_size: int = typer.Option(64, "--batch-size", help="Parallel streams the text is cut into.", min=1),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    backend: Optional[str] = typer.Option(None, "--backend", help=BACKEND_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Measure loss, bits per character and perplexity on a text."""
    from charlm.data.sources import read_text  # noqa: PLC0415
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.inference.evaluate import evaluate_text  # noqa: PLC0415
    from charlm.training.checkpoint import resolve_checkpoint  # noqa: PLC0415

    precision = _usable_precision(device, precision)
    _, model, vocab, cfg = load_model(checkpoint, device, backend, precision)
    with _in_precision(model, precision):
        result = evaluate_text(model, vocab, read_text(text), batch_size, TextSettings.from_config(cfg.data))
    if as_json:
        print(json.dumps({**result.to_dict(), "checkpoint": str(resolve_checkpoint(checkpoint)), "text": text}))
        return
    out = console()
    if result.unit == "bytes":
        out.print(f"loss {result.loss_nats:.4f} nats/byte | {result.bits_per_byte:.4f} bits/byte | "
                      f"{result.bpc:.4f} bits/char | perplexity {result.perplexity:.3f} per byte | "
                      f"{result.bytes:,} bytes ({result.chars:,} characters) scored")
    else:
        out.print(f"loss {result.loss_nats:.4f} nats/char | {result.bpc:.4f} bits/char | "
                      f"perplexity {result.perplexity:.3f} | {result.chars:,} characters scored")
    if result.oov_chars:
        how = "scored as <unk>" if result.oov_rule != "skipped" else "skipped (neither fed to the model nor scored)"
        out.print(f"{result.oov_chars:,} characters not in the model's vocabulary were {how}")


@app.command()
def info(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=CHECKPOINT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Describe a checkpoint: model, size, vocabulary, progress, best validation loss."""
    from charlm.models.model import count_parameters  # noqa: PLC0415
    from charlm.training.checkpoint import describe_model, resolve_checkpoint  # noqa: PLC0415

    payload, model, vocab, cfg = load_model(checkpoint)
    best = payload.get("best_val_loss")
    facts = {
        "checkpoint": str(resolve_checkpoint(checkpoint)),
        "model": describe_model(cfg.model, payload.get("backend")),  # the backend it trained on
        "backend": payload.get("backend") or cfg.model.backend,  # older checkpoints: their config's (concrete)
        "parameters": count_parameters(model), "vocab_size": len(vocab),
        "step": payload.get("step"), "epoch": payload.get("epoch"),
        "best_val_loss": best, "best_val_bpc": None if best is None else best / math.log(2),
        "best_step": payload.get("best_step"), "device": payload.get("device"),
        "elapsed_seconds": payload.get("elapsed"), "data": cfg.data.path,
    }
    if as_json:
        print(json.dumps(facts))
        return
    out = console()
    for key, value in facts.items():
        shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        out.print(f"{key.replace('_', ' '):>16}  {shown}")

