"""The `charlm` console script and `python -m charlm`: the command, with Ctrl-C covered from the first moment.

Importing the command line (typer, rich, every command's options) takes a noticeable moment;
a Ctrl-C then arrives before charlm.cli.main has set up its signal handling, and Python would
print a KeyboardInterrupt traceback. Here it ends as the command's own interruptions do: one
line on stderr and exit code 130.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def _load_cli() -> ModuleType:
    return importlib.import_module("charlm.cli")


def main() -> None:
    try:
        cli = _load_cli()
    except KeyboardInterrupt:
        print("charlm: interrupted while starting", file=sys.stderr)
        raise SystemExit(130) from None
    cli.main()
