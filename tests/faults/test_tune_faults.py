"""`charlm tune` when its processes die: a killed worker leaves no trainer and no hole in the study,
a trainer killed by any signal is one line, trial.yaml is written atomically, and the sweep's
database and messages hold no credentials. Real processes throughout, each wait bounded."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PARAGRAPH, config_yaml, run_cli, tiny_config

from charlm.config import load_config

SPACE = "model.hidden_size: [8, 16]\n"
SECRET = "hunter2"
TRACKING = f"http://alice:{SECRET}@127.0.0.1:9/"  # never contacted: train.loggers leaves MLflow out


@pytest.fixture
def optuna():
    return pytest.importorskip("optuna")


@pytest.fixture
def sweep_files(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text(PARAGRAPH * 20, encoding="utf-8")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE, encoding="utf-8")

    def write(**train) -> tuple[Path, Path]:
        config = tmp_path / "tiny.yaml"
        config.write_text(config_yaml(tiny_config(text, train={"mlflow_uri": TRACKING, **train})), encoding="utf-8")
        return config, space

    return write


def start_tune(config: Path, space: Path, out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charlm",
            "tune",
            "--config",
            str(config),
            "--space",
            str(space),
            "--out",
            str(out),
            *args,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def trainers(out: Path) -> list[int]:
    """Live processes training a trial of the sweep in `out` (zombies are dead already)."""
    listing = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True, timeout=30
    ).stdout
    found = []
    for line in listing.splitlines():
        pid, stat, args = (line.split(None, 2) + ["", ""])[:3]
        if f"{out}{os.sep}trial_" in args and " train " in f" {args} " and not stat.startswith("Z"):
            found.append(int(pid))
    return found


def wait_for(condition, seconds: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the worker ended before {what}: {process.communicate()}")
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.1)


def evaluated(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and '"eval"' in metrics.read_text()


def study_trials(optuna, out: Path):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}").get_trials()


def stored_bytes(out: Path) -> bytes:
    """The study database as its files hold it (its write-ahead log too, if any)."""
    return b"".join(p.read_bytes() for p in out.glob("study.db*"))


@pytest.mark.slow
def test_a_killed_worker_leaves_no_trainer_and_the_next_worker_completes_the_sweep(optuna, sweep_files, tmp_path):
    config, space = sweep_files(max_steps=None, max_time="4s", eval_interval=2)
    out = tmp_path / "sweep"
    # One trial: the second worker finds no place left, only trial 0 running (its worker dead), and
    # must wait for its heartbeat to lapse rather than end the sweep a trial short.
    first = start_tune(config, space, out, "--trials", "1", "--seed", "1", "--stale-after", "6")
    try:
        wait_for(lambda: evaluated(out / "trial_0000"), 120, "evaluation of trial 0", first)
        assert trainers(out), "the trainer of trial 0 should be running"
        first.kill()
        first.wait(timeout=30)
        # The trainer learns of its worker's death at once (SIGTERM), checkpoints and exits.
        wait_for(lambda: not trainers(out), 30, "end of the orphaned trainer")
        last = (out / "trial_0000" / "metrics.jsonl").read_text().splitlines()[-1]
        assert '"reason": "interrupted"' in last, last  # stopped, not left to train to its end
    finally:
        first.kill()
        for pid in trainers(out):  # the code before the fix leaves one: do not let it outlive the test
            os.kill(pid, signal.SIGKILL)

    second = start_tune(config, space, out, "--trials", "1", "--seed", "2", "--stale-after", "6")
    stdout, stderr = second.communicate(timeout=180)
    assert second.returncode == 0, stderr
    assert "trial 0: its worker is gone (no heartbeat); queued again" in stdout  # taken over here
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [(r["number"], r["state"]) for r in rows] == [("0", "complete")]
    starts = [line for line in (out / "trial_0000" / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 2 and '"resumed": true' in starts[1]  # resumed from the checkpoint it left
    assert not trainers(out)
    # The credentials the config gives train.mlflow_uri stay out of the study, and best.yaml keeps them.
    assert SECRET.encode() not in stored_bytes(out)
    assert SECRET not in (out / "trials.csv").read_text()
    assert load_config(out / "best.yaml").train.mlflow_uri == TRACKING


@pytest.mark.slow
def test_a_hung_up_worker_stops_its_trainer_and_queues_the_trial(optuna, sweep_files, tmp_path):
    # SIGTERM takes the same path (and test_tune.py's Ctrl-C test the same stop): SIGHUP was the gap,
    # killing the worker and leaving its trainer, in a session of its own, to train on.
    signum = signal.SIGHUP
    config, space = sweep_files(max_steps=None, max_time="60s", eval_interval=2)
    out = tmp_path / "sweep"
    worker = start_tune(config, space, out, "--trials", "1")
    try:
        wait_for(lambda: evaluated(out / "trial_0000"), 120, "evaluation of trial 0", worker)
        worker.send_signal(signum)
        stdout, stderr = worker.communicate(timeout=60)
    finally:
        worker.kill()
        for pid in trainers(out):
            os.kill(pid, signal.SIGKILL)
    assert worker.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines() == [
        f"charlm: interrupted ({name}) during the sweep; the study is saved and "
        "a stopped trial resumes from its checkpoint when you run the same "
        "command again"
    ]
    assert "trial 0: stopped at step" in stdout
    assert not trainers(out)
    (trial,) = study_trials(optuna, out)
    assert trial.state.name == "WAITING"


def _sleeper_env(tmp_path: Path, mode: str) -> dict:
    (tmp_path / "sleeper.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    path = os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2])])
    return {**os.environ, "PYTHONPATH": path, "CHARLM_TETHER": mode}


@pytest.mark.parametrize("mode", ["auto", "poll"])
def test_a_tethered_process_ends_when_its_parent_is_killed(tmp_path, mode):
    """The trainer's tie to its worker: the parent-death signal where Linux has it, else (macOS) a watchdog
    that polls the parent pid; CHARLM_TETHER=poll runs the watchdog here."""
    parent_code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-m', 'charlm.tune.tether', str(os.getpid()), 'sleeper'],"
        " stdout=subprocess.PIPE, text=True, start_new_session=True)\n"
        "assert child.stdout.readline() == 'up\\n', 'the tethered child did not start'\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=_sleeper_env(tmp_path, mode)
    )
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, f"pid {child} outlived its parent by 10 s"
            time.sleep(0.1)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # Linux: a zombie waiting for its new parent to reap it is dead
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_trainer_killed_by_a_real_time_signal_is_one_line(tmp_path):
    from charlm.tune.trial import run_trial

    realtime = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else None
    if realtime is None:
        pytest.skip("this platform has no real-time signals")
    run_dir = tmp_path / "trial_0000"
    run_dir.mkdir()
    command = [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(realtime)})"]
    result = run_trial(command, run_dir, lambda step, loss: False, lambda: None)
    assert result.outcome == "failed"
    assert result.message.startswith(f"the trainer was killed by signal {int(realtime)}")
    assert "\n" not in result.message


def test_trial_yaml_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, text_file):
    from charlm import atomic
    from charlm.config import validate_config
    from charlm.tune.trial import TRIAL_CONFIG, train_command

    run_dir = tmp_path / "trial_0000"
    run_dir.mkdir()
    old = "# the config of an earlier start\n"
    (run_dir / TRIAL_CONFIG).write_text(old)

    def crash(src, dst):  # the machine stops between writing the new file and putting it in place
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "replace", crash)
    with pytest.raises(OSError):
        train_command(run_dir, validate_config(tiny_config(text_file), "test"))
    assert (run_dir / TRIAL_CONFIG).read_text() == old
    assert [p.name for p in run_dir.iterdir()] == [TRIAL_CONFIG]  # no temp file left either


@pytest.mark.slow
def test_a_storage_password_never_shows_in_a_message(sweep_files, tmp_path):
    config, space = sweep_files()
    for url in (
        f"postgresql://:{SECRET}@127.0.0.1:9/db",
        f"postgresql://bob:{SECRET}@127.0.0.1:9/db",
        f"postgresql://127.0.0.1:9/db?password={SECRET}",
    ):
        result = run_cli(
            "tune",
            "--config",
            str(config),
            "--space",
            str(space),
            "--out",
            str(tmp_path / "sweep"),
            "--trials",
            "1",
            "--storage",
            url,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot open the study storage postgresql://" in lines[0], result.stderr
        assert SECRET not in result.stderr and SECRET not in result.stdout


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://bob:pw@db.example:5432/study", "postgresql://bob:***@db.example:5432/study"),
        ("postgresql://:pw@db.example/study", "postgresql://:***@db.example/study"),
        ("mysql+pymysql://bob:p@ss:w@db.example/study", "mysql+pymysql://bob:***@db.example/study"),
        ("postgresql://bob@db.example/study", "postgresql://bob@db.example/study"),  # no password: nothing hidden
        (
            "postgresql://db.example/study?user=bob&password=pw",
            "postgresql://db.example/study?user=bob&password=REDACTED",
        ),
        ("sqlite:////tmp/sweep/study.db", "sqlite:////tmp/sweep/study.db"),
    ],
)
def test_hide_password_keeps_the_user_and_hides_the_password(url, shown):
    from charlm.tune.credentials import hide_password

    assert hide_password(url) == shown


@pytest.mark.slow
def test_the_study_database_holds_no_credentials(optuna, sweep_files, tmp_path):
    config, space = sweep_files()
    out = tmp_path / "sweep"
    # The trainer refuses these windows at once (exit 2): the trial fails after its config was stored.
    result = run_cli(
        "tune",
        "--config",
        str(config),
        "--space",
        str(space),
        "--out",
        str(out),
        "--trials",
        "1",
        "--set",
        "train.seq_len=5000",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    (trial,) = study_trials(optuna, out)
    assert trial.user_attrs["config"]["train"]["mlflow_uri"] == "http://127.0.0.1:9/"
    assert SECRET.encode() not in stored_bytes(out)
    assert SECRET not in (out / "trials.csv").read_text() and SECRET not in result.stdout + result.stderr
    assert SECRET in (out / "trial_0000" / "trial.yaml").read_text()  # the trainer itself gets them


def test_a_searched_value_with_credentials_is_refused(sweep_files, tmp_path):
    config, _ = sweep_files()
    space = tmp_path / "secret-space.yaml"
    space.write_text(f"train.mlflow_uri: ['http://127.0.0.1:9/', '{TRACKING}']\n", encoding="utf-8")
    result = run_cli(
        "tune",
        "--config",
        str(config),
        "--space",
        str(space),
        "--out",
        str(tmp_path / "sweep"),
        "--trials",
        "1",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.mlflow_uri" in lines[0] and "credentials" in lines[0], result.stderr
    assert SECRET not in result.stderr
    assert not (tmp_path / "sweep").exists()
