"""Run the shell blocks that README.md and the docs mark runnable, as written, on tiny data.

Every ```bash block in a checked page is preceded by one of two comments:

    <!-- runnable -->                  run by this script
    <!-- not runnable: <why> -->       shown only (a server that runs until stopped, a network fetch, ...)

A block with neither is an error, so a new command cannot slip past. The runnable blocks of one page run in
order in one bash (`set -euo pipefail`), as a reader pastes them into one terminal, in a fresh folder that holds what a reader's clone holds: configs/, and
.venv (the Python this script runs under). The commands run as written, with two changes that keep a run in
seconds and off the network, both made by a shell function named `charlm` (it wins over the PATH):
- `charlm download NAME` gets `--mirror` pointing at a server on 127.0.0.1 that serves the shared copy of the
  corpus (the same bytes, so the same SHA-256 checks pass);
- `charlm train` gets `--set` overrides for a tiny model and a 20-step budget.
The folder also holds a reader's own text for the "your own text" examples: my_book.txt (English), my_texts/
(a few files) and poems.txt (a Tang poem per line), cut from the shared corpora. The Tang poems' upstream JSON files
are not mirrored here, so their converted file is placed where `charlm download tang_poems` writes it (the same
bytes): that command then finds it, checks its SHA-256 and leaves it be. Pages run in parallel (--jobs).

    python scripts/run_doc_blocks.py README.md docs/quickstart.md
    python scripts/run_doc_blocks.py --list README.md     # the blocks, without running them

Exit 0 when every runnable block exits 0; 1 naming the first block that failed, with its output.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import http.server
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
TANG_POEMS = SHARED_DATA / "chinese" / "tang_poems.txt"

RUNNABLE = re.compile(r"^<!--\s*runnable\s*-->$")
NOT_RUNNABLE = re.compile(r"^<!--\s*not runnable:\s*\S.*-->$")
MARK = "@@doc-block line "
FENCE_OPEN = re.compile(r"^\s*```(bash|sh|shell|console)\s*$")  # indented too: in a list item or a note

# A tiny model and a 20-step budget: every train command of the docs finishes in seconds, whatever its config.
TINY_TRAIN = (
    "--set model.hidden_size=32 --set model.num_layers=1 --set model.embedding_dim=16 "
    "--set train.batch_size=8 --set train.seq_len=32 --set train.max_steps=20 --set train.max_time=null "
    "--set train.warmup_steps=0 --set train.eval_interval=10 --set train.log_interval=10"
)

PRELUDE = """\
set -euo pipefail
charlm() {
  case "${1:-}" in
    download) command charlm "$@" --mirror "$DOC_MIRROR/$2" ;;
    train) command charlm "$@" $DOC_TINY_TRAIN ;;
    *) command charlm "$@" ;;
  esac
}
"""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    text: str
    runnable: bool


class MarkingError(ValueError):
    """A bash block without a runnable / not-runnable comment above it."""


def blocks(page: Path) -> list[Block]:
    """The bash blocks of a page, each with its marking; a block left unmarked raises MarkingError."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if not FENCE_OPEN.match(lines[i]):
            i += 1
            continue
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if not (RUNNABLE.match(above) or NOT_RUNNABLE.match(above)):
            raise MarkingError(
                f"{page}:{i + 1}: a bash block needs <!-- runnable --> or <!-- not runnable: why --> above it"
            )
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise MarkingError(f"{page}:{i + 1}: the bash block is never closed")
        text = textwrap.dedent("\n".join(lines[i + 1 : end]))
        found.append(Block(page, i + 1, text, bool(RUNNABLE.match(above))))
        i = end + 1
    return found


