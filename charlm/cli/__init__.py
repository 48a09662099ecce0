"""The `charlm` command: parse options, call the library, print. No tensor math here.

commands.py is the command table the Typer app is built from; the command modules define plain
functions, whose shared options are declared once in options.py, and reach the library through
library.py, which imports it on first use (so `charlm --help` and a mistyped option answer at once).
Every UserError (and every option click rejects) ends as one line on stderr and exit code 2;
SIGINT / SIGTERM as 130 / 143.
"""

from __future__ import annotations

import signal
import sys

import typer

from charlm.cli.commands import build_app
from charlm.errors import Interrupted, UserError
from charlm.training.signals import InterruptSignals

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; user errors become one line on stderr and exit code 2, and
    SIGINT / SIGTERM exit code 130 / 143 (with one line saying what they cut short, if anything)."""
    try:
        with InterruptSignals():
            try:
                _main(argv)
            except Interrupted as stop:  # out here, so that it also covers the handling of other errors
                _interrupted(stop)
    except SystemExit as done:
        _leave_process_group(done.code)
        raise


def _leave_process_group(code: str | int | None) -> None:
    """A torchrun process ends without the interpreter's teardown (see distributed.leave_process)."""
    distributed = sys.modules.get("charlm.training.distributed")  # imported only by a training run
    if distributed is None or not distributed.joined():
        return
    if isinstance(code, str):
        print(code, file=sys.stderr)
    distributed.leave_process(code if isinstance(code, int) else (0 if code is None else 1))


def _main(argv: list[str] | None) -> None:
    command = typer.main.get_command(build_app())
    try:
        code = command.main(args=argv, prog_name="charlm", standalone_mode=False)
    except UserError as err:
        _fail(str(err))
    except BrokenPipeError:
        sys.exit(0)  # e.g. `charlm sample ... | head`
    except Exception as err:  # typer's (vendored) click exceptions have no public base class
        _exit_for_click_error(err)
    sys.exit(code if isinstance(code, int) else 0)


def _exit_for_click_error(err: Exception) -> None:
    """Option-parsing errors (bad value, unknown option, missing option) -> one line, exit 2."""
    kind, format_message = type(err).__name__, getattr(err, "format_message", None)
    if kind == "NoArgsIsHelpError" and format_message is not None:
        print(format_message(), file=sys.stderr)
        sys.exit(2)
    if kind == "Abort":
        sys.exit(130)
    if format_message is not None and getattr(err, "exit_code", None) == 2:
        ctx = getattr(err, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        _fail(format_message() + hint)
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
