"""train.loggers: TensorBoard and MLflow get the events metrics.jsonl gets, read back with each
library's own reader, through the real CLI on tiny data; a missing library is one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="needs the track extra: pip install 'charlm[track]'")
pytest.importorskip("mlflow", reason="needs the track extra: pip install 'charlm[track]'")

from conftest import assert_user_error, call, run_cli, tiny_config, train_tiny_run
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import charlm.training.trainer as trainer_module
from charlm.config import ConfigError, config_yaml, validate_config
from charlm.store.metrics import read_metrics

BOTH = {"loggers": ["jsonl", "tensorboard", "mlflow"]}
TB_SCALARS = {
    "train": {
        "loss": "train/loss",
        "lr": "train/lr",
        "grad_norm": "train/grad_norm",
        "chars_per_sec": "train/chars_per_sec",
    },
    "eval": {"val_loss": "val/loss", "val_bpc": "val/bpc"},
}


def events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_metrics(run_dir) if e["event"] == name]


def tensorboard(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def tb_text(accumulator: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """Text summaries, with the four-space indent that makes TensorBoard's markdown keep them as they are."""

    def plain(value: bytes) -> str:
        return "\n".join(line.removeprefix("    ") for line in value.decode("utf-8").split("\n"))

    return [(e.step, plain(e.tensor_proto.string_val[0])) for e in accumulator.Tensors(f"{tag}/text_summary")]


def mlflow_run(run_dir: Path, uri: str | None = None):
    """The client of the run's MLflow store and its run (the id charlm kept in the run dir)."""
    client = MlflowClient(uri or f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "mlflow-run.json").read_text())["run_id"]
    return client, client.get_run(run_id)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tiny run logging to all three, through the real CLI (with its preview samples on screen)."""
    run_dir, text_file, config, result = train_tiny_run(tmp_path_factory.mktemp("tracked"), train=BOTH)
    return run_dir, text_file, result


@pytest.mark.slow
def test_tensorboard_gets_what_metrics_jsonl_gets(tracked):
    run_dir, _, result = tracked
    accumulator = tensorboard(run_dir)
    for event, fields in TB_SCALARS.items():
        rows = events(run_dir, event)
        assert rows, event
        for field, tag in fields.items():
            logged = [(s.step, s.value) for s in accumulator.Scalars(tag)]
            assert logged == [(e["step"], pytest.approx(e[field], rel=1e-6)) for e in rows], tag
    samples = events(run_dir, "sample")
    assert [e["step"] for e in samples] == [e["step"] for e in events(run_dir, "eval")] == [3, 6]
    assert tb_text(accumulator, "sample") == [(e["step"], e["text"]) for e in samples]
    for e in samples:  # the one preview both got: the display shows the same text
        assert f"sample at step {e['step']}: {e['text'].replace(chr(10), '⏎ ').strip()}" in result.stdout
    [(step, config)] = tb_text(accumulator, "config")
    assert step == 0 and config == (run_dir / "config.yaml").read_text(encoding="utf-8")
    assert f"tensorboard: {run_dir / 'tensorboard'} (view: tensorboard --logdir {run_dir})" in result.stdout


@pytest.mark.slow
def test_a_figure_added_in_the_loop_reaches_every_sink(tracked):
    """The per-part gradient norms are one entry of the train event in Trainer.train_step; metrics.jsonl,
    the display's lines, TensorBoard and MLflow show them with no code of their own."""
    run_dir, _, result = tracked
    rows = events(run_dir, "train")
    keys = [key for key in rows[0] if key.startswith("grad_norm/")]
    assert keys == ["grad_norm/embedding", "grad_norm/rnn.0", "grad_norm/head"]
    assert all(row[key] > 0 for row in rows for key in keys)
    accumulator = tensorboard(run_dir)
    client, run = mlflow_run(run_dir)
    for key in keys:
        assert [(s.step, s.value) for s in accumulator.Scalars(f"train/{key}")] == [
            (e["step"], pytest.approx(e[key], rel=1e-6)) for e in rows
        ], key
        assert history(client, run.info.run_id, f"train/{key}") == [(e["step"], e[key]) for e in rows], key
    for e in rows:
        parts = ", ".join(f"{key.split('/')[1]} {e[key]:.3g}" for key in keys)
        assert f"step {e['step']} epoch {e['epoch']} | loss {e['loss']:.4f} | " in result.stdout
        assert f"chars/s | grad_norm {parts}\n" in result.stdout


