"""metrics.jsonl, the one record of a run's events: the writer, the reader and the per-run summary
`charlm runs` shows. Imports no torch, so that `charlm runs` and `charlm plot` start at once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from charlm.config import read_yaml_mapping
from charlm.errors import UserError
from charlm.store.events import Event
from charlm.store.rundir import CONFIG, LAST, LOCK, METRICS, pid_alive


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl, flushed at once (readable live).

    Events: start, train, eval, sample (only with train.loggers beyond jsonl), skip, rollback, end;
    readers pick the events they know by name and pass over the others."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS
        self._handle = open(self.path, "a", encoding="utf-8")

    def log(self, event: Event) -> None:
        self._handle.write(json.dumps(event.record()) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class NoMetrics:
    """What ranks other than 0 log: nothing."""

    wants_samples = False

    def log(self, event: Event) -> None:
        pass

    def checkpoint_written(self) -> None:
        pass

    def close(self) -> None:
        pass


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


@dataclass
class RunSummary:
    name: str
    model: str
    parameters: int | None
    steps: int
    best_val: float | None
    elapsed: float
    state: str  # finished | early-stopped | interrupted | running | crashed | empty


def find_runs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"no such folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_dir() and ((p / METRICS).exists() or (p / LAST).exists()))


def summarize(run_dir: Path) -> RunSummary:
    events = read_metrics(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    last_start = max((i for i, e in enumerate(events) if e["event"] == "start"), default=-1)
    end = next((e for e in events[last_start + 1 :] if e["event"] == "end"), None) if last_start >= 0 else None
    steps = max((e.get("step", 0) for e in events), default=0)
    best = min((e["val_loss"] for e in events if e["event"] == "eval"), default=None)
    elapsed = max((e.get("elapsed", 0.0) for e in events), default=0.0)
    return RunSummary(
        run_dir.name,
        _model_of(run_dir),
        starts[-1].get("num_parameters") if starts else None,
        steps,
        best,
        elapsed,
        _state(run_dir, events, end),
    )


def _state(run_dir: Path, events: list, end: dict | None) -> str:
    lock = run_dir / LOCK
    if lock.exists():
        try:
            if pid_alive(int(lock.read_text().strip())):
                return "running"
        except (OSError, ValueError):
            pass
    if not events:
        return "empty"
    if end is None:
        return "crashed"
    return {"budget": "finished", "early_stop": "early-stopped"}.get(str(end.get("reason")), "interrupted")


def _model_of(run_dir: Path) -> str:
    model = read_yaml_mapping(run_dir / CONFIG).get("model")
    if not isinstance(model, dict):
        return "?"
    return f"{model.get('type', '?')} {model.get('num_layers', '?')}x{model.get('hidden_size', '?')}"
