"""The `charlm` command: parse options, call the library, print. No tensor math here.

Every UserError (and every option click rejects) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from charlm.config import BACKENDS, load_config, sample_settings, validate_config, with_absolute_paths
from charlm.data.download import KNOWN_CORPORA, download
from charlm.errors import Interrupted, UserError
from charlm.training.rundir import CONFIG
from charlm.training.signals import InterruptSignals

# Everything that imports torch is imported inside the command that needs it, so that
# `charlm --help` and a mistyped option answer at once.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, sample and evaluate character-level RNN/LSTM language models.")
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

CHECKPOINT_HELP = "A checkpoint file, or a run dir (its best.pt, else last.pt)."
BACKEND_HELP = "Run the weights with another backend: native, fused or reference (default: as trained)."


def _check_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    return backend


def _load_model(checkpoint: Path, device: str = "cpu", backend: Optional[str] = None):
    """A checkpoint's payload, its model on `device` (run with `backend`), its vocabulary and its config."""
    from charlm.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: PLC0415
    from charlm.training.runtime import resolve_device  # noqa: PLC0415

    backend = _check_backend(backend)
    payload = load_checkpoint(checkpoint)
    model, vocab = model_from_checkpoint(payload, resolve_device(device), backend)
    return payload, model, vocab, validate_config(payload["config"], "checkpoint config")


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run dir (default: runs/<config file stem>)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a config key: --set train.lr=1e-3 (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (overrides train.device)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run dir from its last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in the run dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain lines at each evaluation only: no bar, no samples."),
) -> None:
    """Train a model from a YAML config."""
    from charlm.report.progress import TrainingDisplay  # noqa: PLC0415
    from charlm.training.run import train as run_training  # noqa: PLC0415

    if config is None:
        if not (resume and out is not None):
            raise UserError("give --config FILE (or --resume --out RUN_DIR to continue a run with its own config)")
        config = out / CONFIG
    sets = list(overrides) + ([f"train.device={device}"] if device else [])
    cfg = with_absolute_paths(load_config(config, sets))
    run_dir = out if out is not None else Path("runs") / config.stem
    outcome = run_training(cfg, run_dir, resume=resume, overwrite=overwrite,
                           display=TrainingDisplay(quiet=quiet))
    if outcome.main:
        _report_training(outcome, run_dir)
    if outcome.signal is not None:
        raise typer.Exit(128 + outcome.signal)


def _report_training(outcome, run_dir: Path) -> None:
    console = Console(highlight=False, soft_wrap=True)
    if outcome.stop_reason == "interrupted":
        name = signal.Signals(outcome.signal).name
        console.print(f"{name}: stopped at step {outcome.step}; saved {run_dir / 'last.pt'}. "
                      f"Resume with: charlm train --resume --out {run_dir}")
        return
    minutes = outcome.elapsed / 60
    if outcome.stop_reason == "early_stop":
        console.print(f"stopped early at step {outcome.step}: the val loss has not improved for "
                      f"train.patience evaluations ({minutes:.1f} min)")
    else:
        console.print(f"done: {outcome.step} steps, {outcome.epoch} full epochs, {minutes:.1f} min")
    if outcome.best_val_loss is not None:
        bpc = outcome.best_val_loss / math.log(2)
        console.print(f"best val loss {outcome.best_val_loss:.4f} nats ({bpc:.4f} bpc) at step {outcome.best_step}: "
                      f"{run_dir / 'best.pt'} is the model to use")
    console.print(f"sample with: charlm sample --checkpoint {run_dir} --prompt \"...\"")


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
    stop_at_end: bool = typer.Option(False, "--stop-at-end", help="End each sample at its document's end marker "
                                     "(models trained with data.documents: lines)."),
) -> None:
    """Generate text from a trained model, streamed as it is drawn."""
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.data.vocab import EOS_TOKEN  # noqa: PLC0415
    from charlm.inference.sample import Decoding, generate, make_generator, prompt_ids  # noqa: PLC0415

    _, model, vocab, cfg = _load_model(checkpoint, device, backend)
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
    _print_samples(vocab, text, num_samples, stop_id, lambda on_step: generate(
        model, context, settings.length, num_samples, Decoding.of(settings), generator, on_step, stop_id))
    if settings.seed is None:
        err_console.print(f"[dim]seed {used_seed} (pass --seed {used_seed} to draw the same text again)[/]")


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
) -> None:
    """Measure loss, bits per character and perplexity on a text."""
    from charlm.data.sources import read_text  # noqa: PLC0415
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.inference.evaluate import evaluate_text  # noqa: PLC0415
    from charlm.training.checkpoint import resolve_checkpoint  # noqa: PLC0415

    _, model, vocab, cfg = _load_model(checkpoint, device, backend)
    result = evaluate_text(model, vocab, read_text(text), batch_size, TextSettings.from_config(cfg.data))
    if as_json:
        print(json.dumps({**result.to_dict(), "checkpoint": str(resolve_checkpoint(checkpoint)), "text": text}))
        return
    console = Console(highlight=False, soft_wrap=True)
    if result.unit == "bytes":
        console.print(f"loss {result.loss_nats:.4f} nats/byte | {result.bits_per_byte:.4f} bits/byte | "
                      f"{result.bpc:.4f} bits/char | perplexity {result.perplexity:.3f} per byte | "
                      f"{result.bytes:,} bytes ({result.chars:,} characters) scored")
    else:
        console.print(f"loss {result.loss_nats:.4f} nats/char | {result.bpc:.4f} bits/char | "
                      f"perplexity {result.perplexity:.3f} | {result.chars:,} characters scored")
    if result.oov_chars:
        how = "scored as <unk>" if result.oov_rule != "skipped" else "skipped (neither fed to the model nor scored)"
        console.print(f"{result.oov_chars:,} characters not in the model's vocabulary were {how}")