@contextmanager
def corpus_mirror() -> Iterator[str]:
    """A server on 127.0.0.1 holding the known corpora the docs download, at the paths `--mirror` asks for."""
    with tempfile.TemporaryDirectory(prefix="charlm-doc-mirror-") as tmp:
        served = Path(tmp)
        (served / "tinyshakespeare").mkdir()
        (served / "tinyshakespeare" / "input.txt").symlink_to(SHAKESPEARE)
        handler = functools.partial(_QuietHandler, directory=str(served))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def reader_folder(where: Path) -> Path:
    """A fresh folder as a reader's clone has it, plus the reader's own text for the examples."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "configs").symlink_to(ROOT / "configs")
    (where / ".venv").symlink_to(Path(sys.prefix))
    english = SHAKESPEARE.read_text(encoding="utf-8")
    (where / "my_book.txt").write_text(english[:300_000], encoding="utf-8")
    texts = where / "my_texts"
    texts.mkdir()
    for n, start in enumerate(range(300_000, 600_000, 100_000)):
        (texts / f"part{n + 1}.txt").write_text(english[start : start + 100_000], encoding="utf-8")
    if TANG_POEMS.exists():
        poems = TANG_POEMS.read_text(encoding="utf-8").splitlines()[:3000]
        (where / "poems.txt").write_text("\n".join(poems) + "\n", encoding="utf-8")
        (where / "data" / "tang_poems").mkdir(parents=True)
        (where / "data" / "tang_poems" / "tang_poems.txt").symlink_to(TANG_POEMS)
    return where


def run_page(page: Path, folder: Path, mirror: str, timeout: float, verbose: bool = False) -> bool:
    """Run a page's runnable blocks in order in one bash, as a reader pastes them into one terminal."""
    runnable = [b for b in blocks(page) if b.runnable]
    # DO_NOT_TRACK: MLflow's usage telemetry would reach for the network (the tracking guide says so)
    env = dict(os.environ, DOC_MIRROR=mirror, DOC_TINY_TRAIN=TINY_TRAIN, DO_NOT_TRACK="true")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    script = PRELUDE + "".join(f"echo '{MARK}{b.line}' >&2\n{b.text}\n" for b in runnable)
    print(f"{page.relative_to(ROOT)}: {len(runnable)} runnable blocks", flush=True)
    result = subprocess.run(
        ["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode == 0:
        print(result.stdout if verbose else f"ok: {page.relative_to(ROOT)}", flush=True)
        return True
    started = [line for line in result.stderr.splitlines() if line.startswith(MARK)]
    line = int(started[-1][len(MARK) :]) if started else runnable[0].line
    block = next(b for b in runnable if b.line == line)
    print(f"FAILED (exit {result.returncode}) in the block at {page.relative_to(ROOT)}:{line}:\n{block.text}")
    print(result.stdout[-4000:])
    print(result.stderr[-4000:], file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("pages", nargs="+", type=Path, help="Markdown pages, relative to the repository root")
    parser.add_argument("--list", action="store_true", help="print the blocks and their marking; run nothing")
    parser.add_argument("--jobs", type=int, default=2, help="pages run at once (default: 2)")
    parser.add_argument("--verbose", action="store_true", help="print what the blocks print")
    parser.add_argument("--workdir", type=Path, help="where the reader's folders go (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for one page")
    args = parser.parse_args(argv)
    pages = [page if page.is_absolute() else ROOT / page for page in args.pages]
    try:
        found = {page: blocks(page) for page in pages}
    except MarkingError as error:
        print(error, file=sys.stderr)
        return 1
    if args.list:
        for page, page_blocks in found.items():
            for block in page_blocks:
                print(f"{page.relative_to(ROOT)}:{block.line}: {'runnable' if block.runnable else 'shown only'}")
        return 0
    if not SHAKESPEARE.exists():
        print(f"{SHAKESPEARE} is absent: the blocks download Tiny Shakespeare from a mirror of it", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="charlm-doc-blocks-") as tmp, corpus_mirror() as mirror:
        base = args.workdir or Path(tmp)
        # One folder per page, named by its path (README, docs-quickstart, docs-zh-learning-path, ...).
        folders = [reader_folder(base / "-".join(page.relative_to(ROOT).with_suffix("").parts)) for page in pages]
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            passed = list(
                pool.map(
                    lambda page, folder: run_page(page, folder, mirror, args.timeout, args.verbose), pages, folders
                )
            )
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
