"""`charlm export`: safetensors round trips back into charlm (and reads with safetensors alone); the ONNX
single-step model matches charlm in onnxruntime step by step for every cell type at batch sizes 1 and 3;
scripts/onnx_sample.py samples from the .onnx file with numpy and onnxruntime only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import PARAGRAPH, ROOT, load_script, run_cli, tiny_config, train_tiny_run
from safetensors import safe_open
from safetensors.torch import save_file

from charlm.cli import main
from charlm.config import ModelConfig, validate_config
from charlm.data.text import TextSettings
from charlm.data.vocab import BOS_TOKEN, EOS_TOKEN, UNK, Vocab
from charlm.errors import UserError
from charlm.export.onnx_format import SingleStep, write_onnx
from charlm.export.safetensors_format import load_safetensors
from charlm.inference.sample import Decoding, generate, prompt_ids
from charlm.models.cells import Cell
from charlm.models.model import CharLM
from charlm.models.registry import CELL_TYPES, REGISTRY, CellSpec, lookup
from charlm.store.checkpoint import load_checkpoint, model_from_checkpoint

SCRIPT = ROOT / "scripts" / "onnx_sample.py"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny 2-layer LSTM trained once through the real CLI, with a prompt in its sample section."""
    run_dir, text_file, _, _ = train_tiny_run(
        tmp_path_factory.mktemp("export"), model={"num_layers": 2}, sample={"prompt": "It was"}
    )
    return run_dir, text_file


