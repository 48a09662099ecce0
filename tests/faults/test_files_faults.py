"""Files as an attacker or an accident makes them (issue 25): crafted model files end in one line and exit 2
before any allocation, export never destroys its source, and nothing exported carries a credential."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, call, train_tiny_run

from charlm.config import redact_uri

safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs the export extra")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run and its safetensors export, made once through the real CLI."""
    run_dir, text_file, _, _ = train_tiny_run(tmp_path_factory.mktemp("files"))
    exported = run_dir.parent / "tiny.safetensors"
    assert call_quiet("export", "--checkpoint", str(run_dir), "--out", str(exported)) == 0
    return run_dir, text_file, exported


def call_quiet(*argv: str) -> int:
    from charlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code


def crafted_safetensors(exported: Path, out: Path, **changes) -> Path:
    """`exported` with metadata keys replaced (a value None drops the key)."""
    with safetensors_torch.safe_open(str(exported), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value if isinstance(value, str) else json.dumps(value)
    safetensors_torch.save_file(tensors, str(out), metadata=metadata)
    return out


def with_model(exported: Path, **model) -> dict:
    with safetensors_torch.safe_open(str(exported), framework="pt") as handle:
        config = json.loads(handle.metadata()["charlm.config"])
    config["model"].update(model)
    return config


def every_command(capsys, model_file: Path, text_file: Path, out_dir: Path) -> list:
    return [
        call(capsys, "info", "--checkpoint", str(model_file)),
        call(capsys, "sample", "--checkpoint", str(model_file), "--length", "5"),
        call(capsys, "eval", "--checkpoint", str(model_file), "--text", str(text_file)),
        call(capsys, "export", "--checkpoint", str(model_file), "--out", str(out_dir / "again.safetensors")),
    ]


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("http://user:pass@mlflow.example:5000/api", "http://mlflow.example:5000/api"),
        ("https://:s3cret@mlflow.example/", "https://mlflow.example/"),
        ("https://p@ss:w@rd@host/x", "https://host/x"),
        ("https://token@host", "https://host"),
        ("user:pw@host:5000", "host:5000"),
        ("http://host/?token=abc&experiment=1", "http://host/?token=REDACTED&experiment=1"),
        ("sqlite:////abs/run/mlflow.db", "sqlite:////abs/run/mlflow.db"),
        (
            "postgresql+psycopg2://me:pw@db:5432/mlflow?sslmode=require",
            "postgresql+psycopg2://db:5432/mlflow?sslmode=require",
        ),
        ("mlruns", "mlruns"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
        ("/home/a@b/mlruns", "/home/a@b/mlruns"),
    ],
)
def test_redact_uri_strips_userinfo_and_secret_query_values(uri, expected):
    assert redact_uri(uri) == expected


CONTENDER = """
import os, sys, time
from pathlib import Path
from charlm.store.rundir import RunLock, RunDirError
run_dir, meeting, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def wait_for(prefix, number):  # bounded: a slow machine waits, a broken test ends
    deadline = time.time() + 60
    while len(list(meeting.glob(prefix + "-*"))) < number and time.time() < deadline:
        time.sleep(0.005)

(meeting / f"ready-{os.getpid()}").touch()
wait_for("ready", count)  # all loaded: they try at the same moment
try:
    with RunLock(run_dir):
        print("won", flush=True)
        wait_for("refused", count - 1)  # held until every other one has tried
except RunDirError as err:
    print("refused", err, flush=True)
    (meeting / f"refused-{os.getpid()}").touch()
"""


def dead_pid() -> int:
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True, timeout=60
    )
    return int(process.stdout)


@pytest.mark.parametrize("attempt", range(3))
def test_two_starters_on_a_stale_lock_exactly_one_wins(tmp_path, attempt):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(str(dead_pid()))
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(run_dir), str(meeting), "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [process.communicate(timeout=120) for process in processes]
    outcomes = [out.split()[0] for out, _ in results if out]
    assert len(outcomes) == 4, results
    assert outcomes.count("won") == 1, results
    assert all("in use by another charlm train" in out for out, _ in results if out.startswith("refused")), results