def test_every_number_of_a_train_or_eval_event_is_a_chart():
    """`<event>/<key>`, but for the validation charts' old names; flags, text and the axes (epoch, elapsed) are not."""
    from charlm.store.events import Event
    from charlm.training.tracking import scalars

    train = Event(
        "train",
        4,
        {
            "epoch": 0,
            "loss": 2.5,
            "lr": 0.01,
            "grad_norm": 1.0,
            "chars_per_sec": 900.0,
            "elapsed": 3.0,
            "grad_norm/rnn.0": 0.5,
        },
    )
    assert scalars(train) == {
        "train/loss": 2.5,
        "train/lr": 0.01,
        "train/grad_norm": 1.0,
        "train/chars_per_sec": 900.0,
        "train/grad_norm/rnn.0": 0.5,
    }
    evaluation = Event(
        "eval",
        4,
        {
            "epoch": 0,
            "val_loss": 2.0,
            "val_bpc": 2.9,
            "best_val_loss": None,
            "elapsed": 3.0,
            "eval_seconds": 0.1,
            "new_best": True,
        },
    )
    assert scalars(evaluation) == {"val/loss": 2.0, "val/bpc": 2.9, "eval/eval_seconds": 0.1}
    assert scalars(Event("skip", 5, {"loss": float("nan"), "grad_norm": 1.0, "streak": 1})) == {}


@pytest.mark.slow
def test_tensorboard_hparams_hold_the_resolved_config(tracked):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run_dir, _, _ = tracked
    content = tensorboard(run_dir).PluginTagToContent("hparams")
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    session = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss", "val/bpc"]
    assert session.hparams["train.lr"].number_value == 0.01
    assert session.hparams["model.type"].string_value == "lstm"
    assert session.hparams["train.betas"].string_value == "[0.9, 0.99]"
    assert session.hparams["train.loggers"].string_value == '["jsonl", "tensorboard", "mlflow"]'


@pytest.mark.slow
def test_mlflow_gets_what_metrics_jsonl_gets(tracked):
    run_dir, text_file, result = tracked
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == run_dir.name
    assert run.data.tags["charlm.run_dir"] == str(run_dir)
    for event, fields in TB_SCALARS.items():
        for field, key in fields.items():
            assert history(client, run.info.run_id, key) == [(e["step"], e[field]) for e in events(run_dir, event)]
    params = run.data.params
    assert params["train.lr"] == "0.01" and params["model.hidden_size"] == "16" and params["train.grad_clip"] == "1.0"
    assert params["data.path"] == str(text_file) and params["train.max_time"] == "null"
    assert params["train.betas"] == "[0.9, 0.99]"
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert samples == {"samples/step_00000003.txt", "samples/step_00000006.txt"}
    for e in events(run_dir, "sample"):
        path = client.download_artifacts(run.info.run_id, f"samples/step_{e['step']:08d}.txt", str(run_dir.parent))
        assert Path(path).read_text(encoding="utf-8") == e["text"]
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(run_dir.parent))
    assert Path(config).read_text(encoding="utf-8") == (run_dir / "config.yaml").read_text(encoding="utf-8")
    assert (run_dir / "mlartifacts").is_dir()  # artifacts stay in the run dir, not in ./mlruns of the cwd
    assert f"mlflow: run {run.info.run_id} in sqlite:///{run_dir / 'mlflow.db'}" in result.stdout


@pytest.mark.slow
def test_readers_of_metrics_jsonl_pass_over_sample_events(tracked):
    run_dir, _, _ = tracked
    listing = run_cli("runs", str(run_dir.parent))
    assert listing.returncode == 0, listing.stderr
    assert "finished" in listing.stdout and "lstm 1x16" in listing.stdout


