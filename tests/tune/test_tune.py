"""`charlm tune` through the real CLI on tiny data: the space file's checks, a sweep end to end,
two workers sharing one study, pruning, Ctrl-C and resuming; and the metrics reader."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PARAGRAPH, ROOT, run_cli, tiny_config

from charlm.config import load_config
from charlm.tune.space import load_space
from charlm.tune.trial import MetricsTail

SPACE = "model.hidden_size: [8, 16]\ntrain.lr: {low: 1.0e-3, high: 3.0e-2, log: true}\n"


@pytest.fixture
def optuna():
    return pytest.importorskip("optuna")


@pytest.fixture
def sweep_files(tmp_path, write_config):
    """write(space_text, **sections) -> (config, space): tiny_config on PARAGRAPH * 20 and a space file."""
    text = tmp_path / "input.txt"
    text.write_text(PARAGRAPH * 20, encoding="utf-8")

    def write(space_text: str = SPACE, **sections) -> tuple[Path, Path]:
        space = tmp_path / "space.yaml"
        space.write_text(space_text, encoding="utf-8")
        return write_config(tiny_config(text, **sections)), space

    return write


def tune(config: Path, space: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("tune", "--config", str(config), "--space", str(space), "--out", str(out), *args)


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


def study_trials(optuna, out: Path, name: str = "tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}").get_trials()


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "space_text, extra, expected",
    [
        ("model.hiden_size: [8, 16]\n", [], "model.hiden_size: unknown key; did you mean 'hidden_size'?"),
        ("modle.hidden_size: [8]\n", [], "unknown section 'modle'; did you mean 'model'?"),
        ("train.lr: {low: 0.1, high: 0.01}\n", [], "train.lr: low must be below high (got low 0.1, high 0.01)"),
        ("train.lr: {low: 0.0, high: 0.1, log: true}\n", [], "train.lr: log: true needs low > 0"),
        ("train.lr: {low: 0.001, hi: 0.1}\n", [], "train.lr: unknown range setting 'hi'"),
        ("model.num_layers: {low: 1, high: 2.5}\n", [], "model.num_layers: takes whole numbers"),
        ("model.hidden_size: []\n", [], "model.hidden_size: the list of choices is empty"),
        (
            "model.hidden_size: [0, 16]\n",
            [],
            "model.hidden_size: 0 makes an invalid config: model.hidden_size: input should be greater than 0 (got 0)",
        ),
        ("model.type: {low: 1, high: 2}\n", [], "model.type: a range needs a number key"),
        ("train.lr: [0.01, 0.02]\n", ["--set", "train.lr=0.01"], "train.lr: given with --set and searched"),
        ("- train.lr\n", [], "a space file maps config keys to choices or ranges"),
    ],
)
def test_space_mistakes_are_one_line_and_exit_2(sweep_files, tmp_path, space_text, extra, expected):
    config, space = sweep_files(space_text)
    result = tune(config, space, tmp_path / "sweep", "--trials", "2", *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: "), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "sweep").exists()  # nothing ran


def test_every_problem_of_a_space_file_is_named(sweep_files, tmp_path):
    config, space = sweep_files("model.hidden_sise: [8]\ntrain.lr: {low: 1, high: 0.5}\n")
    result = tune(config, space, tmp_path / "sweep", "--trials", "2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "model.hidden_sise: unknown key" in lines[0] and "train.lr: low must be" in lines[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_fit_their_configs_and_open_with_their_command(path):
    config = ROOT / "configs" / path.name
    space = load_space(path, load_config(config))
    assert space.keys and all("." in key for key in space.keys)
    head = path.read_text(encoding="utf-8").splitlines()[:3]
    assert any(f"charlm tune --config configs/{path.name} --space configs/spaces/{path.name}" in line for line in head)


@pytest.mark.slow
def test_values_that_only_clash_together_fail_their_trial(optuna, sweep_files, tmp_path):
    # Each value alone suits the config (lr 0.02, min_lr 0); together min_lr > lr.
    config, space = sweep_files("train.lr: [0.001]\ntrain.min_lr: [0.005]\n", train={"lr": 0.02})
    result = tune(config, space, tmp_path / "sweep", "--trials", "1")
    assert result.returncode == 2
    assert (
        "trial 0: failed: these values together: train: train.min_lr (0.005) must not exceed train.lr (0.001)"
        in result.stdout
    )
    (trial,) = study_trials(optuna, tmp_path / "sweep")
    assert trial.state.name == "FAIL" and "must not exceed" in trial.user_attrs["message"]
    assert not list((tmp_path / "sweep").glob("trial_*"))  # no trainer was started


def test_without_optuna_it_names_the_extra(sweep_files, tmp_path):
    config, space = sweep_files()
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "optuna.py").write_text("raise ModuleNotFoundError(\"No module named 'optuna'\", name='optuna')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "charlm",
            "tune",
            "--config",
            str(config),
            "--space",
            str(space),
            "--trials",
            "1",
            "--out",
            str(tmp_path / "sweep"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "charlm: error: charlm tune needs the tune extra: pip install 'charlm[tune]'"


@pytest.mark.slow
def test_sweep_end_to_end_records_failures_and_writes_a_trainable_best(optuna, sweep_files, tmp_path):
    config, space = sweep_files()
    out = tmp_path / "sweep"
    # Windows longer than the text: the trainer refuses (exit 2), the trial fails with its message.
    failed = tune(config, space, out, "--trials", "1", "--set", "train.seq_len=5000", "--seed", "1")
    assert failed.returncode == 2
    assert "none of the 1 trials completed" in failed.stderr
    # The same command with a workable config continues the study: trial 0 stays, two more run.
    result = tune(config, space, out, "--trials", "3", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "trial 1: complete at step 6" in result.stdout and "trial 2: complete at step 6" in result.stdout

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [(r["number"], r["state"]) for r in rows] == [("0", "failed"), ("1", "complete"), ("2", "complete")]
    assert "one window needs train.batch_size x train.seq_len + 1" in rows[0]["message"]
    assert set(rows[0]) >= {"model.hidden_size", "train.lr", "best_val", "steps", "seconds", "run_dir"}
    best = min(rows[1:], key=lambda r: float(r["best_val"]))
    assert f"best: trial {best['number']}, val loss {float(best['best_val']):.4f}" in result.stdout

    cfg = load_config(out / "best.yaml")  # a full config, with the best trial's values
    assert cfg.model.hidden_size == int(best["model.hidden_size"])
    assert cfg.train.lr == pytest.approx(float(best["train.lr"]))
    trained = run_cli("train", "--config", str(out / "best.yaml"), "--out", str(tmp_path / "best-run"))
    assert trained.returncode == 0, trained.stderr
    assert events(tmp_path / "best-run")[-1]["best_val_loss"] == pytest.approx(float(best["best_val"]), abs=1e-5)


@pytest.mark.slow
def test_two_workers_share_one_study_without_losing_or_repeating_a_trial(optuna, sweep_files, tmp_path):
    config, space = sweep_files()
    out, n = tmp_path / "sweep", 4
    workers = [start_tune(config, space, out, "--trials", str(n), "--seed", str(seed)) for seed in (1, 2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in outputs]

    trials = study_trials(optuna, out)
    finished = [t for t in trials if t.state.is_finished()]
    assert sorted(t.number for t in finished) == list(range(n))
    assert all(t.state.name == "COMPLETE" for t in finished)
    # A place taken past --trials by a worker that asked at the last moment is put back, unrun.
    assert all(t.state.name == "WAITING" and not t.params for t in trials if not t.state.is_finished())
    started = [
        line.split(":")[0]
        for stdout, _ in outputs
        for line in stdout.splitlines()
        if line.startswith("trial ") and "model.hidden_size=" in line
    ]
    assert sorted(started) == [f"trial {i}" for i in range(n)]  # each run once, by one worker or the other
    assert sorted(p.name for p in out.glob("trial_*")) == [f"trial_{i:04d}" for i in range(n)]
    for i in range(n):
        assert [e["event"] for e in events(out / f"trial_{i:04d}")].count("start") == 1


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_and_its_trainer_stopped(optuna, sweep_files, tmp_path):
    config, space = sweep_files("model.hidden_size: [16]\n", train={"lr": 0.03, "max_steps": 20, "eval_interval": 5})
    out = tmp_path / "sweep"
    first = tune(config, space, out, "--trials", "2", "--startup-trials", "2")
    assert first.returncode == 0, first.stderr
    # The third trial learns nothing (lr 1e-6): at its first evaluation it is worse than the median.
    budget = 5000
    result = tune(
        config,
        space,
        out,
        "--trials",
        "3",
        "--startup-trials",
        "2",
        "--set",
        "train.lr=1.0e-6",
        "--set",
        f"train.max_steps={budget}",
    )
    assert result.returncode == 0, result.stderr
    assert "trial 2: pruned at step" in result.stdout

    pruned = study_trials(optuna, out)[2]
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [5]
    log = events(out / "trial_0002")
    assert log[-1]["event"] == "end" and log[-1]["reason"] == "interrupted"  # stopped by SIGINT, checkpointed
    assert log[-1]["step"] < budget and pruned.user_attrs["steps"] == log[-1]["step"]
    assert (out / "trial_0002" / "last.pt").exists()


@pytest.mark.slow
def test_ctrl_c_queues_the_running_trial_and_the_next_run_resumes_it(optuna, sweep_files, tmp_path):
    config, space = sweep_files(train={"max_steps": None, "max_time": "8s", "eval_interval": 5})
    out = tmp_path / "sweep"
    worker = start_tune(config, space, out, "--trials", "1")
    metrics = out / "trial_0000" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"eval"' in metrics.read_text()):
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()
        time.sleep(0.2)
    worker.send_signal(signal.SIGINT)
    stdout, stderr = worker.communicate(timeout=300)
    assert worker.returncode == 130, stderr
    assert "trial 0: stopped at step" in stdout and "charlm: interrupted (SIGINT) during the sweep" in stderr
    (trial,) = study_trials(optuna, out)
    assert trial.state.name == "WAITING" and set(trial.params) == {"model.hidden_size", "train.lr"}
    assert events(out / "trial_0000")[-1]["reason"] == "interrupted"

    again = tune(config, space, out, "--trials", "1")
    assert again.returncode == 0, again.stderr
    (trial_after,) = study_trials(optuna, out)
    assert trial_after.state.name == "COMPLETE" and trial_after.params == trial.params
    starts = [e for e in events(out / "trial_0000") if e["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True]
    assert (out / "best.yaml").exists()


def test_metrics_tail_returns_only_whole_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.new_events() == []  # no file yet
    path.write_text('{"event": "start", "step": 0}\n{"event": "ev')
    assert tail.new_events() == [{"event": "start", "step": 0}]
    with path.open("a") as handle:
        handle.write('al", "step": 5, "val_loss": 3.1}\n')
    assert tail.new_events() == [{"event": "eval", "step": 5, "val_loss": 3.1}]
    assert tail.new_events() == []
