"""Where a run's events go: metrics.jsonl always, TensorBoard and MLflow too when train.loggers names
them, each on a thread of its own that training never waits for (a tracker can fail, training
cannot). Their libraries (the `track` extra) are imported only by a run that uses them."""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from charlm.atomic import write_text_atomic
from charlm.config import Config, TrainConfig, config_yaml, redact_uri
from charlm.errors import UserError
from charlm.store.metrics import MetricsLog
from charlm.store.rundir import MLFLOW_ARTIFACTS, MLFLOW_DB, MLFLOW_RUN, TENSORBOARD_DIR

INSTALL = "pip install 'charlm[track]'"
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow stores that need sqlalchemy
# metrics.jsonl field -> the name TensorBoard and MLflow show, per event
SCALARS = {"train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                     "chars_per_sec": "train/chars_per_sec"},
           "eval": {"val_loss": "val/loss", "val_bpc": "val/bpc"}}
MLFLOW_STATUS = {"budget": "FINISHED", "early_stop": "FINISHED", "interrupted": "KILLED"}  # no end event: FAILED


def check_loggers(train: TrainConfig) -> None:
    """Every library train.loggers needs is installed, or one line saying which extra to install."""
    database = _database(train.mlflow_uri or "sqlite:")  # the default store is a SQLite file
    modules = {"tensorboard": ["tensorboard", "torch.utils.tensorboard"],
               "mlflow": ["mlflow"] + (["sqlalchemy", "alembic"] if database else [])}
    for name in train.loggers:
        for module in modules.get(name, []):
            try:
                importlib.import_module(module)
            except ImportError:
                raise UserError(f"train.loggers names {name}, which needs the track extra: {INSTALL}") from None
    if "mlflow" in train.loggers and train.mlflow_uri is not None:
        _mlflow_client(train.mlflow_uri)  # an unknown scheme or a refused store: say so before training


def mlflow_uri(train: TrainConfig, run_dir: Path) -> str:
    """train.mlflow_uri, else a SQLite database in the run dir (MLflow 3 refuses plain-file stores),
    spelled as the run dir is (relative to where charlm runs, like --out)."""
    if train.mlflow_uri is not None:
        return train.mlflow_uri
    return "sqlite:///" + str(run_dir / MLFLOW_DB)


