"""Loss curves of runs as a PNG, and a table of the runs under a folder.

matplotlib is an optional extra (pip install 'charlm[plot]'); only `charlm plot` needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from charlm.atomic import atomic_open
from charlm.config import read_yaml_mapping
from charlm.errors import UserError
from charlm.training.rundir import CONFIG, LOCK, METRICS, pid_alive, read_metrics

LN2 = math.log(2)


@dataclass
class RunSummary:
    name: str
    model: str
    parameters: Optional[int]
    steps: int
    best_val: Optional[float]
    elapsed: float
    state: str  # finished | early-stopped | interrupted | running | crashed | empty


def summarize(run_dir: Path) -> RunSummary:
    events = read_metrics(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    last_start = max((i for i, e in enumerate(events) if e["event"] == "start"), default=-1)
    end = next((e for e in events[last_start + 1:] if e["event"] == "end"), None) if last_start >= 0 else None
    steps = max((e.get("step", 0) for e in events), default=0)
    best = min((e["val_loss"] for e in events if e["event"] == "eval"), default=None)
    elapsed = max((e.get("elapsed", 0.0) for e in events), default=0.0)
    return RunSummary(run_dir.name, _model_of(run_dir), starts[-1].get("num_parameters") if starts else None,
                      steps, best, elapsed, _state(run_dir, events, end))


def _state(run_dir: Path, events: list, end: Optional[dict]) -> str:
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
    return {"budget": "finished", "early_stop": "early-stopped"}.get(end.get("reason"), "interrupted")


def _model_of(run_dir: Path) -> str:
    model = read_yaml_mapping(run_dir / CONFIG).get("model")
    if not isinstance(model, dict):
        return "?"
    return f"{model.get('type', '?')} {model.get('num_layers', '?')}x{model.get('hidden_size', '?')}"


def find_runs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"no such folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_dir() and ((p / METRICS).exists() or (p / "last.pt").exists()))


def plot_runs(run_dirs: list[Path], out: Path, unit: str = "nats") -> list[str]:
    """Train and val loss against step and against wall time, all runs overlaid; returns notices."""
    plt = _pyplot()
    scale = 1.0 if unit == "nats" else 1.0 / LN2
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    notices, drawn = [], 0
    for run_dir in run_dirs:
        if not (run_dir / METRICS).exists():
            raise UserError(f"{run_dir} is not a run dir (it has no {METRICS})")
        events = read_metrics(run_dir)
        if not [e for e in events if e["event"] in ("train", "eval")]:
            notices.append(f"{run_dir} has no loss values yet; left out")
            continue
        drawn += 1
        _draw(by_step, by_time, run_dir.name, events, scale)
    if not drawn:
        plt.close(fig)
        raise UserError("nothing to plot: none of the runs has logged a loss yet")
    label = "loss (nats/char)" if unit == "nats" else "bits per character"
    for axis, xlabel in ((by_step, "step"), (by_time, "wall time (min)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    by_step.set_title("against steps")
    by_time.set_title("against time")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(out, "wb") as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return notices


def _draw(by_step, by_time, name: str, events: list, scale: float) -> None:
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    for axis, key, factor in ((by_step, "step", 1.0), (by_time, "elapsed", 1 / 60)):
        if train:
            line, = axis.plot([e[key] * factor for e in train], [e["loss"] * scale for e in train], alpha=0.45,
                              linewidth=1, label=f"{name} train")
            color = line.get_color()
        else:
            color = None
        if evals:
            axis.plot([e[key] * factor for e in evals], [e["val_loss"] * scale for e in evals], marker="o",
                      markersize=3, color=color, label=f"{name} val")
            best = min(evals, key=lambda e: e["val_loss"])
            axis.scatter([best[key] * factor], [best["val_loss"] * scale], marker="*", s=160, color=color,
                         edgecolors="black", zorder=5)
            axis.annotate(f"{best['val_loss'] * scale:.3f}", (best[key] * factor, best["val_loss"] * scale),
                          textcoords="offset points", xytext=(6, 6), fontsize=8)


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise UserError("charlm plot needs matplotlib: pip install 'charlm[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt
