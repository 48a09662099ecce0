"""The one shape a run's events take on their way from the training loop to every sink (metrics.jsonl,
the live display, TensorBoard, MLflow), and the Protocols those sinks and the display declare.
Imports nothing heavy: the CLI, the display and the trackers may all use it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

# What an event's values hold: numbers, text (a sample, an end reason), flags and missing values,
# and the mappings of a start event (where the weights came from).
Value = float | int | str | bool | None | list | dict


@dataclass(frozen=True)
class Event:
    """Something that happened at `step`: `name` is start, train, eval, sample, skip, rollback or end.
    metrics.jsonl writes it as {"event": name, "step": step, **values}; a sink shows the keys it knows
    how to show, so a new figure is one more entry of `values` where it is computed."""

    name: str
    step: int
    values: Mapping[str, Value] = field(default_factory=dict)

    def record(self) -> dict[str, Value]:
        """The event as one line of metrics.jsonl has it."""
        return {"event": self.name, "step": self.step, **self.values}

    def numbers(self) -> dict[str, float]:
        """The values that are numbers (flags, text and missing values left out): what a chart can plot."""
        return {
            key: float(value)
            for key, value in self.values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }


class MetricsSink(Protocol):
    """Anything a run's events go to."""

    def log(self, event: Event) -> None: ...


class RunMetrics(MetricsSink, Protocol):
    """The run's record of its events (metrics.jsonl and the optional trackers behind it)."""

    wants_samples: bool  # whether it shows `sample` events (a preview is drawn only if someone does)

    def checkpoint_written(self) -> None:
        """The checkpoint that goes with the events logged so far is on disk."""

    def close(self) -> None: ...


class Display(MetricsSink, Protocol):
    """What a training run calls on the display it is handed (charlm.report.progress.TrainingDisplay):
    its events (train, eval, sample; others it may pass over), messages, the budget's progress."""

    wants_samples: bool

    def message(self, text: str) -> None: ...

    def update(self, fraction: float, step: int, max_steps: int | None) -> None:
        """How far through its budget (0 to 1) the run is, at `step`."""

    def byte_progress(self, description: str) -> AbstractContextManager[Callable[[int, int], None]]:
        """A transient bar for work measured in bytes; yields update(done, total)."""
        ...

    def silenced(self) -> Display:
        """A display that shows nothing (the ranks of a torchrun run other than 0)."""
        ...

    def __enter__(self) -> Display: ...

    def __exit__(self, *exc: object) -> None: ...
