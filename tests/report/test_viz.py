"""Looking inside: gate introspection, the viz page (in a real headless Chromium), plots, runs, live view."""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess

import pytest
import torch
from conftest import PARAGRAPH, ROOT, assert_user_error, call, tiny_config

from charlm.config import ModelConfig, config_yaml
from charlm.data.text import TextSettings
from charlm.data.vocab import Vocab
from charlm.models.cells import GRUCell, LSTMCell, RNNCell
from charlm.models.model import CharLM
from charlm.models.registry import CELL_TYPES, lookup
from charlm.report.page import render_page
from charlm.report.viz import inspect

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
    model = CharLM(ModelConfig(type="lstm", hidden_size=6, num_layers=2), 7, "native").eval()
    idx = torch.randint(0, 7, (2, 9))
    logits, state, trace = model(idx, None, trace="gates")
    plain_logits, plain_state = model(idx)
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, plain_state, atol=1e-5, rtol=0)
    gates = trace.gates
    assert len(gates) == 2 and len(gates[0]["forget"]) == 9 and gates[1]["cell"][0].shape == (2, 6)
    torch.testing.assert_close(gates[1]["hidden"][-1], state[0][1])  # the top layer's last h is the state's
    torch.testing.assert_close(trace.top, trace.top_dropped)  # eval: no dropout
    assert trace.top.shape == (9, 2, 6)


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_every_cell_type_shows_its_registered_channels(cell_type):
    """The page's channels, their colour scales and the tracked feature come from the registry entry."""
    torch.manual_seed(4)
    spec = lookup(cell_type)
    text = 'He said "stop (now)" and left.\n' * 3
    vocab = Vocab(sorted(set(text)))
    model = CharLM(ModelConfig(type=cell_type, hidden_size=6, num_layers=2), len(vocab), "native").eval()
    ins = inspect(model, vocab, text, TextSettings(), cell_type)
    assert list(ins.channels) == list(ins.scales) == [channel.name for channel in spec.channels]
    for channel in spec.channels:
        assert [t.shape for t in ins.channels[channel.name]] == [(len(text), 6)] * 2
        scale = ins.scales[channel.name]
        assert (scale["low"], scale["high"]) == ((channel.low, channel.high) if channel.bounded else (-1, 1))
        assert scale["legend"] == f"{channel.label}: {scale['low']:g} to {scale['high']:g}"
    page = render_page(ins, "t")
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert data["cellType"] == cell_type and set(data["scales"]) == set(data["channels"]) == set(ins.channels)


def test_inspection_surprisal_is_the_models_loss():
    torch.manual_seed(3)
    vocab = Vocab(sorted(set(PARAGRAPH)))
    model = CharLM(ModelConfig(type="lstm", hidden_size=8, num_layers=1), len(vocab), "native").eval()
    ins = inspect(model, vocab, PARAGRAPH, TextSettings(), "lstm")
    ids = vocab.encode(PARAGRAPH).ids.long()
    logits, _ = model(ids[None, :-1])
    nats = torch.nn.functional.cross_entropy(logits[0], ids[1:]).item()
    assert sum(ins.surprisal[1:]) / (len(ids) - 1) == pytest.approx(nats / 0.6931471805599453, rel=1e-4)
    assert "".join(ins.chars) == PARAGRAPH and len(ins.top5[5]) == 5
    assert ins.channels["forget"][0].shape == (len(PARAGRAPH), 8)
    assert [f["name"] for f in ins.features] == ["position in line"]  # no quotes or brackets: nothing to track
    quoted = 'He said "stop (now)" and left.\n' * 4
    vocab = Vocab(sorted(set(quoted)))
    model = CharLM(ModelConfig(type="lstm", hidden_size=8, num_layers=1), len(vocab), "native").eval()
    features = inspect(model, vocab, quoted, TextSettings(), "lstm").features
    assert {f["name"] for f in features} == {"inside quotes", "inside parentheses", "position in line"}
    assert all(f["units"] and all(r != 0 for _, _, r in f["units"]) for f in features)


# --- the page -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def viz_run(tmp_path_factory):
    from conftest import run_cli

    folder = tmp_path_factory.mktemp("viz")
    text = folder / "input.txt"
    text.write_text(('He said "stop (now)" and left.\n' * 3 + PARAGRAPH) * 70, encoding="utf-8")  # > 20,000
    config = folder / "c.yaml"
    config.write_text(config_yaml(tiny_config(text, model={"num_layers": 2}, train={"max_steps": 20})))
    assert run_cli("train", "--config", str(config), "--out", str(folder / "run")).returncode == 0
    return folder


@pytest.mark.slow
def test_viz_writes_a_self_contained_page(viz_run, capsys):
    page = viz_run / "page.html"
    code, out, err = call(
        capsys,
        "viz",
        "--checkpoint",
        str(viz_run / "run"),
        "--text",
        str(viz_run / "input.txt"),
        "--out",
        str(page),
        "--max-chars",
        "3000",
    )
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from the network
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1))
    assert len(data["chars"]) == 3000 and set(data["channels"]) == {"forget", "input", "output", "cell"}
    assert "showing the first 3,000" in err


