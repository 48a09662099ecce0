"""Files around the runs: `charlm download` (corpora), `charlm plot` and `charlm runs` (run dirs), `charlm viz` (a page)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from charlm.atomic import write_text_atomic
from charlm.cli import library as lib
from charlm.cli.common import console, err_console, load_model
from charlm.cli.options import CheckpointOption, DeviceOption
from charlm.data.download import KNOWN_CORPORA, Downloaded, download, fetch_known
from charlm.errors import UserError


def download_corpus(
    name: Annotated[str | None, typer.Argument(help=f"A known corpus: {', '.join(KNOWN_CORPORA)}.")] = None,
    folder: Annotated[Path, typer.Option("--dir", help="Where known corpora go: DIR/NAME/FILE.")] = Path("data"),
    url: Annotated[str | None, typer.Option("--url", help="Fetch any URL instead of a known corpus.")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected SHA-256 of the file at --url.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the file fetched from --url.")] = None,
    mirror: Annotated[
        str | None,
        typer.Option(
            "--mirror",
            help="Fetch a known corpus's files from this base URL instead (same paths below it; the same "
            "SHA-256 checks).",
        ),
    ] = None,
) -> None:
    """Fetch a corpus, check its SHA-256 and write it atomically; print its path."""
    _check_download_options(name, url, sha256, out, mirror)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("downloading", total=None)

        def show(label: str, done: int, total: int | None) -> None:
            bar.update(task, description=f"downloading {label}", completed=done, total=total)

        result: Downloaded
        if name is not None:
            out = folder / name / KNOWN_CORPORA[name].filename
            result = fetch_known(KNOWN_CORPORA[name], out, mirror, show)
        else:
            assert url is not None and out is not None, "_check_download_options lets --url through with --out only"
            target = out
            result = download(url, target, sha256, lambda done, total: show(target.name, done, total))
    if not result.fetched:
        err_console.print(f"{out} is already here with the expected SHA-256; nothing downloaded")
    elif url is not None and sha256 is None:
        err_console.print(
            f"[yellow]warning:[/] no --sha256 given, so the file is unchecked; its SHA-256 is "
            f"{result.sha256} (pass --sha256 {result.sha256} to check it next time)"
        )
    print(result.path)


def _check_download_options(
    name: str | None, url: str | None, sha256: str | None, out: Path | None, mirror: str | None
) -> None:
    """A known corpus by NAME (with --dir, --mirror) or any --url with --out (and --sha256), not a mix."""
    if (name is None) == (url is None):
        raise UserError(
            "give a corpus NAME or --url URL --out FILE (not both); known corpora: " + ", ".join(KNOWN_CORPORA)
        )
    if name is not None and name not in KNOWN_CORPORA:
        raise UserError(
            f"unknown corpus {name!r}; known corpora: {', '.join(KNOWN_CORPORA)} "
            "(or use --url URL --sha256 HEX --out FILE)"
        )
    if name is not None and (out is not None or sha256 is not None):
        raise UserError(
            f"--out and --sha256 go with --url; {name} is written to --dir DIR as DIR/{name}/ "
            "and checked against its own SHA-256"
        )
    if url is not None and (out is None or mirror is not None):
        raise UserError(
            "--url needs --out FILE: where to write what it fetches"
            if out is None
            else "--mirror goes with a corpus NAME; with --url, give the mirror's URL itself"
        )
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UserError(f"--sha256 must be 64 hexadecimal digits (got {sha256!r})")


def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run dirs to overlay.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("loss.png"),
    unit: Annotated[
        str, typer.Option("--unit", help="nats (loss per character) or bpc (bits per character).")
    ] = "nats",
) -> None:
    """Plot train and val loss against step and wall time (needs matplotlib: pip install 'charlm\\[plot]')."""
    if unit not in ("nats", "bpc"):
        raise UserError(f"--unit must be nats or bpc (got {unit!r})")
    for notice in lib.plot_runs(run_dirs, out, unit):
        err_console.print(notice)
    print(out)


def runs(folder: Annotated[Path, typer.Argument(help="Folder holding run dirs.")] = Path("runs")) -> None:
    """A table of the runs in a folder: model, size, steps, best val loss, time, state."""
    table = Table(title=f"runs in {folder}")
    for column in ("run", "model", "params", "steps", "best val (nats)", "best bpc", "time", "state"):
        table.add_column(column, justify="right" if column not in ("run", "model", "state") else "left")
    for run_dir in lib.find_runs(folder):
        r = lib.summarize(run_dir)
        best = "-" if r.best_val is None else f"{r.best_val:.4f}"
        bpc = "-" if r.best_val is None else f"{r.best_val / math.log(2):.4f}"
        table.add_row(
            r.name,
            r.model,
            "-" if r.parameters is None else f"{r.parameters:,}",
            f"{r.steps:,}",
            best,
            bpc,
            f"{r.elapsed / 60:.1f} min",
            r.state,
        )
    console().print(table)


def viz(
    checkpoint: CheckpointOption,
    text: Annotated[str | None, typer.Option("--text", help="A UTF-8 text file to look at.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Or a text given on the command line.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML page to write (self-contained).")] = Path("viz.html"),
    max_chars: Annotated[int, typer.Option("--max-chars", help="Characters of the text to show.", min=2)] = 20_000,
    device: DeviceOption = "auto",
) -> None:
    """Write an HTML page: each character coloured by surprisal, or by any unit's gates."""
    if (text is None) == (prompt is None):
        raise UserError("give --text FILE or --prompt TEXT (one of them)")
    if prompt == "":
        raise UserError("--prompt is empty; give a text of at least 2 characters to look at")
    _, model, vocab, cfg = load_model(checkpoint, device)
    content = lib.read_text(text) if text is not None else prompt
    assert content is not None, "one of --text and --prompt is given (checked above)"
    if len(content) > max_chars:
        err_console.print(f"showing the first {max_chars:,} of {len(content):,} characters (--max-chars)")
        content = content[:max_chars]
    inspection = lib.inspect(model, vocab, content, lib.TextSettings.from_config(cfg.data), cfg.model.type)
    source = Path(text).name if text is not None else "a prompt"
    page = lib.render_page(inspection, f"charlm viz: {lib.describe_model(cfg.model)}, on {source}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    print(out)
