"""A trainer that dies with its worker: `python -m charlm.tune.tether PARENT_PID MODULE ARGS...`
ties this process to PARENT_PID, then runs MODULE as `python -m MODULE ARGS...` would.

A worker killed outright (SIGKILL, an OOM kill, a lost machine) cannot stop its trainer, which
runs in a session of its own; without this tie the trainer would go on alone, holding its run dir.
When the parent goes, the trainer gets SIGTERM: the stop it already handles (a checkpoint, then
exit), so another worker resumes the trial where it stopped. On Linux the kernel sends it
(PR_SET_PDEATHSIG); elsewhere (macOS) a watchdog thread notices that the parent pid changed.
CHARLM_TETHER=poll uses the watchdog on Linux too (the tests run both).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_SECONDS = 0.5


def tethered(parent: int, module: str, args: list[str]) -> list[str]:
    """The command that runs `python -m module args` tied to the process `parent`."""
    return [sys.executable, "-m", "charlm.tune.tether", str(parent), module, *args]


def tie_to(parent: int) -> None:
    """SIGTERM to this process once `parent` is gone (already gone: at once)."""
    if os.environ.get("CHARLM_TETHER") == "poll" or not _death_signal(signal.SIGTERM):
        threading.Thread(target=_watch, args=(parent,), name="charlm-tether", daemon=True).start()
    elif os.getppid() != parent:  # it died before the kernel was asked to tell us
        os.kill(os.getpid(), signal.SIGTERM)


def _death_signal(signum: int) -> bool:
    """Ask the kernel for `signum` when our parent dies; False where there is no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # noqa: PLC0415 - loaded only on Linux, the one platform with prctl

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    # A dead parent's children are adopted (by init or a subreaper): the parent pid changes.
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit("usage: python -m charlm.tune.tether PARENT_PID MODULE [ARGS...]")
    parent, module, args = int(argv[0]), argv[1], argv[2:]
    tie_to(parent)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
