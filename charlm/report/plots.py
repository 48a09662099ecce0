"""Loss curves of runs (train and val, against steps and wall time) as a PNG, from their metrics.jsonl.
matplotlib is an optional extra (pip install 'charlm[plot]'); only `charlm plot` needs it."""

from __future__ import annotations

import math
from pathlib import Path

from charlm.atomic import atomic_open
from charlm.errors import UserError
from charlm.store.metrics import read_metrics
from charlm.store.rundir import METRICS

LN2 = math.log(2)


def plot_runs(run_dirs: list[Path], out: Path, unit: str = "nats") -> list[str]:
    """Train and val loss against step and against wall time, all runs overlaid; returns notices."""
    plt = _pyplot("charlm plot")
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
    _write_png(plt, fig, out)
    return notices


def _draw(by_step, by_time, name: str, events: list, scale: float) -> None:
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    for axis, key, factor in ((by_step, "step", 1.0), (by_time, "elapsed", 1 / 60)):
        if train:
            (line,) = axis.plot(
                [e[key] * factor for e in train],
                [e["loss"] * scale for e in train],
                alpha=0.45,
                linewidth=1,
                label=f"{name} train",
            )
            color = line.get_color()
        else:
            color = None
        if evals:
            axis.plot(
                [e[key] * factor for e in evals],
                [e["val_loss"] * scale for e in evals],
                marker="o",
                markersize=3,
                color=color,
                label=f"{name} val",
            )
            best = min(evals, key=lambda e: e["val_loss"])
            axis.scatter(
                [best[key] * factor],
                [best["val_loss"] * scale],
                marker="*",
                s=160,
                color=color,
                edgecolors="black",
                zorder=5,
            )
            axis.annotate(
                f"{best['val_loss'] * scale:.3f}",
                (best[key] * factor, best["val_loss"] * scale),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )


def _pyplot(command: str):
    try:
        import matplotlib  # noqa: PLC0415 - the optional plot extra, loaded only when a plot is drawn
    except ImportError:
        raise UserError(f"{command} needs matplotlib: pip install 'charlm[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after matplotlib.use("Agg"), which must come first

    return plt


def plot_gradient_probe(models: list[dict], out: Path) -> None:
    """||d loss_t / d h_{t-k}|| (and c for the LSTM) against k, one line per model, log scale."""
    plt = _pyplot("charlm probe")
    fig, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    for entry in models:
        (line,) = axis.plot(entry["k"], _positive(entry["hidden_grad_norm"]), label=f"{entry['label']}: h")
        if entry.get("cell_grad_norm"):
            axis.plot(
                entry["k"],
                _positive(entry["cell_grad_norm"]),
                linestyle="--",
                color=line.get_color(),
                label=f"{entry['label']}: c",
            )
    axis.set_yscale("log")
    axis.set_xlabel("k (steps back)")
    axis.set_ylabel("mean ||d loss_t / d state_{t-k}||")
    axis.set_title("how far back the gradient reaches")
    _save(plt, fig, axis, out)


def plot_context_probe(models: list[dict], out: Path) -> None:
    """Loss against the characters of context the model may read, one line per model, with its
    carried-state loss as a dotted level."""
    plt = _pyplot("charlm probe")
    fig, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    for entry in models:
        (line,) = axis.plot(entry["k"], entry["loss_nats"], marker="o", markersize=3, label=entry["label"])
        axis.axhline(
            entry["carried_loss_nats"], linestyle=":", color=line.get_color(), label=f"{entry['label']}: state carried"
        )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("characters of context (state reset k steps back)")
    axis.set_ylabel("loss (nats/char)")
    axis.set_title("how much context the predictions use")
    _save(plt, fig, axis, out)


def _positive(values: list[float]) -> list[float]:
    return [v if v > 0 else math.nan for v in values]  # a log axis cannot show 0


def _save(plt, fig, axis, out: Path) -> None:
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _write_png(plt, fig, out)


def _write_png(plt, fig, out: Path) -> None:
    """The figure as a PNG at `out`, written atomically; a path that cannot be written is one line."""
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out, "wb") as handle:
            fig.savefig(handle, format="png")
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}; choose another --out") from None
    finally:
        plt.close(fig)
