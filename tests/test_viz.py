"""Looking inside: gate introspection, the viz page (in a real headless Chromium), plots, runs, live view."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from charlm.cells import GRUCell, LSTMCell, RNNCell
from charlm.model import CharLM
from charlm.progress import sparkline
from charlm.text import TextSettings
from charlm.viz import inspect
from charlm.vocab import Vocab
from conftest import PARAGRAPH, ROOT, tiny_config
from test_cli import assert_user_error, call

ARTIFACTS = ROOT / "tests" / "artifacts"


# --- introspection ------------------------------------------------------------------------

def test_recorded_lstm_gates_reproduce_the_cell():
    torch.manual_seed(0)
    cell = LSTMCell(3, 5).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    record = {}
    h, c = cell(x, (h0, c0), record)
    i, f, g, o = (record[name][0] for name in ("input", "forget", "candidate", "output"))
    torch.testing.assert_close(f * c0 + i * g, c)
    torch.testing.assert_close(o * torch.tanh(record["cell"][0]), h)
    assert all(((0 <= v) & (v <= 1)).all() for v in (i, f, o))


def test_recorded_gru_and_rnn_activations():
    torch.manual_seed(1)
    x, h0 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    record = {}
    (h,) = GRUCell(3, 4).double()(x, (h0,), record)
    z, n = record["update"][0], record["new"][0]
    torch.testing.assert_close((1 - z) * n + z * h0, h)
    record = {}
    (h,) = RNNCell(3, 4).double()(x, (h0,), record)
    torch.testing.assert_close(record["hidden"][0], h)


def test_recording_changes_nothing():
    torch.manual_seed(2)
    model = CharLM(7, "lstm", hidden_size=6, num_layers=2, backend="native").eval()
    idx = torch.randint(0, 7, (2, 9))
    record = []
    torch.testing.assert_close(model(idx, None, record)[0], model(idx)[0], atol=1e-5, rtol=0)
    assert len(record) == 2 and len(record[0]["forget"]) == 9 and record[1]["cell"][0].shape == (2, 6)


def test_inspection_surprisal_is_the_models_loss():
    torch.manual_seed(3)
    vocab = Vocab(sorted(set(PARAGRAPH)))
    model = CharLM(len(vocab), "lstm", hidden_size=8, num_layers=1).eval()
    ins = inspect(model, vocab, PARAGRAPH, TextSettings(), "lstm")
    ids = vocab.encode(PARAGRAPH).ids.long()
    logits, _ = model(ids[None, :-1])
    nats = torch.nn.functional.cross_entropy(logits[0], ids[1:]).item()
    assert sum(ins.surprisal[1:]) / (len(ids) - 1) == pytest.approx(nats / 0.6931471805599453, rel=1e-4)
    assert "".join(ins.chars) == PARAGRAPH and len(ins.top5[5]) == 5
    assert ins.channels["forget"][0].shape == (len(PARAGRAPH), 8)
    assert {f["name"] for f in ins.features} == {"inside quotes", "inside parentheses", "position in line"}


# --- the page -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def viz_run(tmp_path_factory):
    from conftest import run_cli
    import yaml
    folder = tmp_path_factory.mktemp("viz")
    text = folder / "input.txt"
    text.write_text(('He said "stop (now)" and left.\n' * 3 + PARAGRAPH) * 60, encoding="utf-8")  # > 20,000
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(text, model={"num_layers": 2}, train={"max_steps": 20})))
    assert run_cli("train", "--config", str(config), "--out", str(folder / "run")).returncode == 0
    return folder


def test_viz_writes_a_self_contained_page(viz_run, capsys):
    page = viz_run / "page.html"
    code, out, err = call(capsys, "viz", "--checkpoint", str(viz_run / "run"), "--text", str(viz_run / "input.txt"),
                          "--out", str(page), "--max-chars", "3000")
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from the network
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1))
    assert len(data["chars"]) == 3000 and set(data["channels"]) == {"forget", "input", "output", "cell"}
    assert "showing the first 3,000" in err


def test_viz_errors(viz_run, capsys):
    assert_user_error(call(capsys, "viz", "--checkpoint", str(viz_run / "run")), "give --text FILE or --prompt TEXT")
    assert_user_error(call(capsys, "viz", "--checkpoint", str(viz_run / "missing")), "checkpoint not found")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _headless(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_page_in_a_real_browser(viz_run, capsys, tmp_path):
    """20,000 characters, rendered by headless Chromium: coloured spans, and the unit selector repaints them."""
    page = viz_run / "big.html"
    assert call(capsys, "viz", "--checkpoint", str(viz_run / "run"), "--text", str(viz_run / "input.txt"),
                "--out", str(page))[0] == 0
    url = page.resolve().as_uri()

    def colours(fragment: str) -> list[str]:
        dom = _headless("--virtual-time-budget=20000", "--dump-dom", url + fragment).stdout
        spans = re.findall(r'<span data-i="\d+" style="background-color: ([^"]+);">', dom)
        assert len(spans) == 20_000, dom[:500]
        return spans

    surprisal = colours("#view=surprisal")
    forget = colours("#view=unit&layer=0&unit=0&channel=forget")
    other = colours("#view=unit&layer=1&unit=3&channel=cell")
    assert len(set(surprisal)) > 20 and surprisal != forget != other  # colours vary, and follow the selection
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "viz.png"
    _headless("--window-size=1280,800", f"--screenshot={shot}", url + "#view=unit&layer=0&unit=0&channel=forget")
    assert shot.exists() and shot.stat().st_size > 10_000


# --- plots and runs -----------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_plot_runs_overlaid(viz_run, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    in_progress = tmp_path / "running"
    in_progress.mkdir()
    lines = (viz_run / "run" / "metrics.jsonl").read_text().splitlines()
    (in_progress / "metrics.jsonl").write_text("\n".join(line for line in lines if '"end"' not in line)[:-40])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    out = tmp_path / "loss.png"
    code, stdout, err = call(capsys, "plot", str(viz_run / "run"), str(in_progress), str(empty), "--out", str(out),
                             "--unit", "bpc")
    assert code == 0, err
    assert png_size(out) == (1200, 450) and "has no loss values yet" in err


def test_plot_needs_something_and_matplotlib(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    pytest.importorskip("matplotlib")
    assert_user_error(call(capsys, "plot", str(empty), "--out", str(tmp_path / "x.png")), "nothing to plot")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert_user_error(call(capsys, "plot", str(empty)), "pip install 'charlm[plot]'")


def test_runs_table(viz_run, capsys, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(viz_run / "run", runs / "done")
    shutil.copytree(viz_run / "run", runs / "cut")
    lines = (runs / "cut" / "metrics.jsonl").read_text().splitlines()
    (runs / "cut" / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # no end event: it crashed
    shutil.copytree(viz_run / "run", runs / "live")
    (runs / "live" / ".lock").write_text(str(__import__("os").getpid()))
    code, out, err = call(capsys, "runs", str(runs))
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert "finished" in rows["done"] and "crashed" in rows["cut"] and "running" in rows["live"]
    assert "lstm 2x16" in rows["done"]


# --- live view ----------------------------------------------------------------------------

def test_sparkline():
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁" or sparkline([3.0, 2.0, 1.0])[0] == "█"
    assert sparkline([]) == "" and len(sparkline([1.0] * 5)) == 5


def test_samples_at_each_eval_and_quiet(tmp_path, text_file, write_config, capsys):
    config = write_config(tiny_config(text_file))
    code, out, err = call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "a"))
    assert code == 0 and out.count("sample at step") == 2 and "step 2 epoch" in out
    code, out, err = call(capsys, "train", "--config", str(config), "--out", str(tmp_path / "b"), "--quiet")
    assert code == 0 and "sample at step" not in out and "step 2 epoch" not in out and "val loss" in out
