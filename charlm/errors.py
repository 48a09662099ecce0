"""The endings a user causes: UserError (bad config, bad file, bad option) and Interrupted (a signal).

The CLI turns each into one line on stderr and exit code 2 (128 + signal); everything else is a bug.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message names the problem and what to do."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside the training loop (see runtime.InterruptSignals).

    A BaseException, like KeyboardInterrupt, so that `except Exception` clauses (a failed C++
    build, a compile fallback) do not swallow it; `with` blocks and `finally` clauses still clean
    up. `during` says what it cut short and what is left, for the one line the CLI prints."""

    def __init__(self, signum: int, during: str | None = None):
        super().__init__(signum)
        self.signum, self.during = signum, during
