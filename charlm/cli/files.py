"""Files around the runs: `charlm download` (corpora), `charlm plot` and `charlm runs` (run dirs), `charlm viz` (a page)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from charlm.cli.common import CHECKPOINT_HELP, app, console, err_console, load_model
from charlm.data.download import KNOWN_CORPORA, download
from charlm.errors import UserError


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

    _check_download_options(name, url, sha256, out, mirror)
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


def _check_download_options(name: Optional[str], url: Optional[str], sha256: Optional[str], out: Optional[Path],
                            mirror: Optional[str]) -> None:
    """A known corpus by NAME (with --dir, --mirror) or any --url with --out (and --sha256), not a mix."""
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


@app.command()
def plot(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run dirs to overlay."),
    out: Path = typer.Option(Path("loss.png"), "--out", "-o", help="PNG file to write."),
    unit: str = typer.Option("nats", "--unit", help="nats (loss per character) or bpc (bits per character)."),
) -> None:
    """Plot train and val loss against step and wall time (needs matplotlib: pip install 'charlm\\[plot]')."""
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

    from charlm.store.metrics import find_runs, summarize  # noqa: PLC0415

    table = Table(title=f"runs in {folder}")
    for column in ("run", "model", "params", "steps", "best val (nats)", "best bpc", "time", "state"):
        table.add_column(column, justify="right" if column not in ("run", "model", "state") else "left")
    for run_dir in find_runs(folder):
        r = summarize(run_dir)
        best = "-" if r.best_val is None else f"{r.best_val:.4f}"
        bpc = "-" if r.best_val is None else f"{r.best_val / math.log(2):.4f}"
        table.add_row(r.name, r.model, "-" if r.parameters is None else f"{r.parameters:,}", f"{r.steps:,}", best, bpc,
                      f"{r.elapsed / 60:.1f} min", r.state)
    console().print(table)


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
    from charlm.store.checkpoint import describe_model  # noqa: PLC0415

    if (text is None) == (prompt is None):
        raise UserError("give --text FILE or --prompt TEXT (one of them)")
    if prompt == "":
        raise UserError("--prompt is empty; give a text of at least 2 characters to look at")
    _, model, vocab, cfg = load_model(checkpoint, device)
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