@app.command()
def info(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=CHECKPOINT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Describe a checkpoint: model, size, vocabulary, progress, best validation loss."""
    from charlm.training.checkpoint import describe_model, resolve_checkpoint  # noqa: PLC0415

    payload, model, vocab, cfg = _load_model(checkpoint)
    best = payload.get("best_val_loss")
    facts = {
        "checkpoint": str(resolve_checkpoint(checkpoint)), "model": describe_model(cfg.model),
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(vocab),
        "step": payload.get("step"), "epoch": payload.get("epoch"),
        "best_val_loss": best, "best_val_bpc": None if best is None else best / math.log(2),
        "best_step": payload.get("best_step"), "device": payload.get("device"),
        "elapsed_seconds": payload.get("elapsed"), "data": cfg.data.path,
    }
    if as_json:
        print(json.dumps(facts))
        return
    console = Console(highlight=False, soft_wrap=True)
    for key, value in facts.items():
        shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        console.print(f"{key.replace('_', ' '):>16}  {shown}")


@app.command(name="download")
def download_corpus(
    name: Optional[str] = typer.Argument(None, help=f"A known corpus: {', '.join(KNOWN_CORPORA)}."),
    folder: Path = typer.Option(Path("data"), "--dir", help="Where known corpora go: DIR/NAME/FILE."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch any URL instead of a known corpus."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected SHA-256 of the file at --url."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the file fetched from --url."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Fetch a known corpus's files from this base URL "
                                         "instead (same paths below it; the same SHA-256 checks)."),
) -> None:
    """Fetch a corpus, check its SHA-256 and write it atomically; print its path."""
    from charlm.data.download import fetch_known  # noqa: PLC0415

    if (name is None) == (url is None):
        raise UserError("give a corpus NAME or --url URL --out FILE (not both); known corpora: "
                        + ", ".join(KNOWN_CORPORA))
    if name is not None and name not in KNOWN_CORPORA:
        raise UserError(f"unknown corpus {name!r}; known corpora: {', '.join(KNOWN_CORPORA)} "
                        "(or use --url URL --sha256 HEX --out FILE)")
    if name is not None and (out is not None or sha256 is not None):
        raise UserError(f"--out and --sha256 go with --url; {name} is written to --dir DIR as DIR/{name}/ "
                        "and checked against its own SHA-256")
    if url is not None and (out is None or mirror is not None):
        raise UserError("--url needs --out FILE: where to write what it fetches" if out is None
                        else "--mirror goes with a corpus NAME; with --url, give the mirror's URL itself")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UserError(f"--sha256 must be 64 hexadecimal digits (got {sha256!r})")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("downloading", total=None)

        def show(label: str, done: int, total: Optional[int]) -> None:
            bar.update(task, description=f"downloading {label}", completed=done, total=total)

        if name is not None:
            out = folder / name / KNOWN_CORPORA[name].filename
            result = fetch_known(KNOWN_CORPORA[name], out, mirror, show)
        else:
            result = download(url, out, sha256, lambda done, total: show(out.name, done, total))
    if not result.fetched:
        err_console.print(f"{out} is already here with the expected SHA-256; nothing downloaded")
    elif url is not None and sha256 is None:
        err_console.print(f"[yellow]warning:[/] no --sha256 given, so the file is unchecked; its SHA-256 is "
                          f"{result.sha256} (pass --sha256 {result.sha256} to check it next time)")
    print(result.path)


@app.command()
def plot(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run dirs to overlay."),
    out: Path = typer.Option(Path("loss.png"), "--out", "-o", help="PNG file to write."),
    unit: str = typer.Option("nats", "--unit", help="nats (loss per character) or bpc (bits per character)."),
) -> None:
    """Plot train and val loss against step and wall time (needs matplotlib: charlm[plot])."""
    from charlm.report.plots import plot_runs  # noqa: PLC0415

    if unit not in ("nats", "bpc"):
        raise UserError(f"--unit must be nats or bpc (got {unit!r})")
    for notice in plot_runs(run_dirs, out, unit):
        err_console.print(notice)
    print(out)


@app.command()
def runs(folder: Path = typer.Argument(Path("runs"), help="Folder holding run dirs.")) -> None:
    """A table of the runs in a folder: model, size, steps, best val loss, time, state."""
    from rich.table import Table  # noqa: PLC0415

    from charlm.report.plots import find_runs, summarize  # noqa: PLC0415

    table = Table(title=f"runs in {folder}")
    for column in ("run", "model", "params", "steps", "best val (nats)", "best bpc", "time", "state"):
        table.add_column(column, justify="right" if column not in ("run", "model", "state") else "left")
    for run_dir in find_runs(folder):
        r = summarize(run_dir)
        best = "-" if r.best_val is None else f"{r.best_val:.4f}"
        bpc = "-" if r.best_val is None else f"{r.best_val / math.log(2):.4f}"
        table.add_row(r.name, r.model, "-" if r.parameters is None else f"{r.parameters:,}", f"{r.steps:,}", best, bpc,
                      f"{r.elapsed / 60:.1f} min", r.state)
    Console(highlight=False, soft_wrap=True).print(table)


@app.command()
def viz(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=CHECKPOINT_HELP),
    text: Optional[str] = typer.Option(None, "--text", help="A UTF-8 text file to look at."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Or a text given on the command line."),
    out: Path = typer.Option(Path("viz.html"), "--out", "-o", help="HTML page to write (self-contained)."),
    max_chars: int = typer.Option(20_000, "--max-chars", help="Characters of the text to show.", min=2),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Write an HTML page: each character coloured by surprisal, or by any unit's gates."""
    from charlm.atomic import write_text_atomic  # noqa: PLC0415
    from charlm.data.sources import read_text  # noqa: PLC0415
    from charlm.data.text import TextSettings  # noqa: PLC0415
    from charlm.report.page import render_page  # noqa: PLC0415
    from charlm.report.viz import inspect  # noqa: PLC0415
    from charlm.training.checkpoint import describe_model  # noqa: PLC0415

    if (text is None) == (prompt is None):
        raise UserError("give --text FILE or --prompt TEXT (one of them)")
    if prompt == "":
        raise UserError("--prompt is empty; give a text of at least 2 characters to look at")
    _, model, vocab, cfg = _load_model(checkpoint, device)
    content = read_text(text) if text is not None else prompt
    if len(content) > max_chars:
        err_console.print(f"showing the first {max_chars:,} of {len(content):,} characters (--max-chars)")
        content = content[:max_chars]
    inspection = inspect(model, vocab, content, TextSettings.from_config(cfg.data), cfg.model.type)
    source = Path(text).name if text is not None else "a prompt"
    page = render_page(inspection, f"charlm viz: {describe_model(cfg.model)}, on {source}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    print(out)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app; user errors become one line on stderr and exit code 2, and
    SIGINT / SIGTERM exit code 130 / 143 (with one line saying what they cut short, if anything)."""
    with InterruptSignals():
        try:
            _main(argv)
        except Interrupted as stop:  # out here, so that it also covers the handling of other errors
            _interrupted(stop)


def _main(argv: Optional[list[str]]) -> None:
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="charlm", standalone_mode=False)
    except UserError as err:
        _fail(str(err))
    except BrokenPipeError:
        sys.exit(0)  # e.g. `charlm sample ... | head`
    except Exception as err:  # noqa: BLE001 - typer's (vendored) click exceptions have no public base class
        _exit_for_click_error(err)
    sys.exit(code if isinstance(code, int) else 0)


def _exit_for_click_error(err: Exception) -> None:
    """Option-parsing errors (bad value, unknown option, missing option) -> one line, exit 2."""
    if type(err).__name__ == "NoArgsIsHelpError":
        print(err.format_message(), file=sys.stderr)
        sys.exit(2)
    if type(err).__name__ == "Abort":
        sys.exit(130)
    if hasattr(err, "format_message") and getattr(err, "exit_code", None) == 2:
        ctx = getattr(err, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        _fail(err.format_message() + hint)
    raise err


def _interrupted(stop: Interrupted) -> None:
    """A signal outside the training loop. Only train says what it cut short; sample, eval and
    the other commands just stop, as a pipeline stage should."""
    if stop.during:
        print(f"charlm: interrupted ({signal.Signals(stop.signum).name}) {stop.during}", file=sys.stderr)
    sys.exit(128 + stop.signum)


def _fail(message: str) -> None:
    for line in message.splitlines() or [message]:
        print(f"charlm: error: {line}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