def _database(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in DATABASES


def _mlflow_client(uri: str):
    """An MlflowClient of the store at `uri` (SQLite: the file is created), or one line saying why not."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 - the track extra
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return MlflowClient(tracking_uri=uri)
    except MlflowException as err:
        raise UserError(f"train.mlflow_uri: MLflow cannot log to {redact_uri(uri)}: "
                        f"{redact_text(_first_line(err))}") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Sink:
    """One optional logger (TensorBoard or MLflow) behind a thread of its own: training hands it calls
    and never waits for them. A call that raises, or runs longer than train.logger_timeout, turns the
    logger off for the rest of the run with one warning line; metrics.jsonl still has every event.

    No retry at the next evaluation: by the time MLflow raises it has retried for minutes already, a
    hung call still holds the thread, and a logger that came back would show a history with holes
    that look like data. The thread is a daemon: a call that never returns cannot keep the process."""

    def __init__(self, name: str, timeout: float, warn: Callable[[str], None]):
        self.name, self.timeout, self.warn = name, timeout, warn
        self.logger = None
        self.failure: Optional[str] = None  # why it was turned off; set by its thread or by a timeout
        self._warned = False
        self._queue: list[tuple[str, Callable[[], None], bool]] = []
        self._started: Optional[float] = None  # time.monotonic() when the call in progress began
        self._changed = threading.Condition()
        threading.Thread(target=self._work, name=f"charlm-{name}", daemon=True).start()

    def open(self, factory: Callable[[], object]) -> bool:
        """Make the logger on its thread, waiting at most the timeout; False (and a warning) if it failed."""
        self.call("starting", lambda: setattr(self, "logger", factory()))
        self.wait(time.monotonic() + self.timeout)
        return self.failure is None

    def send(self, event: str, fields: dict) -> None:
        self.call(f"its {event} event at step {fields.get('step')}", lambda: self.logger.write(event, fields))

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
            self.warn(f"warning: {self.name} logging is off for the rest of this run: {self.failure}; "
                      "metrics.jsonl has every event")

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
                self.failure = self.failure or f"{what} failed ({type(err).__name__}: {redact_text(_first_line(err))})"
            finally:
                with self._changed:
                    self._started = None
                    self._changed.notify_all()


def redact_text(text: str) -> str:
    """`text` with the userinfo of every URI in it removed (an error message quoting train.mlflow_uri)."""
    return " ".join(redact_uri(word) if "://" in word else word for word in text.split(" "))


class Loggers:
    """metrics.jsonl and the optional loggers behind MetricsLog's write / close: one event, every log.

    metrics.jsonl is written at once. An evaluation and its preview sample reach the optional loggers
    only after the checkpoint written with them (`checkpoint_written`): whatever a tracker does, the
    checkpoint is on disk first."""

    HELD = ("eval", "sample")  # events followed by a checkpoint (charlm.training.validation)

    def __init__(self, jsonl: MetricsLog, sinks: list[Sink]):
        self.jsonl, self.sinks = jsonl, sinks
        self.wants_samples = bool(sinks)  # previews are sent as `sample` events only where someone shows them
        self._held: list[tuple[str, dict]] = []

    def write(self, event: str, **fields) -> None:
        self.jsonl.write(event, **fields)
        if not self.sinks:
            return
        self._held.append((event, fields))
        if event not in self.HELD:
            self.checkpoint_written()

    def checkpoint_written(self) -> None:
        """Hand the held events to the optional loggers, in order."""
        for event, fields in self._held:
            for sink in self.sinks:
                sink.send(event, fields)
        self._held.clear()

    def close(self) -> None:
        """Close every logger; the optional ones get train.logger_timeout together, then are left behind."""
        try:
            self.checkpoint_written()
            for sink in self.sinks:
                sink.finish()
            deadline = time.monotonic() + (self.sinks[0].timeout if self.sinks else 0.0)
            for sink in self.sinks:
                sink.wait(deadline)
        finally:
            self.jsonl.close()


def open_loggers(cfg: Config, run_dir: Path, step: int, resumed: bool, message: Callable[[str], None]) -> Loggers:
    """The logs of a run starting (or resuming) at `step`; `message` shows where the extra ones go.
    A logger that cannot start is one warning; the run trains without it."""
    makers = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}
    sinks = []
    for name in (name for name in cfg.train.loggers if name in makers):
        told: list[str] = []  # its messages, shown from this thread once it has started
        sink = Sink(name, cfg.train.logger_timeout, message)
        if sink.open(lambda maker=makers[name]: maker(cfg, run_dir, step, resumed, told.append)):
            sinks.append(sink)
            for line in told:
                message(line)
    return Loggers(MetricsLog(run_dir), sinks)


def flat_config(cfg: Config) -> dict:
    """The resolved config as {"train.lr": 0.002, ...}."""
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def _text(value) -> str:
    """A config value as config.yaml spells it in flow style: 0.002, true, null, [0.9, 0.99]."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _code_block(text: str) -> str:
    """Text that TensorBoard's markdown shows as it is (line breaks and spaces kept)."""
    return "\n".join("    " + line for line in text.split("\n"))


class TensorBoardLogger:
    """Scalars, the config (as hparams and as text) and samples into run_dir/tensorboard.

    A resumed run appends to the same folder, telling TensorBoard to drop what the previous
    process logged after its last checkpoint (steps this run logs again). (--overwrite moves a
    replaced run's folder aside with its other files: rundir.RUN_FILES.)"""

    def __init__(self, cfg: Config, run_dir: Path, step: int, resumed: bool, message: Callable[[str], None]):
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - the track extra
        from torch.utils.tensorboard.summary import hparams  # noqa: PLC0415

        folder = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if resumed else None, flush_secs=10)
        values = {key: value if isinstance(value, (int, float)) and not isinstance(value, bool) else _text(value)
                  for key, value in flat_config(cfg).items()}
        experiment, session, _ = hparams(values, {tag: None for tag in SCALARS["eval"].values()})
        self.writer.file_writer.add_summary(experiment, step)
        self.writer.file_writer.add_summary(session, step)
        self.writer.add_text("config", _code_block(config_yaml(cfg.to_dict())), step)
        message(f"tensorboard: {folder} (view: tensorboard --logdir {run_dir})")

    def write(self, event: str, fields: dict) -> None:
        for key, tag in SCALARS.get(event, {}).items():
            if fields.get(key) is not None:
                self.writer.add_scalar(tag, fields[key], fields["step"])
        if event == "sample":
            self.writer.add_text("sample", _code_block(fields["text"]), fields["step"])

    def close(self) -> None:
        self.writer.close()


class MlflowLogger:
    """One MLflow run per charlm run (its id kept in run_dir/mlflow-run.json, so a resumed run goes
    on in it): the config as params, metrics by step, samples and config.yaml as text artifacts."""

    def __init__(self, cfg: Config, run_dir: Path, step: int, resumed: bool, message: Callable[[str], None]):
        from mlflow.exceptions import MlflowException  # noqa: PLC0415 - the track extra

        self.uri, self.path, self.reason = mlflow_uri(cfg.train, run_dir), run_dir / MLFLOW_RUN, None
        self.client = _mlflow_client(self.uri)
        try:
            self.run_id = self._continued(resumed, message) or self._created(cfg, run_dir)
            self._log_config(cfg, step)
        except MlflowException as err:
            raise UserError(f"train.mlflow_uri: MLflow cannot log to {redact_uri(self.uri)}: "
                            f"{redact_text(_first_line(err))}") from None
        # Atomic: a torn file would stop the next --resume; no credentials in the run dir.
        write_text_atomic(self.path, json.dumps({"run_id": self.run_id, "tracking_uri": redact_uri(self.uri)}) + "\n")
        shown = redact_uri(self.uri)
        view = f"mlflow ui --backend-store-uri {shown}" if _database(self.uri) else shown
        message(f"mlflow: run {self.run_id} in {shown} (view: {view})")

    def _continued(self, resumed: bool, message: Callable[[str], None]) -> str | None:
        """The MLflow run of the charlm run being resumed, running again; None if there is none here."""
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        if not resumed or not self.path.exists():
            return None
        try:
            run_id = str(json.loads(self.path.read_text(encoding="utf-8"))["run_id"])
        except (OSError, ValueError, TypeError, KeyError):
            message(f"mlflow: {self.path} is unreadable; starting a new MLflow run")
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException:
            message(f"mlflow: run {run_id} of this run dir is not in {redact_uri(self.uri)}; starting a new MLflow run")
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _created(self, cfg: Config, run_dir: Path) -> str:
        name = cfg.train.mlflow_experiment or run_dir.absolute().name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(name, artifact_location=self._artifact_location())
        tags = {"charlm.run_dir": str(run_dir.absolute())}
        return self.client.create_run(experiment_id, run_name=run_dir.absolute().name, tags=tags).info.run_id

    def _artifact_location(self) -> str | None:
        """Beside a local SQLite file (MLflow would use ./mlruns of wherever charlm runs); a
        server's own default otherwise."""
        prefix = "sqlite:///"
        if not self.uri.startswith(prefix) or self.uri == prefix + ":memory:":
            return None
        return (Path(self.uri[len(prefix):]).absolute().parent / MLFLOW_ARTIFACTS).as_uri()

    def _log_config(self, cfg: Config, step: int) -> None:
        """Params are the config the run started with (MLflow refuses to change one): a resume with
        other values records them in a tag."""
        from mlflow.entities import Param  # noqa: PLC0415

        logged = self.client.get_run(self.run_id).data.params
        params = {key: _text(value) for key, value in flat_config(cfg).items()}
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=new[start:start + 100])
        changed = [f"{key}: {logged[key]} -> {value}" for key, value in params.items()
                   if key in logged and logged[key] != value]
        if changed:
            self.client.set_tag(self.run_id, f"config_changed_at_step_{step}", "; ".join(changed))
        self.client.log_text(self.run_id, config_yaml(cfg.to_dict()), "config.yaml")

    def write(self, event: str, fields: dict) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(fields[key]), now, fields["step"])
                   for key, tag in SCALARS.get(event, {}).items() if fields.get(key) is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        if event == "sample":
            self.client.log_text(self.run_id, fields["text"], f"samples/step_{fields['step']:08d}.txt")
        if event == "end":
            self.reason = fields["reason"]

    def close(self) -> None:
        """FINISHED (budget or early stop), KILLED (a signal) or FAILED (an error: no end event)."""
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(self.reason, "FAILED"))
