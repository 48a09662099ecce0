"""One trial: a `charlm train` subprocess in the trial's run dir, its metrics.jsonl read as it
grows so that each evaluation is reported at once, and a SIGINT (the trainer checkpoints and
exits) when the trial is pruned or the sweep is stopped. The trainer is tied to its worker
(tether.py): a worker that dies, however, takes its trainer with it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from charlm.atomic import write_text_atomic
from charlm.config import Config, config_yaml
from charlm.store.rundir import CONFIG, LAST, METRICS
from charlm.tune.tether import tethered

TRIAL_CONFIG = "trial.yaml"  # the config the sweep gave the trial (config.yaml: what ran)
TRAIN_LOG = "train.log"  # the trainer's stdout and stderr
POLL_SECONDS = 0.25
STOP_SECONDS = 60  # what a stopped trainer gets to checkpoint and exit before it is killed
ERROR_PREFIX = "charlm: error: "


@dataclass(frozen=True)
class TrialRun:
    """How a trial's trainer ended: complete, pruned, failed or interrupted (put back in the queue)."""

    outcome: str
    best_val: float | None  # the lowest finite val loss of its evaluations
    steps: int
    seconds: float  # training time, as the trainer measures it (resumed runs included)
    message: str | None = None


class MetricsTail:
    """The events appended to a metrics.jsonl since the last call (a line still being written waits)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def new_events(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
        return events


def train_command(run_dir: Path, cfg: Config) -> list[str]:
    """The command that trains (or, after an interruption, resumes) the trial in `run_dir`, tied
    to this worker."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / LAST).is_file():
        return tethered(os.getpid(), "charlm", ["train", "--resume", "--out", str(run_dir), "--quiet"])
    # A start cut short before its first checkpoint has nothing to resume: start over.
    for name in (METRICS, CONFIG):
        (run_dir / name).unlink(missing_ok=True)
    write_text_atomic(run_dir / TRIAL_CONFIG, config_yaml(cfg.to_dict()))
    return tethered(
        os.getpid(), "charlm", ["train", "--config", str(run_dir / TRIAL_CONFIG), "--out", str(run_dir), "--quiet"]
    )


def run_trial(
    command: list[str],
    run_dir: Path,
    report: Callable[[int, float], bool],
    stop_signal: Callable[[], int | None],
    alive: Callable[[], None] = lambda: None,
) -> TrialRun:
    """Run the trainer until it ends. `report(step, val_loss)` is called for each evaluation and
    says whether to prune; `stop_signal()` says whether the sweep was asked to stop; `alive()` is
    called at each look at the trainer (the worker's heartbeat)."""
    log_path = run_dir / TRAIN_LOG
    log_start = log_path.stat().st_size if log_path.exists() else 0
    tail, events, ending = MetricsTail(run_dir / METRICS), [], None
    with open(log_path, "ab") as log:
        # A session (and process group) of its own: a Ctrl-C or a hangup in the terminal reaches
        # `charlm tune` alone, which then stops the trainer's group with one SIGINT (a second one
        # could cut its checkpoint short).
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # whole lines in the log
        try:
            while True:
                alive()
                finished = process.poll() is not None  # read after this, so the last events are seen
                for event in tail.new_events():
                    events.append(event)
                    if ending is None and event.get("event") == "eval" and report(event["step"], event["val_loss"]):
                        ending = _stop(process, "pruned")
                if ending is None and stop_signal() is not None and not finished:
                    ending = _stop(process, "interrupted")
                if finished:
                    break
                time.sleep(POLL_SECONDS)
        finally:
            if process.poll() is None:  # charlm tune itself failed: leave no trainer behind
                _stop(process, "")
                _wait_or_kill(process)
    return _outcome(process.returncode, events, ending, log_path, log_start)


def _stop(process: subprocess.Popen, why: str) -> str:
    """One SIGINT to the trainer's process group (the trainer and whatever it started)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)
        except ProcessLookupError:  # it ended meanwhile
            pass
    return why


def _wait_or_kill(process: subprocess.Popen) -> None:
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:  # a trainer that does not stop is not left running
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _outcome(code: int, events: list[dict], ending: str | None, log_path: Path, log_start: int) -> TrialRun:
    vals = [e["val_loss"] for e in events if e.get("event") == "eval" and math.isfinite(e.get("val_loss", math.nan))]
    best = min(vals) if vals else None
    steps = max((e.get("step", 0) for e in events), default=0)
    seconds = max((e.get("elapsed", 0.0) for e in events), default=0.0)
    if ending == "pruned" or (ending == "interrupted" and code in (128 + signal.SIGINT, -signal.SIGINT)):
        return TrialRun(ending, best, steps, seconds)
    if code == 0:
        if best is None:
            return TrialRun(
                "failed",
                None,
                steps,
                seconds,
                "no finite validation loss: the trial diverged or ended before its first evaluation",
            )
        return TrialRun("complete", best, steps, seconds)
    return TrialRun("failed", best, steps, seconds, _failure(code, log_path, log_start))


def _failure(code: int, log_path: Path, log_start: int) -> str:
    """The trainer's own one-line error (exit 2), else its exit code and where its output is."""
    with open(log_path, "rb") as handle:
        handle.seek(log_start)
        lines = handle.read().decode("utf-8", errors="replace").splitlines()
    errors = [line.removeprefix(ERROR_PREFIX) for line in lines if line.startswith(ERROR_PREFIX)]
    if code == 2 and errors:
        return "; ".join(errors)
    if code < 0:
        return f"the trainer was killed by {signal_name(-code)}; its output is in {log_path}"
    return f"the trainer exited with code {code}; its output is in {log_path}"


def signal_name(signum: int) -> str:
    """SIGKILL for the signals Python names; `signal 37 (SIGRTMIN+3)` for real-time and unknown ones."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        low, high = getattr(signal, "SIGRTMIN", None), getattr(signal, "SIGRTMAX", None)
        if low is not None and high is not None and low <= signum <= high:
            return f"signal {signum} (SIGRTMIN+{signum - low})"
        return f"signal {signum}"
