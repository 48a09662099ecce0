"""TensorBoard and MLflow as sinks of a run's events: every number of a train or eval event becomes a
chart, samples and the config become text. Their libraries (the `track` extra) are imported only
by a run that uses them."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from charlm.atomic import write_text_atomic
from charlm.config import Config, TrainConfig, config_yaml, redact_uri
from charlm.errors import UserError
from charlm.store.events import Event
from charlm.store.rundir import MLFLOW_ARTIFACTS, MLFLOW_DB, MLFLOW_RUN, TENSORBOARD_DIR

DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow stores that need sqlalchemy
CHARTED = ("train", "eval")  # the events whose numbers are charts
# A chart is `<event>/<key>`, but for the names the validation charts have always had.
TAGS = {("eval", "val_loss"): "val/loss", ("eval", "val_bpc"): "val/bpc"}
# Where the run was rather than what it measured: TensorBoard and MLflow keep their own step and clock.
AXES = {"epoch", "elapsed"}
MLFLOW_STATUS = {"budget": "FINISHED", "early_stop": "FINISHED", "interrupted": "KILLED"}  # no end event: FAILED


def scalars(event: Event) -> dict[str, float]:
    """The charts an event adds a point to: tag -> value."""
    if event.name not in CHARTED:
        return {}
    return {
        TAGS.get((event.name, key), f"{event.name}/{key}"): value
        for key, value in event.numbers().items()
        if key not in AXES
    }


def mlflow_uri(train: TrainConfig, run_dir: Path) -> str:
    """train.mlflow_uri, else a SQLite database in the run dir (MLflow 3 refuses plain-file stores),
    spelled as the run dir is (relative to where charlm runs, like --out)."""
    if train.mlflow_uri is not None:
        return train.mlflow_uri
    return "sqlite:///" + str(run_dir / MLFLOW_DB)


def database(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in DATABASES


def mlflow_client(uri: str):
    """An MlflowClient of the store at `uri` (SQLite: the file is created), or one line saying why not."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 - the track extra
    from mlflow.tracking import MlflowClient  # noqa: PLC0415 - the track extra

    for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return MlflowClient(tracking_uri=uri)
    except MlflowException as err:
        raise UserError(
            f"train.mlflow_uri: MLflow cannot log to {redact_uri(uri)}: {redact_text(first_line(err))}"
        ) from None


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def redact_text(text: str) -> str:
    """`text` with the userinfo of every URI in it removed (an error message quoting train.mlflow_uri)."""
    return " ".join(redact_uri(word) if "://" in word else word for word in text.split(" "))


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
        from torch.utils.tensorboard.summary import hparams  # noqa: PLC0415 - the track extra

        folder = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if resumed else None, flush_secs=10)
        values = {
            key: value if isinstance(value, (int, float)) and not isinstance(value, bool) else _text(value)
            for key, value in flat_config(cfg).items()
        }
        experiment, session, _ = hparams(values, {tag: None for tag in TAGS.values()})
        file_writer = self.writer.file_writer
        assert file_writer is not None, "SummaryWriter opens its file writer when it is made"
        file_writer.add_summary(experiment, step)
        file_writer.add_summary(session, step)
        self.writer.add_text("config", _code_block(config_yaml(cfg.to_dict())), step)
        message(f"tensorboard: {folder} (view: tensorboard --logdir {run_dir})")

    def log(self, event: Event) -> None:
        for tag, value in scalars(event).items():
            self.writer.add_scalar(tag, value, event.step)
        if event.name == "sample":
            self.writer.add_text("sample", _code_block(str(event.values["text"])), event.step)

    def close(self) -> None:
        self.writer.close()


class MlflowLogger:
    """One MLflow run per charlm run (its id kept in run_dir/mlflow-run.json, so a resumed run goes
    on in it): the config as params, metrics by step, samples and config.yaml as text artifacts."""

    def __init__(self, cfg: Config, run_dir: Path, step: int, resumed: bool, message: Callable[[str], None]):
        from mlflow.exceptions import MlflowException  # noqa: PLC0415 - the track extra

        self.uri, self.path = mlflow_uri(cfg.train, run_dir), run_dir / MLFLOW_RUN
        self.reason: str | None = None  # the end event's: none means the run failed
        self.client = mlflow_client(self.uri)
        try:
            self.run_id = self._continued(resumed, message) or self._created(cfg, run_dir)
            self._log_config(cfg, step)
        except MlflowException as err:
            raise UserError(
                f"train.mlflow_uri: MLflow cannot log to {redact_uri(self.uri)}: {redact_text(first_line(err))}"
            ) from None
        # Atomic: a torn file would stop the next --resume; no credentials in the run dir.
        write_text_atomic(self.path, json.dumps({"run_id": self.run_id, "tracking_uri": redact_uri(self.uri)}) + "\n")
        shown = redact_uri(self.uri)
        view = f"mlflow ui --backend-store-uri {shown}" if database(self.uri) else shown
        message(f"mlflow: run {self.run_id} in {shown} (view: {view})")

    def _continued(self, resumed: bool, message: Callable[[str], None]) -> str | None:
        """The MLflow run of the charlm run being resumed, running again; None if there is none here."""
        from mlflow.exceptions import MlflowException  # noqa: PLC0415 - the track extra

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
        return (Path(self.uri[len(prefix) :]).absolute().parent / MLFLOW_ARTIFACTS).as_uri()

    def _log_config(self, cfg: Config, step: int) -> None:
        """Params are the config the run started with (MLflow refuses to change one): a resume with
        other values records them in a tag."""
        from mlflow.entities import Param  # noqa: PLC0415 - the track extra

        logged = self.client.get_run(self.run_id).data.params
        params = {key: _text(value) for key, value in flat_config(cfg).items()}
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=new[start : start + 100])
        changed = [
            f"{key}: {logged[key]} -> {value}"
            for key, value in params.items()
            if key in logged and logged[key] != value
        ]
        if changed:
            self.client.set_tag(self.run_id, f"config_changed_at_step_{step}", "; ".join(changed))
        self.client.log_text(self.run_id, config_yaml(cfg.to_dict()), "config.yaml")

    def log(self, event: Event) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415 - the track extra

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, event.step) for tag, value in scalars(event).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        if event.name == "sample":
            self.client.log_text(self.run_id, str(event.values["text"]), f"samples/step_{event.step:08d}.txt")
        if event.name == "end":
            self.reason = str(event.values["reason"])

    def close(self) -> None:
        """FINISHED (budget or early stop), KILLED (a signal) or FAILED (an error: no end event)."""
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(self.reason or "", "FAILED"))
