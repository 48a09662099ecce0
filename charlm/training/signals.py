"""Stop signals (SIGINT, SIGTERM): an exception for a whole command, a flag for the training loop.

Imports no torch, so the CLI installs these handlers before anything heavy is loaded.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import TypeVar

from charlm.errors import Interrupted

H = TypeVar("H", bound="_Handlers")


class _Handlers:
    """Installs self._handle for SIGINT and SIGTERM while in the `with` block; restores the previous ones after."""

    _previous: dict

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        raise NotImplementedError

    def __enter__(self: H) -> H:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class InterruptSignals(_Handlers):
    """For a whole command: SIGINT and SIGTERM raise Interrupted wherever the program is, so that
    its `with` blocks and `finally` clauses clean up (the run-dir lock, the corpus scratch folder,
    temp files) and the CLI ends with one line and 128 + signal. The training loop's StopRequests
    takes the signals over while it runs. Only the first signal raises: a second one must not cut
    that cleanup short."""

    def __init__(self) -> None:
        self._previous: dict = {}
        self._raised = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._raised:
            self._raised = True
            raise Interrupted(signum)


class StopRequests(_Handlers):
    """Turns SIGINT / SIGTERM into a flag the loop checks between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum
