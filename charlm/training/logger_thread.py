"""An optional logger (TensorBoard or MLflow) on a thread of its own: training hands it events and never
waits for them (a tracker can fail, training cannot)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from charlm.store.events import Event, MetricsSink
from charlm.training.tracking import first_line, redact_text


class Tracker(MetricsSink, Protocol):
    """A sink with something to close at the end (its files, its run's status)."""

    def close(self) -> None: ...


class LoggerThread:
    """One optional logger (TensorBoard or MLflow) behind a thread of its own: training hands it calls
    and never waits for them. A call that raises, or runs longer than train.logger_timeout, turns the
    logger off for the rest of the run with one warning line; metrics.jsonl still has every event.

    No retry at the next evaluation: by the time MLflow raises it has retried for minutes already, a
    hung call still holds the thread, and a logger that came back would show a history with holes
    that look like data. The thread is a daemon: a call that never returns cannot keep the process."""

    def __init__(self, name: str, timeout: float, warn: Callable[[str], None]):
        self.name, self.timeout, self.warn = name, timeout, warn
        self.logger: Tracker | None = None
        self.failure: str | None = None  # why it was turned off; set by its thread or by a timeout
        self._warned = False
        self._queue: list[tuple[str, Callable[[], None], bool]] = []
        self._started: float | None = None  # time.monotonic() when the call in progress began
        self._changed = threading.Condition()
        threading.Thread(target=self._work, name=f"charlm-{name}", daemon=True).start()

    def open(self, factory: Callable[[], Tracker]) -> bool:
        """Make the logger on its thread, waiting at most the timeout; False (and a warning) if it failed."""

        def start() -> None:
            self.logger = factory()

        self.call("starting", start)
        self.wait(time.monotonic() + self.timeout)
        return self.failure is None

    def log(self, event: Event) -> None:
        logger = self.logger
        assert logger is not None, f"{self.name}: an event before the logger started"
        self.call(f"its {event.name} event at step {event.step}", lambda: logger.log(event))

    def finish(self) -> None:
        """Queue the logger's close; a logger that raised earlier is closed too (its files, its run's status)."""
        if self.logger is not None:
            self.call("closing", self.logger.close, even_if_off=True)

    def call(self, what: str, function: Callable[[], None], even_if_off: bool = False) -> None:
        """Queue `function` (`what` names it in the warning); dropped once the logger is off."""
        self._notice_hung()
        if self.failure is None or (even_if_off and self._started is None):
            with self._changed:
                self._queue.append((what, function, even_if_off))
                self._changed.notify_all()
        self.report()

    def wait(self, deadline: float) -> None:
        """Until every queued call has run or time.monotonic() reaches `deadline`."""
        with self._changed:
            while (self._queue or self._started is not None) and time.monotonic() < deadline:
                self._changed.wait(max(0.0, min(deadline - time.monotonic(), 0.5)))
        self._notice_hung(at_end=bool(self._queue) or self._started is not None)
        self.report()

    def report(self) -> None:
        """The one warning, printed by the training thread (the display is not shared with this one)."""
        if self.failure is not None and not self._warned:
            self._warned = True
            self.warn(
                f"warning: {self.name} logging is off for the rest of this run: {self.failure}; "
                "metrics.jsonl has every event"
            )

    def _notice_hung(self, at_end: bool = False) -> None:
        started = self._started
        if self.failure is None and (at_end or (started is not None and time.monotonic() - started > self.timeout)):
            self.failure = f"a call took longer than {self.timeout:g} s (train.logger_timeout)"

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                what, function, even_if_off = self._queue.pop(0)
                if self.failure is not None and not even_if_off:
                    self._changed.notify_all()
                    continue
                self._started = time.monotonic()
            try:
                function()
            except BaseException as err:  # whatever a tracking library raises: that logger is off, training goes on
                self.failure = self.failure or f"{what} failed ({type(err).__name__}: {redact_text(first_line(err))})"
            finally:
                with self._changed:
                    self._started = None
                    self._changed.notify_all()
