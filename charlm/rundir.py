"""A run directory: its files, the guard against overwriting another run, and metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from charlm.checkpoint import BEST, LAST
from charlm.errors import UserError

CONFIG, METRICS = "config.yaml", "metrics.jsonl"
RUN_FILES = (LAST, BEST, CONFIG, METRICS)


class RunDirError(UserError):
    """A run dir that cannot be used as asked (would overwrite a run, cannot be written, ...)."""


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make sure training may write into `run_dir`, creating it, or refuse with advice."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} exists and is not a directory; choose another --out")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not (run_dir / LAST).is_file():
            raise RunDirError(f"nothing to resume: {run_dir / LAST} does not exist; train without --resume")
        return
    if existing and not overwrite:
        raise RunDirError(f"run dir {run_dir} already holds a run ({', '.join(existing)}); "
                          "add --resume to continue it, --overwrite to replace it, or --out to use another dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in existing:
            (run_dir / name).unlink()
        probe = run_dir / ".charlm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write to run dir {run_dir}: {err.strerror or err}; choose another --out") from None


def write_config(run_dir: Path, config: dict) -> None:
    """The resolved config, atomically (temp file + rename)."""
    tmp = run_dir / f".{CONFIG}.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, run_dir / CONFIG)


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl, flushed at once (readable live)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        self._handle.write(json.dumps({"event": event, **fields}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows
