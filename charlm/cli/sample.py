"""`charlm sample`: text drawn from a trained model, streamed as it is drawn."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from charlm.cli import library as lib
from charlm.cli.common import checked_precision, dynamic_settings, err_console, in_precision, load_model
from charlm.cli.options import BackendOption, CheckpointOption, DeviceOption, PrecisionOption, ThreadsOption
from charlm.config import Config, sample_settings
from charlm.errors import UserError

if TYPE_CHECKING:
    import torch

    from charlm.data.vocab import Vocab
    from charlm.inference.dynamic import DynamicSettings
    from charlm.inference.sample import Decoding
    from charlm.models.model import CharLM


def sample(
    checkpoint: CheckpointOption,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Text to start from (default: sample.prompt).")
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", help="Read the prompt from a UTF-8 file.")
    ] = None,
    length: Annotated[int | None, typer.Option("--length", "-n", help="Characters to generate per sample.")] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", help="0 = greedy; <1 safer, >1 wilder.")
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Draw only from the k most likely characters.")] = None,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Draw only from the nucleus of probability p, in (0, 1].")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed: the same seed gives the same text.")] = None,
    num_samples: Annotated[
        int, typer.Option("--num-samples", help="Draw this many samples in one batch.", min=1, max=10_000)
    ] = 1,
    device: DeviceOption = "auto",
    backend: BackendOption = None,
    precision: PrecisionOption = "fp32",
    threads: ThreadsOption = None,
    stop_at_end: Annotated[
        bool,
        typer.Option(
            "--stop-at-end",
            help="End each sample at its document's end marker (models trained with data.documents: lines).",
        ),
    ] = False,
    adapt_to: Annotated[
        str | None,
        typer.Option(
            "--adapt-to",
            help="First read this text (file, folder or glob) with dynamic evaluation's updates, so the "
            "sample continues in its style.",
        ),
    ] = None,
    segment: Annotated[int, typer.Option("--segment", help="--adapt-to: characters per update.")] = 50,
    dynamic_lr: Annotated[
        float | None,
        typer.Option("--dynamic-lr", help="--adapt-to: learning rate (default 3e-4 for rms, 0.1 for sgd)."),
    ] = None,
    rule: Annotated[str, typer.Option("--rule", help="--adapt-to: update rule, rms or sgd.")] = "rms",
) -> None:
    """Generate text from a trained model, streamed as it is drawn."""
    precision = checked_precision(device, precision)
    lib.use_threads(threads)
    _, model, vocab, cfg = load_model(checkpoint, device, backend, precision, lib.Workload.generation(num_samples))
    settings = sample_settings(cfg.sample, length=length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    decoding = _drawable_decoding(lib.Decoding.of(settings))
    if stop_at_end and not vocab.documents:
        raise UserError("--stop-at-end needs a model trained with data.documents: lines (it has no end marker)")
    text = _prompt_text(prompt, prompt_file, settings.prompt)
    context, unknown = lib.prompt_ids(vocab, text, lib.TextSettings.from_config(cfg.data))
    if unknown:
        err_console.print(
            f"warning: the prompt's characters {', '.join(map(repr, unknown[:10]))} never occurred in "
            "training; they are read as <unk>"
        )
    generator, used_seed = lib.make_generator(next(model.parameters()).device, settings.seed)
    stop_id = vocab.special_id(lib.EOS_TOKEN) if stop_at_end else None
    try:
        with in_precision(model, precision):
            if adapt_to is not None:
                _adapt(model, vocab, adapt_to, dynamic_settings(segment, dynamic_lr, rule, 0.0), cfg)
            _print_samples(
                vocab,
                text,
                num_samples,
                stop_id,
                lambda on_step: lib.generate(
                    model, context, settings.length, num_samples, decoding, generator, on_step, stop_id
                ),
            )
    except lib.Undrawable as err:
        if num_samples == 1:
            sys.stdout.write("\n")  # end the line the sample was streaming on
        raise UserError(
            f"{err}, so no character can be drawn from them: the checkpoint's weights are likely NaN "
            "(a training that diverged) or overflow in this precision; sample from an earlier "
            "checkpoint, or with --precision fp32"
        ) from None
    if settings.seed is None:
        err_console.print(f"[dim]seed {used_seed} (pass --seed {used_seed} to draw the same text again)[/]")


def _drawable_decoding(decoding: Decoding) -> Decoding:
    """The decoding settings, or a UserError naming the option nothing can be drawn with (the sample
    section of the checkpoint's config takes any float >= 0, inf included)."""
    problem = decoding.problem()
    if problem is not None:
        raise UserError(f"--{problem.field.replace('_', '-')} {problem.reason}")
    return decoding


def _adapt(model: CharLM, vocab: Vocab, source: str, settings: DynamicSettings, cfg: Config) -> None:
    """Update `model` in place by reading `source` with dynamic evaluation; say what it scored."""
    _, encoded = lib.encode_for_scoring(vocab, lib.read_text(source), lib.TextSettings.from_config(cfg.data))
    totals = lib.read_dynamically(model, encoded.ids, settings)
    err_console.print(
        f"[dim]adapted to {source}: {totals.count:,} characters read, "
        f"{totals.total_nats / totals.count:.4f} nats/char while reading[/]"
    )


def _prompt_text(prompt: str | None, prompt_file: Path | None, default: str) -> str:
    if prompt is not None and prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        text = lib.read_text_file(prompt_file)
        if not text:
            raise UserError(f"prompt file {prompt_file} is empty; put the prompt text in it")
        return text
    return prompt if prompt else default


def _print_samples(
    vocab: Vocab,
    prompt: str,
    num_samples: int,
    stop_id: int | None,
    run: Callable[[Callable[[torch.Tensor], None] | None], torch.Tensor],
) -> None:
    """One sample streams as it is drawn; several are printed one after another when done."""
    stream = sys.stdout
    if num_samples == 1:
        decoder, done = vocab.stream_decoder(), [False]

        def on_step(ids: torch.Tensor) -> None:
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
                row = row[: row.index(stop_id)]
            stream.write(f"==> sample {k + 1} <==\n{prompt}{vocab.decode(row)}\n")
    stream.flush()
