"""Where a run's events go: metrics.jsonl always, TensorBoard and MLflow too when train.loggers names
them. Their libraries (the `track` extra) are imported only by a run that uses them."""

from __future__ import annotations

import importlib
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from charlm.config import Config, TrainConfig, config_yaml
from charlm.errors import UserError
from charlm.training.metrics import MetricsLog
from charlm.training.rundir import MLFLOW_ARTIFACTS, MLFLOW_DB, MLFLOW_RUN, TENSORBOARD_DIR

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
        raise UserError(f"train.mlflow_uri: MLflow cannot log to {uri}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Loggers:
    """metrics.jsonl and the extra loggers behind MetricsLog's write / close: one event, every log."""

    def __init__(self, jsonl: MetricsLog, extras: list):
        self.jsonl, self.extras = jsonl, extras
        self.wants_samples = bool(extras)  # previews are sent as `sample` events only where someone shows them

    def write(self, event: str, **fields) -> None:
        self.jsonl.write(event, **fields)
        for logger in self.extras:
            logger.write(event, fields)

    def close(self) -> None:
        with ExitStack() as closing:  # each one closes even if another fails
            closing.callback(self.jsonl.close)
            for logger in self.extras:
                closing.callback(logger.close)


def open_loggers(cfg: Config, run_dir: Path, step: int, resumed: bool, message: Callable[[str], None]) -> Loggers:
    """The logs of a run starting (or resuming) at `step`; `message` shows where the extra ones go."""
    names = cfg.train.loggers
    with ExitStack() as opened:
        extras = []
        if "tensorboard" in names:
            extras.append(TensorBoardLogger(cfg, run_dir, step, resumed, message))
            opened.callback(extras[-1].close)
            message(f"tensorboard: {run_dir / TENSORBOARD_DIR} (view: tensorboard --logdir {run_dir})")
        if "mlflow" in names:
            extras.append(MlflowLogger(cfg, run_dir, step, resumed, message))
        opened.pop_all()  # all open: they stay open for the run
    return Loggers(MetricsLog(run_dir), extras)


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
            raise UserError(f"train.mlflow_uri: MLflow cannot log to {self.uri}: {_first_line(err)}") from None
        self.path.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}) + "\n", encoding="utf-8")
        view = f"mlflow ui --backend-store-uri {self.uri}" if _database(self.uri) else self.uri
        message(f"mlflow: run {self.run_id} in {self.uri} (view: {view})")

    def _continued(self, resumed: bool, message: Callable[[str], None]) -> str | None:
        """The MLflow run of the charlm run being resumed, running again; None if there is none here."""
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        if not resumed or not self.path.exists():
            return None
        run_id = json.loads(self.path.read_text(encoding="utf-8"))["run_id"]
        try:
            self.client.get_run(run_id)
        except MlflowException:
            message(f"mlflow: run {run_id} of this run dir is not in {self.uri}; starting a new MLflow run")
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
