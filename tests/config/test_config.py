"""Config loading: every shipped config validates; every bad key, type or range names its key."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import (
    BACKENDS,
    Config,
    ConfigError,
    SampleConfig,
    apply_override,
    config_yaml,
    load_config,
    parse_duration,
    sample_settings,
    with_absolute_paths,
)
from charlm.errors import UserError
from charlm.models.registry import CELL_TYPES, lookup

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_required_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"shakespeare_rnn.yaml", "shakespeare_lstm.yaml", "stdlib_lstm.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    head = path.read_text(encoding="utf-8").splitlines()[:4]
    assert any(f"charlm train --config configs/{path.name}" in line for line in head)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "data:\n  path: x.txt\ntrain:\n  max_steps: 10\n"
VALID_TYPES = ", ".join(repr(t) for t in CELL_TYPES[:-1]) + f" or {CELL_TYPES[-1]!r}"  # pydantic's wording


def problem(tmp_path: Path, text: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    return str(err.value)


def test_defaults_fill_in(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.model.type == "lstm" and cfg.train.lr == 2e-3 and cfg.data.val_fraction == 0.1


@pytest.mark.parametrize(
    "text,expected",
    [
        (MINIMAL + "  lr: -0.1\n", "train.lr: input should be greater than 0 (got -0.1)"),
        (MINIMAL + "  batch_size: 0\n", "train.batch_size: input should be greater than 0"),
        (MINIMAL + "  batch_size: many\n", "train.batch_size: input should be a valid integer"),
        (MINIMAL + "  lerning_rate: 1\n", "train.lerning_rate: unknown key"),
        (MINIMAL + "  lr_schedul: cosine\n", "did you mean 'lr_schedule'?"),
        (MINIMAL + "model:\n  hiden_size: 3\n", "model.hiden_size: unknown key; did you mean 'hidden_size'?"),
        (MINIMAL + "model:\n  type: gru2\n", f"model.type: input should be {VALID_TYPES} (got 'gru2')"),
        (MINIMAL + "model:\n  dropout: 1.5\n", "model.dropout: input should be less than 1"),
        (MINIMAL + "  device: gpu\n", "train.device: must be auto, cpu, cuda, cuda:N or mps"),
        (MINIMAL + "  max_time: soon\n", "train.max_time: must be a duration"),
        (MINIMAL + "  max_time: {0: null}\n", "train.max_time: must be a duration"),  # `--set train.max_time=0:`
        (MINIMAL + "  max_time: [10m]\n", "train.max_time: must be a duration"),
        (MINIMAL + "sample:\n  top_p: 1.5\n", "sample.top_p: input should be less than or equal to 1"),
        (MINIMAL + "sample:\n  temperature: -1\n", "sample.temperature: input should be greater than or equal to 0"),
        (MINIMAL + "modle:\n  type: rnn\n", "modle: unknown section; did you mean 'model'?"),
        ("train:\n  max_steps: 3\n", "data: required key is missing"),
        ("data:\n  path: x\ntrain:\n  lr: 0.1\n", "set train.max_steps or train.max_time"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("", "the config file is empty"),
        ("data:\n\tpath: x\n", "tabs are not allowed"),
        ("data:\n  path: x\n  path: y\ntrain:\n  max_steps: 1\n", "duplicate key 'path'"),
        ("data: [unclosed\n", "invalid YAML at line"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, expected):
    message = problem(tmp_path, text)
    assert expected in message
    assert str(tmp_path / "c.yaml") in message


def test_every_problem_on_its_own_line(tmp_path):
    message = problem(tmp_path, MINIMAL + "  lr: -1\n  batch_size: 0\n")
    assert len(message.splitlines()) == 2


def test_overrides_are_typed_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["train.lr=1e-3", "model.type=rnn", "sample.top_k=null", "train.max_time=90s", "model.dropout=0.25"],
    )
    assert cfg.train.lr == 1e-3 and cfg.model.type == "rnn" and cfg.sample.top_k is None
    assert cfg.train.max_time_seconds == 90 and cfg.model.dropout == 0.25


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.lrr=1", "unknown key; did you mean 'lr'?"),
        ("trian.lr=1", "unknown section 'trian'; did you mean 'train'?"),
        ("train.lr", "expected KEY=VALUE"),
        ("lr=1", "the key must be section.name"),
        ("train.lr=[1", "cannot parse value"),
        ("train.lr=fast", "train.lr: input should be a valid number"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    assert expected in problem(tmp_path, MINIMAL, override)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"data:\n  path: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text .* offset 17"):
        load_config(bad)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10 minutes", "m", "-5s", "0s", True])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(write(tmp_path, MINIMAL)))
    assert cfg.data.path == str(tmp_path / "x.txt")
    builtin = with_absolute_paths(load_config(write(tmp_path, MINIMAL), ["data.path=builtin:python-stdlib"]))
    assert builtin.data.path == "builtin:python-stdlib"


def test_sample_settings_validate_cli_options():
    base = SampleConfig()
    assert sample_settings(base, length=7, top_k=None).length == 7
    with pytest.raises(ConfigError, match="--top-p: input should be greater than 0"):
        sample_settings(base, top_p=0.0)
    with pytest.raises(ConfigError, match="--length: input should be less than or equal to 1000000"):
        sample_settings(base, length=10**9)


# --- property-based: config loading either succeeds or raises the one user-error type -------

_scalars = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True) | st.text(max_size=12)
_documents = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["data", "model", "train", "sample", "path", "lr", "max_steps", "type", "x"])
            | st.text(max_size=6),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


def _load_text(text: str, overrides=()):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_config(path, overrides)
        except UserError:
            return None


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(_documents)
def test_random_yaml_documents(document):
    _load_text(config_yaml(document))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_random_yaml_text(text):
    _load_text(text)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(max_size=30)
        | st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(
                [
                    "train.lr",
                    "train.max_steps",
                    "model.type",
                    "sample.top_p",
                    "data.path",
                    "train.max_time",
                    "x.y",
                    "train",
                ]
            ),
            st.text(max_size=10),
        ),
        max_size=4,
    )
)
def test_random_overrides(overrides):
    _load_text(MINIMAL, overrides)
    raw = {"data": {"path": "x"}, "train": {"max_steps": 1}}
    for assignment in overrides:
        try:
            apply_override(raw, assignment)
        except UserError:
            pass


def test_weight_dropout_is_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL + "model:\n  weight_dropout: 1.0\n")
    with pytest.raises(ConfigError, match="model.weight_dropout: input should be less than 1"):
        load_config(path)
    path.write_text(MINIMAL + "model:\n  weight_dropout: 0.3\n")
    assert load_config(path).model.weight_dropout == 0.3


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_every_cell_type_loads_with_each_backend_it_supports(tmp_path, cell_type):
    spec = lookup(cell_type)
    for backend in spec.backends:
        cfg = load_config(write(tmp_path, MINIMAL), [f"model.type={cell_type}", f"model.backend={backend}"])
        assert (cfg.model.type, cfg.model.backend) == (cell_type, backend)
    for backend in sorted(set(BACKENDS) - set(spec.backends)):
        message = problem(tmp_path, MINIMAL, f"model.type={cell_type}", f"model.backend={backend}")
        assert len(message.splitlines()) == 1
        assert f"model.backend: model.type {cell_type} cannot run on the {backend} backend" in message
        assert f"use {' or '.join(spec.backends)} (got '{backend}')" in message


def test_mingru_rejects_the_fused_backend_and_weight_dropout(tmp_path):
    """minGRU has no torch kernel and no weight_hh: each is one line naming its key and what to do."""
    assert "use native or reference (got 'fused')" in problem(
        tmp_path, MINIMAL + "model:\n  type: mingru\n  backend: fused\n"
    )
    message = problem(tmp_path, MINIMAL + "model:\n  type: mingru\n  weight_dropout: 0.2\n")
    assert message == (
        f"{tmp_path / 'c.yaml'}: model.weight_dropout: model.type mingru has no recurrent weights "
        "(weight_hh) for model.weight_dropout to drop; set it to 0 (got 0.2)"
    )
    cfg = load_config(write(tmp_path, MINIMAL + "model:\n  type: mingru\n  weight_dropout: 0\n"))
    assert (cfg.model.type, cfg.model.backend) == ("mingru", "auto")  # kept as written: resolved by the run