@pytest.mark.slow
def test_samples_for_the_loggers_leave_training_as_it_was(tracked, tmp_path):
    """--quiet with jsonl alone draws no preview; the tracked run drew one per evaluation: same numbers."""
    run_dir, _, _ = tracked
    plain = tmp_path / "plain"
    result = run_cli(
        "train",
        "--config",
        str(run_dir.parent / "tiny.yaml"),
        "--out",
        str(plain),
        "--quiet",
        "--set",
        "train.loggers=[jsonl]",
    )
    assert result.returncode == 0, result.stderr
    assert not events(plain, "sample") and not (plain / "tensorboard").exists() and not (plain / "mlflow.db").exists()
    for event, fields in (("train", ("loss", "lr", "grad_norm")), ("eval", ("val_loss", "val_bpc"))):
        assert [[e[f] for f in fields] for e in events(plain, event)] == [
            [e[f] for f in fields] for e in events(run_dir, event)
        ]


@pytest.mark.slow
def test_resume_continues_the_same_tensorboard_folder_and_mlflow_run(tmp_path):
    run_dir, _, _, _ = train_tiny_run(tmp_path, train=BOTH)
    _, first = mlflow_run(run_dir)
    at_step_6 = (run_dir / "last.pt").read_bytes()
    resumed = run_cli("train", "--resume", "--out", str(run_dir), "--set", "train.max_steps=10")
    assert resumed.returncode == 0, resumed.stderr
    client, run = mlflow_run(run_dir)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [step for step, _ in history(client, run.info.run_id, "train/loss")] == [2, 4, 6, 8, 10]
    assert [step for step, _ in history(client, run.info.run_id, "val/loss")] == [3, 6, 9, 10]
    assert run.data.params["train.max_steps"] == "6"  # what it started with; the change is a tag
    assert run.data.tags["config_changed_at_step_6"] == "train.max_steps: 6 -> 10"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    accumulator = tensorboard(run_dir)
    assert [s.step for s in accumulator.Scalars("train/loss")] == [2, 4, 6, 8, 10]
    assert [s.step for s in accumulator.Tensors("config/text_summary")] == [0, 6]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process

    # As after a crash at step 10 whose last checkpoint was at step 6: steps 7-10 are trained and logged again.
    (run_dir / "last.pt").write_bytes(at_step_6)
    again = run_cli("train", "--resume", "--out", str(run_dir))
    assert again.returncode == 0, again.stderr
    latest = {e["step"]: e["loss"] for e in events(run_dir, "train")}  # the last line of each step wins
    assert [(s.step, s.value) for s in tensorboard(run_dir).Scalars("train/loss")] == [
        (step, pytest.approx(latest[step], rel=1e-6)) for step in (2, 4, 6, 8, 10)
    ]
    assert mlflow_run(run_dir)[1].info.status == "FINISHED"


@pytest.mark.slow
def test_overwrite_moves_the_replaced_runs_tracking_files_aside_with_its_other_files(tmp_path):
    run_dir, _, config, _ = train_tiny_run(tmp_path, train=BOTH)
    # (no client opened on the store before it moves: SQLAlchemy would keep the moved file open)
    first_id = json.loads((run_dir / "mlflow-run.json").read_text())["run_id"]
    again = run_cli(
        "train", "--config", str(config), "--out", str(run_dir), "--overwrite", "--set", "train.max_steps=4"
    )
    assert again.returncode == 0, again.stderr
    [aside] = run_dir.glob("replaced-*")
    _, second = mlflow_run(run_dir)
    _, old = mlflow_run(aside)  # the replaced run's store moved with it, its run as it was
    assert old.info.run_id == first_id and old.info.status == "FINISHED"
    assert second.info.run_id != first_id and second.info.status == "FINISHED"
    assert [s.step for s in tensorboard(run_dir).Scalars("train/loss")] == [2, 4]
    assert [s.step for s in EventAccumulator(str(aside / "tensorboard")).Reload().Scalars("train/loss")] == [2, 4, 6]


