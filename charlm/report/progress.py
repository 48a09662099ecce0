"""The training display: a rich progress bar on a terminal, plain lines elsewhere (CI logs)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from charlm.store.events import Event, Value

_TOTAL = 1000  # the bar counts thousandths of the budget (steps or time, whichever ends first)
# What a train event holds that the bar and the plain line show in their own places (elapsed: the bar's clock).
_TRAIN_SHOWN = {"epoch", "loss", "lr", "grad_norm", "chars_per_sec", "elapsed"}


def _fmt_rate(chars_per_sec: float) -> str:
    return f"{chars_per_sec / 1000:.1f}k" if chars_per_sec >= 1000 else f"{chars_per_sec:.0f}"


_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """A tiny chart of recent losses, one block character per value."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_SPARKS[min(int((v - low) / span * (len(_SPARKS) - 1) + 0.5), len(_SPARKS) - 1)] for v in values)


class TrainingDisplay:
    """A live bar on a terminal (with a loss sparkline, best val, and a sample at each eval);
    plain lines elsewhere; with quiet, only the evaluations. The run is handed one (training imports no report
    code): it is a charlm.store.events.Display, and renders the events it is sent."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.wants_samples = not quiet and not self.console.quiet
        self.losses: deque = deque(maxlen=30)
        self.fields: dict[str, Any] = {
            "step": "0",
            "loss": "-",
            "spark": "",
            "val": "-",
            "best": "-",
            "lr": "-",
            "rate": "-",
            "extra": "",
        }
        self._progress = Progress(
            TextColumn("step {task.fields[step]}"),
            BarColumn(bar_width=20),
            TextColumn(
                "loss {task.fields[loss]} {task.fields[spark]}  val {task.fields[val]}  "
                "best {task.fields[best]}  lr {task.fields[lr]}  {task.fields[rate]} chars/s{task.fields[extra]}"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=_TOTAL, **self.fields)

    def silenced(self) -> TrainingDisplay:
        """A display that shows nothing (the ranks of a torchrun run other than 0)."""
        return TrainingDisplay(Console(quiet=True))

    def __enter__(self) -> TrainingDisplay:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    @contextmanager
    def byte_progress(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A transient bar for work measured in bytes; yields update(done, total)."""
        with Progress(
            TextColumn(description),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self.console,
            disable=not self.live,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)

    def message(self, text: str) -> None:
        self.console.print(text)

    def update(self, fraction: float, step: int, max_steps: int | None) -> None:
        self.fields["step"] = f"{step}/{max_steps}" if max_steps else str(step)
        self._progress.update(self._task, completed=min(fraction, 1.0) * _TOTAL, **self.fields)

    def log(self, event: Event) -> None:
        """Show a train, eval or sample event; the run's other events are its record's alone."""
        shows = {"train": self._show_train, "eval": self._show_eval, "sample": self._show_sample}.get(event.name)
        if shows is not None:
            shows(event.step, event.values)

    def _show_train(self, step: int, values: Mapping[str, Value]) -> None:
        loss, lr, rate = _number(values, "loss"), _number(values, "lr"), _number(values, "chars_per_sec")
        self.losses.append(loss)
        extra = extra_figures(values)  # figures the loop added that this display has no place for
        self.fields.update(
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            rate=_fmt_rate(rate),
            spark=sparkline(list(self.losses)),
            extra=f"  {extra}" if extra else "",
        )
        if not self.live and not self.quiet:
            self.message(
                f"step {step} epoch {values['epoch']} | loss {loss:.4f} | lr {lr:.2e} | "
                f"grad norm {_number(values, 'grad_norm'):.3f} | {_fmt_rate(rate)} chars/s"
                + (f" | {extra}" if extra else "")
            )

    def _show_eval(self, step: int, values: Mapping[str, Value]) -> None:
        val_loss, val_bpc = _number(values, "val_loss"), _number(values, "val_bpc")
        self.fields["val"] = f"{val_loss:.4f} ({val_bpc:.3f} bpc)"
        if values["best_val_loss"] is not None:
            self.fields["best"] = f"{_number(values, 'best_val_loss'):.4f}"
        marker = "  [bold green]new best[/]" if values.get("new_best") else ""
        self.message(
            f"step {step} | val loss {val_loss:.4f} nats | {val_bpc:.4f} bpc | "
            f"eval {_number(values, 'eval_seconds'):.1f}s{marker}"
        )

    def _show_sample(self, step: int, values: Mapping[str, Value]) -> None:
        """A short sample from the model as it is now: see it learn."""
        if not self.wants_samples:
            return
        shown = str(values["text"]).replace("\n", "⏎ ").strip()
        self.console.print(f"  sample at step {step}: ", shown, sep="", markup=False, highlight=False)


def extra_figures(values: Mapping[str, Value]) -> str:
    """A train event's numbers beyond those the display has columns for, compactly: a group of figures
    named `group/part` shows as `group part value, part value`."""
    groups: dict[str, list[str]] = {}
    for key, value in values.items():
        if key in _TRAIN_SHOWN or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        group, _, part = key.rpartition("/")
        groups.setdefault(group, []).append(f"{part} {value:.3g}")
    return " | ".join(f"{group} {', '.join(parts)}" if group else ", ".join(parts) for group, parts in groups.items())


def _number(values: Mapping[str, Value], key: str) -> float:
    value = values[key]
    assert isinstance(value, (int, float)), f"{key} is {value!r}, not a number"
    return float(value)
