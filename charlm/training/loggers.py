"""Where a run's events go: metrics.jsonl always, TensorBoard and MLflow too when train.loggers names
them, each on a thread of its own that training never waits for (logger_thread.py; the loggers
themselves: tracking.py)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from charlm.config import Config, TrainConfig
from charlm.errors import UserError
from charlm.store.events import Event
from charlm.store.metrics import MetricsLog
from charlm.training.logger_thread import LoggerThread, Tracker
from charlm.training.tracking import MlflowLogger, TensorBoardLogger, database, mlflow_client

INSTALL = "pip install 'charlm[track]'"


def check_loggers(train: TrainConfig) -> None:
    """Every library train.loggers needs is installed, or one line saying which extra to install."""
    in_database = database(train.mlflow_uri or "sqlite:")  # the default store is a SQLite file
    modules = {
        "tensorboard": ["tensorboard", "torch.utils.tensorboard"],
        "mlflow": ["mlflow"] + (["sqlalchemy", "alembic"] if in_database else []),
    }
    for name in train.loggers:
        for module in modules.get(name, []):
            try:
                importlib.import_module(module)
            except ImportError:
                raise UserError(f"train.loggers names {name}, which needs the track extra: {INSTALL}") from None
    if "mlflow" in train.loggers and train.mlflow_uri is not None:
        mlflow_client(train.mlflow_uri)  # an unknown scheme or a refused store: say so before training


class Loggers:
    """The run's record: metrics.jsonl and the optional loggers, each event to every one of them.

    metrics.jsonl is written at once. An evaluation and its preview sample reach the optional loggers
    only after the checkpoint written with them (`checkpoint_written`): whatever a tracker does, the
    checkpoint is on disk first."""

    HELD = ("eval", "sample")  # events followed by a checkpoint (Trainer.evaluate)

    def __init__(self, jsonl: MetricsLog, threads: list[LoggerThread]):
        self.jsonl, self.threads = jsonl, threads
        self.wants_samples = bool(threads)  # previews are logged as `sample` events only where someone shows them
        self._held: list[Event] = []

    def log(self, event: Event) -> None:
        if event.name == "sample" and not self.wants_samples:
            return  # drawn for the display alone
        self.jsonl.log(event)
        if not self.threads:
            return
        self._held.append(event)
        if event.name not in self.HELD:
            self.checkpoint_written()

    def checkpoint_written(self) -> None:
        """Hand the held events to the optional loggers, in order."""
        for event in self._held:
            for thread in self.threads:
                thread.log(event)
        self._held.clear()

    def close(self) -> None:
        """Close every logger; the optional ones get train.logger_timeout together, then are left behind."""
        try:
            self.checkpoint_written()
            for thread in self.threads:
                thread.finish()
            deadline = time.monotonic() + (self.threads[0].timeout if self.threads else 0.0)
            for thread in self.threads:
                thread.wait(deadline)
        finally:
            self.jsonl.close()


def open_loggers(cfg: Config, run_dir: Path, step: int, resumed: bool, message: Callable[[str], None]) -> Loggers:
    """The logs of a run starting (or resuming) at `step`; `message` shows where the extra ones go.
    A logger that cannot start is one warning; the run trains without it."""
    makers: dict[str, Callable[..., Tracker]] = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}
    threads = []
    for name in (name for name in cfg.train.loggers if name in makers):
        told: list[str] = []  # its messages, shown from this thread once it has started
        thread = LoggerThread(name, cfg.train.logger_timeout, message)
        if thread.open(partial(makers[name], cfg, run_dir, step, resumed, told.append)):
            threads.append(thread)
            for line in told:
                message(line)
    return Loggers(MetricsLog(run_dir), threads)