@pytest.mark.slow
def test_viz_errors(viz_run, capsys):
    assert_user_error(call(capsys, "viz", "--checkpoint", str(viz_run / "run")), "give --text FILE or --prompt TEXT")
    assert_user_error(
        call(capsys, "viz", "--checkpoint", str(viz_run / "missing"), "--prompt", "hi"), "checkpoint not found"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "source,content,fragment",
    [
        ("--prompt", "", "--prompt is empty"),
        ("--prompt", "a", "the text has fewer than 2 characters; nothing to show"),
        ("--prompt", "ZQ€", "fewer than 2 characters the model knows (not in its vocabulary: 'Q', 'Z', '€')"),
        ("--text", "", "is empty; give a file with text in it"),
        ("--text", "ZZ\n", "fewer than 2 characters the model knows (not in its vocabulary: 'Z')"),
    ],
)
def test_viz_with_nothing_to_show_is_one_line(viz_run, tmp_path, capsys, source, content, fragment):
    """An empty text, or one the model cannot read, once ended in a torch.frombuffer traceback."""
    if source == "--text":
        path = tmp_path / "t.txt"
        path.write_text(content, encoding="utf-8")
        content = str(path)
    page = tmp_path / "page.html"
    assert_user_error(
        call(capsys, "viz", "--checkpoint", str(viz_run / "run"), source, content, "--out", str(page)), fragment
    )
    assert not page.exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _headless(*args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


HARNESS = """<!doctype html><html><body><pre id="out">pending</pre>
<iframe id="f" src="big.html#view=unit&layer=0&unit=0&channel=forget" width="1200" height="700"></iframe>
<script>
const frame = document.getElementById("f");
frame.onload = () => {
  const d = frame.contentDocument;
  const colours = () => Array.from(d.querySelectorAll("#text span"), (s) => s.style.backgroundColor);
  const choose = (id, pick) => { const el = d.getElementById(id); pick(el); el.dispatchEvent(new Event("change")); };
  const result = { forget: colours() };
  choose("channel", (el) => { el.value = "cell"; });
  result.cell = colours();
  choose("unit", (el) => { el.selectedIndex = el.options.length - 1; });
  result.otherUnit = colours();
  choose("view", (el) => { el.value = "surprisal"; });
  result.surprisal = colours();
  result.text = d.getElementById("text").textContent.length;
  document.getElementById("out").textContent = JSON.stringify(result);
};
</script></body></html>"""


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_page_in_a_real_browser(viz_run, capsys):
    """20,000 characters rendered by headless Chromium: coloured spans, and the selectors repaint them."""
    page = viz_run / "big.html"
    assert (
        call(
            capsys,
            "viz",
            "--checkpoint",
            str(viz_run / "run"),
            "--text",
            str(viz_run / "input.txt"),
            "--out",
            str(page),
        )[0]
        == 0
    )
    harness = viz_run / "harness.html"
    harness.write_text(HARNESS, encoding="utf-8")
    # The harness drives the page's own <select> elements and their change handlers inside an iframe.
    dom = _headless(
        "--allow-file-access-from-files", "--virtual-time-budget=30000", "--dump-dom", harness.resolve().as_uri()
    ).stdout
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and found.group(1) != "pending", dom[:500]
    result = json.loads(html_lib.unescape(found.group(1)))
    views = [result[k] for k in ("forget", "cell", "otherUnit", "surprisal")]
    assert all(len(v) == 20_000 for v in views) and result["text"] >= 20_000
    assert all(len(set(v)) > 20 for v in views)  # real colour variation, not one flat fill
    assert all(a != b for i, a in enumerate(views) for b in views[i + 1 :])  # every selection repaints
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "viz.png"
    _headless(
        "--window-size=1280,800",
        f"--screenshot={shot}",
        page.resolve().as_uri() + "#view=unit&layer=0&unit=0&channel=forget",
    )
    assert shot.exists() and shot.stat().st_size > 10_000


# --- minGRU through the real CLI: its page shows its own channels ------------------------------


@pytest.fixture(scope="module")
def mingru_page(viz_run, tmp_path_factory):
    from conftest import run_cli

    folder = tmp_path_factory.mktemp("mingru")
    config = folder / "c.yaml"
    config.write_text(
        config_yaml(
            tiny_config(viz_run / "input.txt", model={"type": "mingru", "num_layers": 2}, train={"max_steps": 20})
        )
    )
    assert run_cli("train", "--config", str(config), "--out", str(folder / "run")).returncode == 0
    page = folder / "mingru.html"
    result = run_cli(
        "viz",
        "--checkpoint",
        str(folder / "run"),
        "--text",
        str(viz_run / "input.txt"),
        "--out",
        str(page),
        "--max-chars",
        "3000",
    )
    assert result.returncode == 0, result.stderr
    return page


@pytest.mark.slow
def test_mingru_viz_page_has_its_channels(mingru_page):
    html = mingru_page.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1))
    assert data["cellType"] == "mingru" and len(data["chars"]) == 3000
    assert list(data["channels"]) == ["update", "candidate", "hidden"]
    assert data["scales"]["update"]["legend"] == "update gate: 0 to 1"
    assert data["scales"]["candidate"]["legend"] == "tanh(h~): -1 to 1"


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_mingru_page_in_a_real_browser(mingru_page):
    harness = mingru_page.parent / "harness.html"
    harness.write_text(
        HARNESS.replace("big.html", mingru_page.name)
        .replace("channel=forget", "channel=update")
        .replace('el.value = "cell"', 'el.value = "candidate"'),
        encoding="utf-8",
    )
    dom = _headless(
        "--allow-file-access-from-files", "--virtual-time-budget=30000", "--dump-dom", harness.resolve().as_uri()
    ).stdout
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and found.group(1) != "pending", dom[:500]
    result = json.loads(html_lib.unescape(found.group(1)))
    views = [result[k] for k in ("forget", "cell", "otherUnit", "surprisal")]  # update, candidate, ...
    assert all(len(v) == 3000 for v in views) and all(len(set(v)) > 20 for v in views)
    assert all(a != b for i, a in enumerate(views) for b in views[i + 1 :])
