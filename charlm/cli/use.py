"""Using a trained model: `charlm sample`, `charlm eval` and `charlm info`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from charlm.cli.common import BACKEND_HELP, CHECKPOINT_HELP, app, console, err_console, load_model, use_threads
from charlm.config import sample_settings
from charlm.errors import UserError

THREADS_HELP = "CPU threads for the model's kernels (default: the machine's physical cores)."
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
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    stop_at_end: bool = typer.Option(False, "--stop-at-end", help="End each sample at its document's end marker "
                                     "(models trained with data.documents: lines)."),
    adapt_to: Optional[str] = typer.Option(None, "--adapt-to", help="First read this text (file, folder or glob) "
                                           "with dynamic evaluation's updates, so the sample continues in its style."),
    segment: int = typer.Option(50, "--segment", help="--adapt-to: characters per update."),
    dynamic_lr: Optional[float] = typer.Option(None, "--dynamic-lr", help="--adapt-to: learning rate "
                                               "(default 3e-4 for rms, 0.1 for sgd)."),
    rule: str = typer.Option("rms", "--rule", help="--adapt-to: update rule, rms or sgd."),
) -> None:
    """Generate text from a trained model, streamed as it is drawn."""
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.data.vocab import EOS_TOKEN  # noqa: PLC0415
    from charlm.inference.sample import Decoding, Undrawable, generate, make_generator, prompt_ids  # noqa: PLC0415
    from charlm.models.autotune import Workload  # noqa: PLC0415

    precision = _usable_precision(device, precision)
    use_threads(threads)
    _, model, vocab, cfg = load_model(checkpoint, device, backend, precision, Workload.generation(num_samples))
    settings = sample_settings(cfg.sample, length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed)
    decoding = _drawable_decoding(Decoding.of(settings))
    if stop_at_end and not vocab.documents:
        raise UserError("--stop-at-end needs a model trained with data.documents: lines (it has no end marker)")
    text = _prompt_text(prompt, prompt_file, settings.prompt)
    context, unknown = prompt_ids(vocab, text, TextSettings.from_config(cfg.data))
    if unknown:
        err_console.print(f"warning: the prompt's characters {', '.join(map(repr, unknown[:10]))} never occurred in "
                          "training; they are read as <unk>")
    generator, used_seed = make_generator(next(model.parameters()).device, settings.seed)
    stop_id = vocab.special_id(EOS_TOKEN) if stop_at_end else None
    try:
        with _in_precision(model, precision):
            if adapt_to is not None:
                _adapt(model, vocab, adapt_to, _dynamic_settings(segment, dynamic_lr, rule, 0.0), cfg)
            _print_samples(vocab, text, num_samples, stop_id, lambda on_step: generate(
                model, context, settings.length, num_samples, decoding, generator, on_step, stop_id))
    except Undrawable as err:
        if num_samples == 1:
            sys.stdout.write("\n")  # end the line the sample was streaming on
        raise UserError(f"{err}, so no character can be drawn from them: the checkpoint's weights are likely NaN "
                        "(a training that diverged) or overflow in this precision; sample from an earlier "
                        "checkpoint, or with --precision fp32") from None
    if settings.seed is None:
        err_console.print(f"[dim]seed {used_seed} (pass --seed {used_seed} to draw the same text again)[/]")


def _drawable_decoding(decoding):
    """The decoding settings, or a UserError naming the option nothing can be drawn with (the sample
    section of the checkpoint's config takes any float >= 0, inf included)."""
    problem = decoding.problem()
    if problem is not None:
        raise UserError(f"--{problem.field.replace('_', '-')} {problem.reason}")
    return decoding


def _adapt(model, vocab, source: str, settings, cfg) -> None:
    """Update `model` in place by reading `source` with dynamic evaluation; say what it scored."""
    from charlm.data.sources import read_text  # noqa: PLC0415
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.inference.dynamic import read_dynamically  # noqa: PLC0415
    from charlm.inference.evaluate import encode_for_scoring  # noqa: PLC0415

    _, encoded = encode_for_scoring(vocab, read_text(source), TextSettings.from_config(cfg.data))
    totals = read_dynamically(model, encoded.ids, settings)
    err_console.print(f"[dim]adapted to {source}: {totals.count:,} characters read, "
                      f"{totals.total_nats / totals.count:.4f} nats/char while reading[/]")


def _dynamic_settings(segment: int, lr: Optional[float], rule: str, decay: float):
    """The dynamic-evaluation options as checked settings (a mistake is one line)."""
    from charlm.inference.dynamic import DynamicSettings  # noqa: PLC0415

    if lr is None:
        lr = 3e-4 if rule == "rms" else 0.1
    settings = DynamicSettings(segment=segment, lr=lr, rule=rule, decay=decay)
    problem = settings.check()
    if problem:
        raise UserError(f"{problem}: see charlm eval --help")
    return settings


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
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    window: Optional[int] = typer.Option(None, "--window", min=1, help="Score as nanoGPT does: independent windows "
                                         "of this many characters, each from a blank state (no carried state)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Also score with dynamic evaluation: the model "
                                 "takes a gradient step on each segment after scoring it."),
    segment: int = typer.Option(50, "--segment", help="--dynamic: characters per update."),
    dynamic_lr: Optional[float] = typer.Option(None, "--dynamic-lr", help="--dynamic: learning rate "
                                               "(default 3e-4 for rms, 0.1 for sgd)."),
    rule: str = typer.Option("rms", "--rule", help="--dynamic: update rule, rms or sgd."),
    decay: float = typer.Option(0.0, "--decay", help="--dynamic: pull toward the trained weights per update, in [0, 1)."),
) -> None:
    """Measure loss, bits per character and perplexity on a text."""
    from charlm.data.sources import read_text  # noqa: PLC0415
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.inference.evaluate import evaluate_text  # noqa: PLC0415
    from charlm.models.autotune import Workload  # noqa: PLC0415
    from charlm.store.checkpoint import resolve_checkpoint  # noqa: PLC0415

    precision = _usable_precision(device, precision)
    adapt = _dynamic_settings(segment, dynamic_lr, rule, decay) if dynamic else None
    if adapt is not None and window is not None:
        raise UserError("--window and --dynamic do not go together: dynamic evaluation carries the state")
    use_threads(threads)
    # dynamic evaluation takes a gradient step per segment: a training step's work
    workload = (Workload.training(batch_size, segment) if adapt is not None
                else Workload.evaluation(batch_size, window or 64))
    _, model, vocab, cfg = load_model(checkpoint, device, backend, precision, workload)
    text_settings = TextSettings.from_config(cfg.data)
    with _in_precision(model, precision):
        if adapt is None:
            result = evaluate_text(model, vocab, read_text(text), batch_size, text_settings, window)
            dynamic_result = None
        else:
            from charlm.inference.dynamic import evaluate_text_dynamic  # noqa: PLC0415

            result, dynamic_result = evaluate_text_dynamic(model, vocab, read_text(text), adapt, text_settings,
                                                           batch_size)
    if as_json:
        facts = {**result.to_dict(), "checkpoint": str(resolve_checkpoint(checkpoint)), "text": text,
                 "scoring": f"windows of {window}, no carried state" if window else "state carried"}
        if dynamic_result is not None:
            facts.update(loss_nats_static=result.loss_nats, bpc_static=result.bpc,
                         loss_nats_dynamic=dynamic_result.loss_nats, bpc_dynamic=dynamic_result.bpc,
                         dynamic={"segment": adapt.segment, "lr": adapt.lr, "rule": adapt.rule, "decay": adapt.decay})
        print(json.dumps(facts))
        return
    _print_evaluation(result, dynamic_result, adapt)
    if window is not None:
        console().print(f"(scored in independent windows of {window} characters, each from a blank state)")


def _print_evaluation(result, dynamic_result, adapt) -> None:
    out = console()
    per = "byte" if result.unit == "bytes" else "char"
    if dynamic_result is not None:
        out.print(f"static:  loss {result.loss_nats:.4f} nats/{per} | {result.bpc:.4f} bits/char")
        out.print(f"dynamic: loss {dynamic_result.loss_nats:.4f} nats/{per} | {dynamic_result.bpc:.4f} bits/char "
                  f"({adapt.rule}, lr {adapt.lr:g}, segments of {adapt.segment}, decay {adapt.decay:g}; "
                  f"{dynamic_result.loss_nats - result.loss_nats:+.4f} nats)")
    elif result.unit == "bytes":
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
    from charlm.store.checkpoint import describe_model, resolve_checkpoint  # noqa: PLC0415

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