@pytest.fixture(scope="module")
def onnx_file(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    result = run_cli("export", "--checkpoint", str(run[0]), "--format", "onnx", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def call(capsys, *argv: str) -> subprocess.CompletedProcess:
    """The CLI in-process (what `charlm ARGS` runs, without a new interpreter): its code and output."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exit_info.value.code, out, err)


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: "), result.stderr
    assert fragment in lines[0], result.stderr


def checkpoint_model(run_dir: Path):
    model, vocab = model_from_checkpoint(load_checkpoint(run_dir))
    return model, vocab


# --- safetensors ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_safetensors_round_trip_through_the_cli(run, tmp_path, capsys):
    run_dir, text_file = run
    out = tmp_path / "tiny.safetensors"
    result = run_cli("export", "--checkpoint", str(run_dir), "--out", str(out))  # format from the suffix
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out} (safetensors") and "LSTM 2x16" in result.stdout

    loaded = load_safetensors(out)
    model, vocab = checkpoint_model(run_dir)
    saved = validate_config(load_checkpoint(run_dir)["config"])
    # an export keeps data.path's file name only, not the folders of the machine that trained it
    saved = saved.model_copy(update={"data": saved.data.model_copy(update={"path": Path(saved.data.path).name})})
    assert loaded.vocab == vocab and loaded.config == saved
    assert loaded.training["step"] == load_checkpoint(run_dir)["step"]
    ids = torch.randint(len(vocab), (3, 25))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids)[0], model(ids)[0])  # the same weights, bit for bit

    args = ("--prompt", "It was", "--length", "40", "--seed", "5", "--temperature", "0.9")
    from_run = call(capsys, "sample", "--checkpoint", run_dir, *args)
    from_file = call(capsys, "sample", "--checkpoint", out, *args)
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == from_run.stdout and from_file.stdout.startswith("It was")
    scored = [
        json.loads(call(capsys, "eval", "--checkpoint", path, "--text", text_file, "--json").stdout)
        for path in (run_dir, out)
    ]
    assert scored[0]["loss_nats"] == scored[1]["loss_nats"]
    info = call(capsys, "info", "--checkpoint", out, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["vocab_size"] == len(vocab)
    converted = call(
        capsys, "export", "--checkpoint", out, "--out", tmp_path / "from_safetensors.onnx", "--check-steps", "8"
    )  # the safetensors file is a source for ONNX too
    assert converted.returncode == 0, converted.stderr
    assert "checked in onnxruntime against charlm over 8 steps" in converted.stdout


@pytest.mark.slow
def test_safetensors_reads_with_safetensors_alone(run, tmp_path, capsys):
    """What README shows: tensors by their state_dict names, config and vocabulary as JSON metadata."""
    out = tmp_path / "tiny.safetensors"
    assert call(capsys, "export", "--checkpoint", run[0], "--format", "safetensors", "--out", out).returncode == 0
    with safe_open(str(out), framework="np") as handle:
        metadata = handle.metadata()
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    config, vocab = json.loads(metadata["charlm.config"]), json.loads(metadata["charlm.vocab"])
    assert config["model"]["type"] == "lstm" and config["model"]["num_layers"] == 2
    assert vocab == {"unit": "chars", "specials": [], "chars": "".join(sorted(set(PARAGRAPH)))}
    model, _ = checkpoint_model(run[0])
    assert set(weights) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert np.array_equal(weights[name], tensor.numpy()), name


@pytest.mark.slow
def test_foreign_damaged_and_newer_safetensors_are_one_line(run, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert_user_error(call(capsys, "sample", "--checkpoint", foreign), "was not written by charlm export")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_user_error(call(capsys, "eval", "--checkpoint", damaged, "--text", run[1]), "damaged")
    good = tmp_path / "good.safetensors"
    assert call(capsys, "export", "--checkpoint", run[0], "--out", good).returncode == 0
    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    newer = tmp_path / "newer.safetensors"
    save_file(weights, str(newer), metadata={**metadata, "charlm.format_version": "99"})
    assert_user_error(call(capsys, "info", "--checkpoint", newer), "upgrade charlm")


# --- ONNX: the maths, in float64 -------------------------------------------------------------------------


def tiny_model(
    cell_type: str,
    input: str = "embedding",
    backend: str = "reference",
    unit: str = "chars",
    documents: bool = False,
    dtype=torch.float32,
):
    """A randomly initialised model and what describes it, built in-process (no training needed)."""
    specials = (BOS_TOKEN, EOS_TOKEN) if documents else ()
    chars = [] if unit == "bytes" else sorted(set(PARAGRAPH) - ({"\n"} if documents else set()))
    vocab = Vocab(chars, unit, specials)
    cfg = validate_config(
        tiny_config(
            Path("unused.txt"),
            model={"type": cell_type, "num_layers": 2, "input": input, "backend": backend},
            data={"unit": unit, "documents": "lines" if documents else "none"},
            sample={"prompt": "It was"},
        )
    )
    torch.manual_seed(0)
    model = CharLM(cfg.model, len(vocab)).to(dtype).eval()
    return model, vocab, cfg


def every_cell_type(flip: int) -> list[tuple[str, str]]:
    """Every registered cell type, each with one input kind: alternating, `flip` says which comes first."""
    kinds = ("embedding", "onehot")
    return [(cell_type, kinds[(k + flip) % 2]) for k, cell_type in enumerate(CELL_TYPES)]


@pytest.mark.parametrize("cell_type,input", every_cell_type(1))
def test_single_step_module_is_the_model_one_step_at_a_time(cell_type, input):
    model, vocab, _ = tiny_model(cell_type, input, dtype=torch.float64)
    step = SingleStep(model)
    ids = torch.randint(len(vocab), (3, 12))  # [B, T]
    state = tuple(0.5 * torch.randn_like(s) for s in model.init_state(3))  # not blank: the state in is used
    with torch.no_grad():
        logits, final = model(ids, state)  # [B, T, V]
        carried = state
        for t in range(ids.shape[1]):
            step_logits, *carried = step(ids[:, t], *carried)
            torch.testing.assert_close(step_logits, logits[:, t], rtol=0, atol=1e-12)
    for a, b in zip(carried, final):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --- ONNX: onnxruntime against charlm ---------------------------------------------------------------------


def parity(path: Path, model, vocab, batch_size: int, steps: int = 12) -> tuple[float, float]:
    """Run both from the same random state on the same random ids, each carrying its own state;
    the largest absolute differences of logits and of states over all steps."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    ids = torch.randint(len(vocab), (batch_size, steps))
    ours = tuple(0.5 * torch.randn_like(s) for s in model.init_state(batch_size))
    theirs = [s.numpy() for s in ours]
    worst_logits = worst_state = 0.0
    with torch.no_grad():
        for t in range(steps):
            logits, ours = model(ids[:, t : t + 1], ours)
            out = session.run(None, dict(zip(names, [ids[:, t].numpy(), *theirs])))
            theirs = out[1:]
            worst_logits = max(worst_logits, float(np.abs(logits[:, 0].numpy() - out[0]).max()))
            worst_state = max(worst_state, *(float(np.abs(a.numpy() - b).max()) for a, b in zip(ours, theirs)))
    return worst_logits, worst_state


@pytest.mark.slow
@pytest.mark.parametrize("cell_type,input", every_cell_type(0))
def test_onnx_matches_charlm_for_each_cell_type_at_any_batch_size(cell_type, input, tmp_path):
    backend = "fused" if lookup(cell_type).fused else "reference"  # torch's kernel where it has one
    model, vocab, cfg = tiny_model(cell_type, input, backend)
    path = tmp_path / f"{cell_type}.onnx"
    write_onnx(path, model, vocab, cfg, {"step": 0})
    names = [node.name for node in onnx.load(str(path)).graph.input]
    assert names == ["ids", *lookup(cell_type).cell_class().state_names]  # the cell's own state, as many as it has
    for batch_size in (1, 3):  # one file: the batch axis is dynamic
        logits, state = parity(path, model, vocab, batch_size)
        assert logits < TOLERANCE and state < TOLERANCE, (batch_size, logits, state)


class ThreeStateCell(Cell):
    """A toy cell with three state tensors, registered only by the test below: what a new cell type
    whose state is not (h,) or (h, c) exports as, with no change to the exporter."""

    state_names = ("h", "c", "n")

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        self.weight_ih = torch.nn.Parameter(0.5 * torch.randn(hidden_size, input_size))
        self.bias_ih = torch.nn.Parameter(0.1 * torch.randn(hidden_size))

    def project_input(self, x):
        return torch.nn.functional.linear(x, self.weight_ih, self.bias_ih)

    def step(self, gx, state, record=None, weight_hh=None):
        h, c, n = state
        c = 0.5 * c + torch.tanh(gx)
        n = 0.9 * n + 0.1 * h
        return (torch.tanh(c - n), c, n)


@pytest.mark.slow
def test_a_new_cell_type_exports_its_own_state(monkeypatch, tmp_path):
    spec = CellSpec(
        name="three",
        title="Three",
        cell=f"{__name__}:ThreeStateCell",
        channels=(),
        feature_channel="hidden",
        recurrent_weights=False,
        native=None,
        fused=None,
    )
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    _, vocab, cfg = tiny_model("lstm")  # what the metadata describes; the model is the toy one
    torch.manual_seed(0)
    model = CharLM(
        ModelConfig.model_construct(type="three", hidden_size=6, num_layers=2, embedding_dim=5), len(vocab), "reference"
    ).eval()
    path = tmp_path / "three.onnx"
    write_onnx(path, model, vocab, cfg, {"step": 0})
    graph = onnx.load(str(path)).graph
    assert [node.name for node in graph.input] == ["ids", "h", "c", "n"]
    assert [node.name for node in graph.output] == ["logits", "next_h", "next_c", "next_n"]
    for batch_size in (1, 3):
        logits, state = parity(path, model, vocab, batch_size)
        assert logits < TOLERANCE and state < TOLERANCE, (batch_size, logits, state)


@pytest.mark.slow
def test_onnx_export_through_the_cli(run, onnx_file):
    path, result = onnx_file
    assert result.stdout.startswith(f"wrote {path} (onnx")
    assert (
        "checked in onnxruntime against charlm over 50 steps from the prompt 'It was' at batch sizes 1 and 3"
        in result.stdout
        and "every entry within" in result.stdout
    )
    graph = onnx.load(str(path))
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.graph.input, *graph.graph.output]
    }
    assert shapes == {
        "ids": ["batch"],
        "h": [2, "batch", 16],
        "c": [2, "batch", 16],
        "logits": ["batch", shapes["logits"][1]],
        "next_h": [2, "batch", 16],
        "next_c": [2, "batch", 16],
    }
    metadata = {p.key: p.value for p in graph.metadata_props}
    model, vocab = checkpoint_model(run[0])
    assert json.loads(metadata["charlm.vocab"]) == vocab.to_dict() and shapes["logits"][1] == len(vocab)
    assert json.loads(metadata["charlm.config"])["sample"]["prompt"] == "It was"
    for batch_size in (1, 3):
        logits, state = parity(path, model, vocab, batch_size, steps=20)
        assert logits < TOLERANCE and state < TOLERANCE, (batch_size, logits, state)


