"""The training display: a rich progress bar on a terminal, plain lines elsewhere (CI logs)."""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

_TOTAL = 1000  # the bar counts thousandths of the budget (steps or time, whichever ends first)


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
    plain lines elsewhere; with quiet, only the evaluations. The run is handed one (training imports no report code)."""

    def __init__(self, console: Optional[Console] = None, quiet: bool = False):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.wants_samples = not quiet and not self.console.quiet
        self.losses: deque = deque(maxlen=30)
        self.fields = {"step": "0", "loss": "-", "spark": "", "val": "-", "best": "-", "lr": "-", "rate": "-"}
        self._progress = Progress(
            TextColumn("step {task.fields[step]}"), BarColumn(bar_width=20),
            TextColumn("loss {task.fields[loss]} {task.fields[spark]}  val {task.fields[val]}  "
                       "best {task.fields[best]}  lr {task.fields[lr]}  {task.fields[rate]} chars/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not self.live, transient=False)
        self._task = self._progress.add_task("train", total=_TOTAL, **self.fields)

    def silenced(self) -> "TrainingDisplay":
        """A display that shows nothing (the ranks of a torchrun run other than 0)."""
        return TrainingDisplay(Console(quiet=True))

    def __enter__(self) -> "TrainingDisplay":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    @contextmanager
    def byte_progress(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A transient bar for work measured in bytes; yields update(done, total)."""
        with Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=self.console, disable=not self.live, transient=True) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)

    def message(self, text: str) -> None:
        self.console.print(text)

    def update(self, fraction: float, step: int, max_steps: Optional[int]) -> None:
        self.fields["step"] = f"{step}/{max_steps}" if max_steps else str(step)
        self._progress.update(self._task, completed=min(fraction, 1.0) * _TOTAL, **self.fields)

    def on_log(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float, chars_per_sec: float) -> None:
        self.losses.append(loss)
        self.fields.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=_fmt_rate(chars_per_sec),
                           spark=sparkline(list(self.losses)))
        if not self.live and not self.quiet:
            self.message(f"step {step} epoch {epoch} | loss {loss:.4f} | lr {lr:.2e} | "
                         f"grad norm {grad_norm:.3f} | {_fmt_rate(chars_per_sec)} chars/s")

    def on_eval(self, step: int, val_loss: float, val_bpc: float, best: bool, seconds: float,
                best_loss: Optional[float] = None) -> None:
        self.fields["val"] = f"{val_loss:.4f} ({val_bpc:.3f} bpc)"
        if best_loss is not None:
            self.fields["best"] = f"{best_loss:.4f}"
        marker = "  [bold green]new best[/]" if best else ""
        self.message(f"step {step} | val loss {val_loss:.4f} nats | {val_bpc:.4f} bpc | eval {seconds:.1f}s{marker}")

    def on_sample(self, step: int, text: str) -> None:
        """A short sample from the model as it is now: see it learn."""
        shown = text.replace("\n", "⏎ ").strip()
        self.console.print(f"  sample at step {step}: ", shown, sep="", markup=False, highlight=False)
