"""The real CLI end to end on tiny data, and every user mistake as one line with exit code 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PARAGRAPH, assert_user_error, call, run_cli, tiny_config


@pytest.mark.slow
def test_train_sample_eval_info_end_to_end(trained, cli, text_file):
    run_dir, _, result = trained
    assert "device: cpu" in result.stdout and "val loss" in result.stdout
    assert "model: lstm 1x16 (backend auto -> fused)" in result.stdout  # auto, resolved for a CPU LSTM in fp32
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]
    assert "backend: auto" in (run_dir / "config.yaml").read_text()  # the user's choice is kept
    assert torch.load(run_dir / "last.pt", weights_only=True)["backend"] == "fused"  # what it ran on
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and "train" in events and "eval" in events

    first = cli("sample", "--checkpoint", str(run_dir), "--prompt", "It was", "--length", "40", "--seed", "3")
    again = cli("sample", "--checkpoint", str(run_dir), "--prompt", "It was", "--length", "40", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and first.stdout.startswith("It was") and len(first.stdout) == 6 + 40 + 1

    evaluated = cli("eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert {"loss_nats", "bpc", "perplexity", "chars", "oov_chars"} <= set(report)
    assert report["chars"] == len(PARAGRAPH * 20) - 1 and report["oov_chars"] == 0

    info = cli("info", "--checkpoint", str(run_dir), "--json")
    facts = json.loads(info.stdout)
    assert facts["step"] == 6 and facts["vocab_size"] > 20 and facts["parameters"] > 1000
    assert facts["device"] == "cpu" and facts["best_val_loss"] is not None
    assert facts["backend"] == "fused" and facts["model"].endswith("backend auto -> fused")


def test_mingru_train_sample_eval_info(tmp_path, text_file, write_config, capsys):
    """model.type: mingru end to end; the options it does not support are one line each."""
    config = write_config(tiny_config(text_file, model={"type": "mingru", "num_layers": 2}))
    run_dir = tmp_path / "run"
    code, _, err = call(capsys, "train", "--config", str(config), "--out", str(run_dir))
    assert code == 0, err
    weights = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert "rnn.layers.1.weight_ih" in weights and not any("weight_hh" in name for name in weights)
    code, out, err = call(
        capsys, "sample", "--checkpoint", str(run_dir), "--prompt", "It was", "--length", "30", "--seed", "3"
    )
    assert code == 0 and out.startswith("It was") and len(out) == 6 + 30 + 1, err
    losses = {}
    for backend in ("native", "reference"):
        code, out, err = call(
            capsys, "eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--json", "--backend", backend
        )
        assert code == 0, err
        losses[backend] = json.loads(out)["loss_nats"]
    assert losses["native"] == pytest.approx(losses["reference"], abs=1e-5)
    code, out, err = call(capsys, "info", "--checkpoint", str(run_dir), "--json")
    facts = json.loads(out)
    assert code == 0 and "mingru 2x16" in facts["model"].lower() and facts["step"] == 6
    assert_user_error(
        call(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--backend", "fused"),
        "model.type mingru cannot run on the fused backend (torch has no fused kernel for it); use native or reference",
    )
    assert_user_error(
        call(
            capsys, "train", "--config", str(config), "--out", str(tmp_path / "r"), "--set", "model.weight_dropout=0.3"
        ),
        "model.weight_dropout: model.type mingru has no recurrent weights",
    )


def test_python_dash_m_and_help(cli):
    result = cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "sample" in result.stdout


@pytest.mark.slow
def test_greedy_batched_samples_and_eval_with_oov(trained, capsys, tmp_path):
    run_dir = trained[0]
    code, out, err = call(
        capsys,
        "sample",
        "--checkpoint",
        str(run_dir),
        "--prompt",
        "It",
        "--length",
        "10",
        "--temperature",
        "0",
        "--num-samples",
        "3",
    )
    assert code == 0, err
    samples = [line for line in out.splitlines() if line.startswith("It")]
    assert len(samples) == 3 and len(set(samples)) == 1  # greedy: all three identical
    odd = tmp_path / "odd.txt"
    odd.write_text("It was the best ~~ of times", encoding="utf-8")
    code, out, err = call(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(odd), "--json")
    assert json.loads(out)["oov_chars"] == 2


@pytest.mark.slow
def test_resume_gives_exactly_the_same_parameters(tmp_path, text_file, write_config, cli):
    """20 steps in one run == 10 steps + resume + 10 steps (dropout and weight dropout on, so
    RNG state matters too; the weight average carries over as well)."""
    config = write_config(
        tiny_config(
            text_file,
            model={"dropout": 0.2, "weight_dropout": 0.3, "num_layers": 2},
            train={"max_steps": 20, "eval_interval": 5, "lr_schedule": "constant", "warmup_steps": 8, "ema_decay": 0.8},
        )
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli("train", "--config", str(config), "--out", str(whole)).returncode == 0
    assert cli("train", "--config", str(config), "--out", str(split), "--set", "train.max_steps=10").returncode == 0
    resumed = cli("train", "--resume", "--out", str(split), "--set", "train.max_steps=20")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 10" in resumed.stdout
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 20 and a["ema_updates"] == b["ema_updates"] == 20
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
        assert torch.equal(a["raw_model"][name], b["raw_model"][name]), name


@pytest.mark.slow
def test_run_dir_is_never_silently_overwritten(trained, capsys, tmp_path):
    run_dir, config = tmp_path / "run", trained[1]
    shutil.copytree(trained[0], run_dir)
    before = (run_dir / "last.pt").read_bytes()
    assert_user_error(call(capsys, "train", "--config", str(config), "--out", str(run_dir)), "already holds a run")
    assert (run_dir / "last.pt").read_bytes() == before
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(run_dir), "--resume"), "already reached its budget"
    )
    code, _, err = call(capsys, "train", "--config", str(config), "--out", str(run_dir), "--overwrite")
    assert code == 0, err


def write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "data,fragment",
    [
        (None, "data path not found"),
        (b"", "is empty"),
        (b"\x7fELF\x00\x00binary", "binary file"),
        (b"good text then \xe9 latin-1", "not valid UTF-8: bad byte 0xe9 at byte offset 15"),
        (b"abc" * 7, "one window needs train.batch_size x train.seq_len + 1 = 65"),
    ],
)
def test_bad_training_data(tmp_path, write_config, capsys, data, fragment):
    path = tmp_path / "data.txt"
    if data is not None:
        path.write_bytes(data)
    config = write_config(tiny_config(path))
    assert_user_error(call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "r")), fragment)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["--set", "train.batch_size=-1"], "train.batch_size: input should be greater than 0"),
        (["--set", "model.hidden_size=0"], "model.hidden_size: input should be greater than 0"),
        (["--set", "train.lr=abc"], "train.lr: input should be a valid number"),
        (["--set", "train.lrate=1"], "did you mean 'lr'?"),
        (["--device", "cuda:7"], "CUDA"),
        (["--device", "tpu"], "train.device: must be auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_config_values(tmp_path, text_file, write_config, capsys, overrides, fragment):
    if "cuda:7" in overrides and torch.cuda.is_available():
        pytest.skip("CUDA present")
    config = write_config(tiny_config(text_file))
    assert_user_error(
        call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "r"), *overrides), fragment
    )


def test_bad_yaml_and_unknown_key(tmp_path, capsys):
    bad = write(tmp_path, "bad.yaml", b"data: [oops\n")
    assert_user_error(call(capsys, "train", "--config", str(bad)), "invalid YAML at line")
    typo = write(tmp_path, "typo.yaml", b"data:\n  path: x\ntrain:\n  max_step: 3\n")
    code, _, err = call(capsys, "train", "--config", str(typo))
    assert code == 2 and "train.max_step: unknown key; did you mean 'max_steps'?" in err
    assert_user_error(call(capsys, "train", "--config", str(tmp_path / "none.yaml")), "config file not found")
    assert_user_error(call(capsys, "train"), "give --config FILE")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--prompt", "Zebra{}"], "the prompt has 3 character(s) the model never saw"),
        (["--length", "0"], "--length: input should be greater than 0"),
        (["--length", "99999999999"], "--length: input should be less than or equal to 1000000"),
        (["--top-p", "0"], "--top-p: input should be greater than 0"),
        (["--top-p", "1.5"], "--top-p: input should be less than or equal to 1"),
        (["--top-k", "-3"], "--top-k: input should be greater than 0"),
        (["--temperature", "-1"], "--temperature: input should be greater than or equal to 0"),
        (["--num-samples", "0"], "--num-samples"),
        (["--length", "many"], "Invalid value for '--length'"),
        (["--prompt", "a", "--prompt-file", "f"], "not both"),
    ],
)
def test_bad_sample_options(trained, capsys, args, fragment):
    assert_user_error(call(capsys, "sample", "--checkpoint", str(trained[0]), *args), fragment)


def test_bad_checkpoints(tmp_path, capsys, text_file):
    assert_user_error(call(capsys, "sample", "--checkpoint", str(tmp_path / "missing.pt")), "checkpoint not found")
    junk = write(tmp_path, "junk.pt", b"this is not a checkpoint at all")
    for command in (["sample"], ["eval", "--text", str(text_file)], ["info"]):
        assert_user_error(call(capsys, *command, "--checkpoint", str(junk)), "damaged or not a checkpoint")


def test_malicious_checkpoint_is_refused_by_every_command(tmp_path, capsys, text_file, write_config):
    from store.test_checkpoint import write_exploit  # tests/ is on the path (conftest.py); store/ is a folder of it

    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_dir.mkdir()
    write_exploit(run_dir / "last.pt", marker)
    config = write_config(tiny_config(text_file))
    for command in (
        ["sample", "--checkpoint", str(run_dir)],
        ["eval", "--checkpoint", str(run_dir), "--text", str(text_file)],
        ["info", "--checkpoint", str(run_dir)],
        ["train", "--config", str(config), "--out", str(run_dir), "--resume"],
    ):
        assert_user_error(call(capsys, *command), "refusing to load it")
    assert not marker.exists()


@pytest.mark.slow
def test_eval_text_errors(trained, capsys, tmp_path):
    run_dir = trained[0]
    assert_user_error(
        call(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(tmp_path / "no.txt")), "data path not found"
    )
    unknown = write(tmp_path, "unknown.txt", "½¾¼".encode())
    assert_user_error(call(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(unknown)), "at least 2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_samples_and_evaluates_on_cpu(tmp_path, text_file, write_config, cli):
    config = write_config(tiny_config(text_file))
    run_dir = tmp_path / "run"
    trained = cli("train", "--config", str(config), "--out", str(run_dir), "--device", "cuda")
    assert trained.returncode == 0 and "device: cuda" in trained.stdout, trained.stderr
    sampled = cli("sample", "--checkpoint", str(run_dir), "--device", "cpu", "--length", "20", "--seed", "1")
    assert sampled.returncode == 0, sampled.stderr
    on_cpu = json.loads(
        cli("eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--json", "--device", "cpu").stdout
    )
    on_gpu = json.loads(
        cli("eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--json", "--device", "cuda").stdout
    )
    assert on_cpu["loss_nats"] == pytest.approx(on_gpu["loss_nats"], abs=1e-4)


@pytest.mark.slow
def test_ctrl_c_saves_and_resumes(tmp_path, text_file, write_config):
    import os
    import signal
    import subprocess
    import sys
    import time

    config = write_config(
        tiny_config(text_file, train={"max_steps": None, "max_time": "5m", "log_interval": 1, "eval_interval": 100_000})
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
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGINT: stopped at step" in out and "--resume" in out and "Traceback" not in err
    step = torch.load(run_dir / "last.pt", weights_only=True)["step"]
    assert step >= 1
    resumed = run_cli(
        "train",
        "--resume",
        "--out",
        str(run_dir),
        "--set",
        "train.max_time=null",
        "--set",
        f"train.max_steps={step + 3}",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == step + 3


@pytest.mark.slow
def test_checkpoint_runs_with_every_backend(trained, capsys, text_file):
    """Trained with backend auto (fused, for a CPU LSTM in fp32); the same weights evaluate and sample
    alike on every backend."""
    run_dir = trained[0]
    losses = {}
    for backend in ("native", "fused", "reference", "auto"):
        code, out, err = call(
            capsys, "eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--json", "--backend", backend
        )
        assert code == 0, err
        losses[backend] = json.loads(out)["loss_nats"]
    assert losses["fused"] == pytest.approx(losses["native"], abs=1e-5)
    assert losses["reference"] == pytest.approx(losses["native"], abs=1e-5)
    assert losses["auto"] == losses["fused"]
    greedy = {
        backend: call(
            capsys,
            "sample",
            "--checkpoint",
            str(run_dir),
            "--prompt",
            "It",
            "--length",
            "30",
            "--temperature",
            "0",
            "--backend",
            backend,
        )[1]
        for backend in ("native", "fused")
    }
    assert greedy["native"] == greedy["fused"]
    assert_user_error(
        call(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(text_file), "--backend", "turbo"),
        "--backend must be one of auto, native, fused, reference",
    )


def test_resume_may_switch_backend(tmp_path, text_file, write_config, capsys):
    config = write_config(tiny_config(text_file, train={"max_steps": 4}))
    run_dir = tmp_path / "run"
    assert call(capsys, "train", "--config", str(config), "--out", str(run_dir))[0] == 0
    code, _, err = call(
        capsys, "train", "--resume", "--out", str(run_dir), "--set", "train.max_steps=6", "--set", "model.backend=fused"
    )
    assert code == 0, err
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 6


@pytest.mark.slow
def test_resume_with_random_offsets_crosses_epochs_exactly(tmp_path, text_file, write_config, cli):
    """With train.random_offsets each epoch reads shifted windows; 40 steps (2.7 epochs) in one
    run == 20 + resume + 20, and the run differs from one without the shifts."""
    config = write_config(
        tiny_config(
            text_file,
            train={
                "max_steps": 40,
                "eval_interval": 10,
                "batch_size": 8,
                "seq_len": 32,
                "random_offsets": True,
                "lr_schedule": "constant",
            },
        )
    )
    runs = {name: tmp_path / name for name in ("whole", "split", "plain")}
    assert cli("train", "--config", str(config), "--out", str(runs["whole"])).returncode == 0
    assert (
        cli("train", "--config", str(config), "--out", str(runs["split"]), "--set", "train.max_steps=20").returncode
        == 0
    )
    resumed = cli("train", "--resume", "--out", str(runs["split"]), "--set", "train.max_steps=40")
    assert resumed.returncode == 0, resumed.stderr
    assert "15 steps per epoch" in resumed.stdout
    plain = cli("train", "--config", str(config), "--out", str(runs["plain"]), "--set", "train.random_offsets=false")
    assert plain.returncode == 0, plain.stderr
    a, b, c = (torch.load(runs[name] / "last.pt", weights_only=True) for name in ("whole", "split", "plain"))
    assert a["progress"]["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert not torch.equal(a["model"]["head.weight"], c["model"]["head.weight"])


def test_resumes_a_checkpoint_written_before_a_model_key_existed(tmp_path, text_file, write_config, capsys):
    """Keys added later (model.weight_dropout) read as their defaults, not as a changed config."""
    config = write_config(tiny_config(text_file, train={"max_steps": 4}))
    run_dir = tmp_path / "run"
    assert call(capsys, "train", "--config", str(config), "--out", str(run_dir))[0] == 0
    payload = torch.load(run_dir / "last.pt", weights_only=True)
    del payload["config"]["model"]["weight_dropout"]
    torch.save(payload, run_dir / "last.pt")
    code, _, err = call(capsys, "train", "--resume", "--out", str(run_dir), "--set", "train.max_steps=6")
    assert code == 0, err
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 6


BAD_TEXTS = {
    "missing": (None, "data path not found"),
    "empty": (b"", "is empty"),
    "newlines": (b"\n\n\n\n", "holds only whitespace"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00", "looks like a binary file"),
    "latin-1": (b"na\xefve text", "not valid UTF-8: bad byte 0xef at byte offset 2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BAD_TEXTS))
def test_eval_rejects_bad_text(trained, capsys, tmp_path, kind):
    content, fragment = BAD_TEXTS[kind]
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    assert_user_error(call(capsys, "eval", "--checkpoint", str(trained[0]), "--text", str(path)), fragment)


@pytest.mark.slow
def test_eval_rejects_a_folder_without_text(trained, capsys, tmp_path):
    (tmp_path / "only-binary").mkdir()
    (tmp_path / "only-binary" / "x.bin").write_bytes(b"\x00\x01")
    assert_user_error(
        call(capsys, "eval", "--checkpoint", str(trained[0]), "--text", str(tmp_path / "only-binary")),
        "holds no text files",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "content,fragment",
    [
        (None, "file not found"),
        (b"", "is empty"),
        (b"\x00\x00binary", "looks like a binary file"),
        (b"It \xff", "not valid UTF-8: bad byte 0xff at byte offset 3"),
    ],
)
def test_sample_rejects_bad_prompt_files(trained, capsys, tmp_path, content, fragment):
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_bytes(content)
    assert_user_error(call(capsys, "sample", "--checkpoint", str(trained[0]), "--prompt-file", str(path)), fragment)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command,option,value",
    [
        ("sample", "--num-samples", "-1"),
        ("sample", "--seed", "-5"),
        ("sample", "--length", "-5"),
        ("sample", "--top-k", "0"),
        ("eval", "--batch-size", "0"),
        ("eval", "--batch-size", "-2"),
    ],
)
def test_negative_or_zero_numbers(trained, capsys, text_file, command, option, value):
    extra = ["--text", str(text_file)] if command == "eval" else []
    code, _, err = call(capsys, command, "--checkpoint", str(trained[0]), *extra, option, value)
    assert code == 2 and option in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "key",
    [
        "train.batch_size",
        "train.seq_len",
        "train.max_steps",
        "train.eval_interval",
        "train.log_interval",
        "train.eval_batch_size",
        "train.checkpoint_interval",
        "train.patience",
        "train.max_bad_steps",
        "model.hidden_size",
        "model.num_layers",
        "model.embedding_dim",
        "train.lr",
        "sample.length",
    ],
)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_every_size_must_be_positive(tmp_path, text_file, write_config, capsys, key, value):
    config = write_config(tiny_config(text_file))
    code, _, err = call(
        capsys, "train", "--config", str(config), "--out", str(tmp_path / "r"), "--set", f"{key}={value}"
    )
    assert code == 2 and key in err and "Traceback" not in err