# --- scripts/onnx_sample.py -------------------------------------------------------------------------------


def run_script(*args: str, blocker: Path) -> subprocess.CompletedProcess:
    """The script in a Python where `import torch` fails (blocker/torch.py comes first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def no_torch(tmp_path) -> Path:
    folder = tmp_path / "no_torch"
    folder.mkdir()
    (folder / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    return folder


@pytest.mark.slow
def test_onnx_sample_needs_no_torch_and_matches_charlm_sample(run, onnx_file, no_torch):
    path, _ = onnx_file
    args = ("--prompt", "It was", "--length", "40", "--temperature", "0")
    greedy = run_script(str(path), *args, blocker=no_torch)
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout == run_cli("sample", "--checkpoint", str(run[0]), *args).stdout
    top1 = run_script(
        str(path), "--prompt", "It was", "--length", "40", "--top-k", "1", "--seed", "2", blocker=no_torch
    )
    assert top1.stdout == greedy.stdout  # top_k 1 is argmax whatever the temperature
    drawn = [
        run_script(str(path), "--length", "30", "--seed", "7", "--num-samples", "3", "--top-p", "0.9", blocker=no_torch)
        for _ in range(2)
    ]
    assert drawn[0].returncode == 0, drawn[0].stderr
    assert drawn[0].stdout == drawn[1].stdout and drawn[0].stdout.count("==> sample ") == 3
    assert drawn[0].stdout.split("\n")[1].startswith("It was")  # the config's prompt by default
    bad = run_script(str(path), "--prompt", "It was \u2603", blocker=no_torch)
    assert bad.returncode == 2 and "never saw in training" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "unit,specials,documents,newlines",
    [
        ("chars", (), False, "keep"),
        ("chars", (UNK,), False, "lf"),
        ("bytes", (), False, "keep"),
        ("chars", (UNK, BOS_TOKEN, EOS_TOKEN), True, "keep"),
        ("bytes", (BOS_TOKEN, EOS_TOKEN), True, "lf"),
    ],
)
def test_script_reads_prompts_and_decodes_as_charlm(unit, specials, documents, newlines):
    script = load_script("onnx_sample")
    chars = [] if unit == "bytes" else sorted(set("It was the best of times, ") - ({"\n"} if documents else set()))
    vocab = Vocab(chars, unit, specials)
    data = {"unit": unit, "newlines": newlines, "normalize": "none", "documents": "lines" if documents else "none"}
    settings = TextSettings(unit=unit, newlines=newlines, documents=data["documents"])
    theirs = script.Vocabulary(vocab.to_dict())
    prompts = ["It was", "\n", "best\r\nof\n\ntimes\n", "  ", "times,\nIt"]
    if UNK in specials or unit == "bytes":
        prompts += ["It was \u00e9t\u00e9 \u2603"]
    for prompt in prompts:
        assert read(lambda prompt=prompt: script.prompt_ids(theirs, data, prompt), script.UsageError) == read(
            lambda prompt=prompt: prompt_ids(vocab, prompt, settings)[0].tolist(), UserError
        ), prompt
    ids = torch.randint(len(vocab), (200,)).tolist()
    decoder = script.Decoder(theirs)
    assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == vocab.decode(ids)


def read(ids, error: type) -> list[int] | str:
    """The ids, or "refused" where the prompt has characters the model cannot read."""
    try:
        return ids()
    except error as err:
        assert "never saw in training" in str(err)
        return "refused"


def test_script_decoding_rules():
    script = load_script("onnx_sample")
    rng = np.random.default_rng(0)
    logits = np.array([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.5, -2.0]], dtype=np.float32)
    argmax = logits.argmax(-1)
    assert (script.pick_next(logits, 0.0, None, None, rng) == argmax).all()
    assert (script.pick_next(logits, 1.5, 1, None, rng) == argmax).all()
    assert (script.pick_next(logits, 1.0, None, 1e-6, rng) == argmax).all()
    draws = np.array([script.pick_next(logits[:1], 0.7, 2, None, rng)[0] for _ in range(4000)])
    assert set(draws) == {1, 3}  # top-k 2 keeps ids 1 and 3 only
    expected = np.exp(2.0 / 0.7) / (np.exp(2.0 / 0.7) + np.exp(1.9 / 0.7))
    assert abs((draws == 1).mean() - expected) < 0.03


# --- mistakes ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_mistakes_are_one_line(run, tmp_path, capsys):
    run_dir = run[0]
    assert_user_error(
        call(capsys, "export", "--checkpoint", run_dir, "--out", tmp_path / "m.bin"), "cannot tell the format"
    )
    assert_user_error(
        call(capsys, "export", "--checkpoint", run_dir, "--format", "gguf", "--out", tmp_path / "m"),
        "--format must be safetensors or onnx",
    )
    assert_user_error(
        call(capsys, "export", "--checkpoint", run_dir, "--out", tmp_path / "no" / "m.onnx"), "does not exist"
    )
    assert_user_error(
        call(capsys, "export", "--checkpoint", tmp_path / "none", "--out", tmp_path / "m.onnx"), "not found"
    )
    assert_user_error(call(capsys, "export", "--checkpoint", run_dir, "--out", tmp_path), "is a folder")


@pytest.mark.slow
def test_a_missing_extra_names_it(run, tmp_path):
    """onnxscript (or safetensors) absent: one line saying to install charlm[export], exit 2."""
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    for name in ("onnxscript", "safetensors"):
        (blocker / f"{name}.py").write_text(f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n')
    env = {**os.environ, "PYTHONPATH": str(blocker)}

    def charlm(*args):
        return subprocess.run(
            [sys.executable, "-m", "charlm", *args], env=env, capture_output=True, text=True, timeout=300
        )

    result = charlm("export", "--checkpoint", str(run[0]), "--out", str(tmp_path / "m.onnx"))
    assert_user_error(
        result, "charlm export needs the export extra (onnxscript is not installed): pip install 'charlm[export]'"
    )
    assert not (tmp_path / "m.onnx").exists()
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert_user_error(
        charlm("sample", "--checkpoint", str(tmp_path / "m.safetensors")),
        "needs the export extra (safetensors is not installed)",
    )


def test_onnx_check_inputs_start_from_the_prompt():
    """The CLI's check feeds the config's prompt, then charlm's own continuations, different per row."""
    from charlm.export.onnx_check import check_inputs

    model, vocab, cfg = tiny_model("gru", "embedding", "fused")
    ids = check_inputs(model, vocab, cfg, 30, 3)
    prompt, _ = prompt_ids(vocab, "It was", TextSettings())
    assert ids.shape == (3, 30) and (ids[:, : len(prompt)] == prompt).all()
    assert len({tuple(row) for row in ids.tolist()}) == 3
    continued = generate(
        model, prompt, 30 - len(prompt), 3, Decoding(temperature=1.0), torch.Generator().manual_seed(0)
    )
    assert torch.equal(ids[:, len(prompt) :], continued)