@pytest.mark.slow
def test_ctrl_c_ends_the_mlflow_run_as_killed(tmp_path, text_file, write_config):
    config = write_config(
        tiny_config(
            text_file,
            train={
                "max_steps": None,
                "max_time": "5m",
                "log_interval": 1,
                "eval_interval": 100_000,
                "loggers": ["mlflow"],
            },
        )
    )
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "charlm", "train", "--config", str(config), "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics.exists() and '"train"' in metrics.read_text()) and proc.poll() is None:
            assert time.time() < deadline, "no train event within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    client, run = mlflow_run(run_dir)
    assert run.info.status == "KILLED"
    assert history(client, run.info.run_id, "train/loss")  # what it logged before the signal is there
    assert not (run_dir / "tensorboard").exists()  # loggers: [mlflow] alone; metrics.jsonl is always written


@pytest.mark.slow
def test_an_error_ends_the_mlflow_run_as_failed_in_a_shared_store(tmp_path, text_file, monkeypatch, capsys):
    """A store of the user's own (train.mlflow_uri) with a named experiment; charlm run from elsewhere."""
    monkeypatch.setattr(
        trainer_module.Trainer, "loss", staticmethod(lambda logits, targets: logits.sum() * float("nan"))
    )
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'shared.db'}"
    config = tmp_path / "c.yaml"
    config.write_text(
        config_yaml(
            tiny_config(
                text_file,
                train={
                    "max_steps": 50,
                    "max_bad_steps": 1,
                    "max_rollbacks": 0,
                    "loggers": ["mlflow"],
                    "mlflow_uri": uri,
                    "mlflow_experiment": "charlm tests",
                },
            )
        ),
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run")), "training diverged"
    )
    client, run = mlflow_run(tmp_path / "run", uri)
    assert run.info.status == "FAILED"
    assert client.get_experiment(run.info.experiment_id).name == "charlm tests"
    assert (store / "mlartifacts").is_dir()  # beside the database
    assert not list(elsewhere.iterdir())  # nothing in the working directory (MLflow's default is ./mlruns)


@pytest.mark.slow
@pytest.mark.parametrize(
    "logger, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("mlflow", "sqlalchemy")]
)
def test_a_missing_library_is_one_line_before_anything_is_written(tmp_path, text_file, write_config, logger, module):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    config = write_config(tiny_config(text_file, train={"loggers": ["jsonl", logger]}))
    result = subprocess.run(
        [sys.executable, "-m", "charlm", "train", "--config", str(config), "--out", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"charlm: error: train.loggers names {logger}, which needs the track extra: pip install 'charlm[track]'"
    )
    assert not (tmp_path / "run").exists()


def test_a_store_mlflow_refuses_is_one_line_before_anything_is_written(tmp_path, text_file, write_config, capsys):
    config = write_config(tiny_config(text_file, train={"loggers": ["mlflow"], "mlflow_uri": "nosuchscheme://x"}))
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "run")),
        "train.mlflow_uri: MLflow cannot log to nosuchscheme://x: ",
    )
    assert not (tmp_path / "run").exists()


def test_loggers_config(text_file):
    def loggers(value):
        return validate_config(tiny_config(text_file, train={"loggers": value})).train.loggers

    assert validate_config(tiny_config(text_file)).train.loggers == ["jsonl"]
    assert loggers("tensorboard") == ["tensorboard"]  # --set train.loggers=tensorboard
    assert loggers(["mlflow", "jsonl", "mlflow"]) == ["mlflow", "jsonl"]
    assert loggers([]) == []  # metrics.jsonl is written all the same
    with pytest.raises(ConfigError) as error:
        loggers(["jsonl", "wandb"])
    assert str(error.value) == "config: train.loggers: each name must be jsonl, tensorboard or mlflow (got 'wandb')"
    with pytest.raises(ConfigError, match=r"^config: train.mlflow_uri: "):
        validate_config(tiny_config(text_file, train={"mlflow_uri": ""}))


def test_an_unknown_logger_through_the_cli(tmp_path, text_file, write_config, capsys):
    config = write_config(tiny_config(text_file))
    assert_user_error(
        call(
            capsys,
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.loggers=[jsonl,tensorbord]",
        ),
        "train.loggers: each name must be jsonl, tensorboard or mlflow (got 'tensorbord')",
    )