CRAFTED_METADATA = {
    "version_not_ascii": ({"charlm__format_version": "\u00b2"}, "export format"),
    "training_a_list": ({"charlm__training": [1, 2]}, "training"),
    "training_step_a_string": ({"charlm__training": {"step": "many", "best_val_loss": "low"}}, "training"),
    "config_a_list": ({"charlm__config": [1, 2]}, "config"),
    "config_missing": ({"charlm__config": None}, "config"),
    "vocab_missing": ({"charlm__vocab": None}, "vocabulary"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CRAFTED_METADATA))
def test_malformed_export_metadata_is_one_line_for_info(run, tmp_path, capsys, name):
    changes, fragment = CRAFTED_METADATA[name]
    crafted = crafted_safetensors(run[2], tmp_path / f"{name}.safetensors", **changes)
    assert_user_error(call(capsys, "info", "--checkpoint", str(crafted)), fragment)


ABSURD = {
    "hidden_1e6": {"hidden_size": 10**6},
    "hidden_1e7": {"hidden_size": 10**7},
    "layers_1e4": {"num_layers": 10**4},
    "embedding_1e9": {"embedding_dim": 10**9},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ABSURD))
def test_absurd_sizes_in_an_export_are_one_line_for_every_command_before_any_allocation(run, tmp_path, capsys, name):
    _, text_file, exported = run
    crafted = crafted_safetensors(
        exported, tmp_path / "absurd.safetensors", charlm__config=with_model(exported, **ABSURD[name])
    )
    for result in every_command(capsys, crafted, text_file, tmp_path):
        assert_user_error(result, "model")
    assert not (tmp_path / "again.safetensors").exists()


@pytest.mark.slow
def test_a_vocabulary_too_large_for_its_width_is_refused_before_any_allocation(run, tmp_path, capsys):
    """Each is allowed alone; together (600,000 characters x a 16,384 wide head) they are ~1e10 parameters."""
    exported = run[2]
    vocab = {"unit": "chars", "specials": [], "chars": [chr(0x10000 + i) for i in range(600_000)]}
    crafted = crafted_safetensors(
        exported,
        tmp_path / "wide.safetensors",
        charlm__vocab=vocab,
        charlm__config=with_model(exported, hidden_size=2**14),
    )
    assert_user_error(call(capsys, "info", "--checkpoint", str(crafted)), "parameters")


def crafted_checkpoint(run_dir: Path, out: Path, edit) -> Path:
    payload = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, out)
    return out


CRAFTED_CHECKPOINTS = {
    "hidden_1e6": lambda p: p["config"]["model"].update(hidden_size=10**6),
    "layers_1e4": lambda p: p["config"]["model"].update(num_layers=10**4),
    "config_a_list": lambda p: p.update(config=[1, 2]),
    "vocab_a_number": lambda p: p.update(vocab=7),
    "best_val_loss_a_string": lambda p: p.update(best_val_loss="low"),
    "step_a_list": lambda p: p.update(step=[1]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CRAFTED_CHECKPOINTS))
def test_a_crafted_checkpoint_is_one_line_for_every_command(run, tmp_path, capsys, name):
    run_dir, text_file, _ = run
    crafted = crafted_checkpoint(run_dir, tmp_path / f"{name}.pt", CRAFTED_CHECKPOINTS[name])
    for result in every_command(capsys, crafted, text_file, tmp_path):
        assert_user_error(result, "checkpoint")


def test_the_config_schema_bounds_sizes():
    from charlm.config import ConfigError, validate_config

    base = {"data": {"path": "x.txt"}, "train": {"max_steps": 1}}
    for model in (
        {"hidden_size": 10**6},
        {"num_layers": 10**4},
        {"embedding_dim": 10**9},
        {"hidden_size": 2**16, "num_layers": 64},
    ):
        with pytest.raises(ConfigError, match="model"):
            validate_config({**base, "model": model})
    validate_config({**base, "model": {"hidden_size": 4096, "num_layers": 4}})  # big, but a machine holds it


# --- export never destroys its source -------------------------------------------------------


@pytest.mark.slow
def test_export_refuses_to_overwrite_its_own_source(run, capsys):
    run_dir = run[0]
    before = (run_dir / "best.pt").read_bytes()
    assert_user_error(
        call(
            capsys, "export", "--checkpoint", str(run_dir), "--out", str(run_dir / "best.pt"), "--format", "safetensors"
        ),
        "the checkpoint being exported",
    )
    assert (run_dir / "best.pt").read_bytes() == before
    # its source even with --force: the file being read is never replaced by what is made of it
    assert_user_error(
        call(
            capsys,
            "export",
            "--checkpoint",
            str(run_dir / "best.pt"),
            "--out",
            str(run_dir / "best.pt"),
            "--format",
            "safetensors",
            "--force",
        ),
        "its source",
    )
    assert (run_dir / "best.pt").read_bytes() == before


@pytest.mark.slow
def test_export_refuses_a_checkpoint_file_of_a_run_without_force(run, tmp_path, capsys):
    run_dir = run[0]
    before = (run_dir / "last.pt").read_bytes()
    assert_user_error(
        call(
            capsys, "export", "--checkpoint", str(run[2]), "--out", str(run_dir / "last.pt"), "--format", "safetensors"
        ),
        "--force",
    )
    assert (run_dir / "last.pt").read_bytes() == before
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (copy / "last.pt").write_bytes(before)
    code, _, err = call(
        capsys,
        "export",
        "--checkpoint",
        str(run_dir),
        "--out",
        str(copy / "last.pt"),
        "--format",
        "safetensors",
        "--force",
    )
    assert code == 0, err
    assert (copy / "last.pt").read_bytes() != before  # --force: the user said so


@pytest.mark.slow
def test_export_still_writes_a_new_file_and_replaces_an_earlier_export(run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    for _ in range(2):
        code, _, err = call(capsys, "export", "--checkpoint", str(run[0]), "--out", str(out))
        assert code == 0, err


# --- no credentials or absolute paths in export metadata ------------------------------------------


@pytest.mark.slow
def test_export_metadata_carries_no_credentials_or_absolute_paths(run, tmp_path, capsys):
    run_dir = run[0]
    payload = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    payload["config"]["train"].update(
        mlflow_uri="https://alice:hunter2@mlflow.example:5000/x?token=s3cr3tT0ken",
        loggers=["jsonl", "mlflow"],
        init_from=str(run_dir.absolute() / "best.pt"),
    )
    payload["config"]["data"].update(val_path=str(tmp_path.absolute() / "val.txt"))
    source = tmp_path / "source.pt"
    torch.save(payload, source)
    out = tmp_path / "model.safetensors"
    code, _, err = call(capsys, "export", "--checkpoint", str(source), "--out", str(out))
    assert code == 0, err
    with safetensors_torch.safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    text = json.dumps(metadata)
    for secret in ("alice", "hunter2", "s3cr3tT0ken", str(tmp_path.absolute()), str(run_dir.absolute())):
        assert secret not in text, (secret, metadata)
    config = json.loads(metadata["charlm.config"])
    assert config["train"]["mlflow_uri"] == "https://mlflow.example:5000/x?token=REDACTED"
    assert config["data"]["path"] == run[1].name  # the file's name stays: it says what the model read
    assert config["data"]["val_path"] == "val.txt"
    assert config["train"]["init_from"] == "best.pt"
    code, out_text, err = call(capsys, "info", "--checkpoint", str(out))  # and it still reads back
    assert code == 0, err
