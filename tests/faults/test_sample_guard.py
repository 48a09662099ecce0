"""`charlm sample` with parameters at the edge of what can be drawn from, and with a model whose
scores are NaN: text, or one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli, train_tiny_run

from charlm.inference.sample import Decoding, Undrawable, pick_next, sampling_probs
from charlm.store.checkpoint import load_checkpoint, save_checkpoint

# the reference backend: no C++ build in each fresh test cache (what is tested here is the draw)
BACKEND = ("--backend", "reference")


def rows(n=6, V=20, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, V) * 3


# --- the draw itself --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_is_greedy(temperature):
    logits = rows()
    assert torch.equal(pick_next(logits, Decoding(temperature)), logits.argmax(dim=-1))
    probs = sampling_probs(logits, Decoding(temperature))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float())


def test_a_tiny_temperature_shares_the_draws_between_tied_scores():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0]])
    assert sampling_probs(logits, Decoding(1e-300)).tolist() == [[0.0, 0.5, 0.5, 0.0]]


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46])
def test_a_subnormal_top_p_keeps_the_most_likely_id(top_p):
    logits = rows()
    assert torch.equal(pick_next(logits, Decoding(1.0, None, top_p)), logits.argmax(dim=-1))


def test_huge_temperatures_are_about_uniform():
    probs = sampling_probs(rows(V=8), Decoding(1e300))
    assert torch.allclose(probs, torch.full_like(probs, 1 / 8))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("decoding", [Decoding(0), Decoding(0.8), Decoding(1e-300), Decoding(0.8, 3, 0.5)])
def test_non_finite_scores_raise_undrawable_naming_the_rows(value, decoding):
    logits = rows()
    logits[2] = value
    logits[4, 0] = float("nan")
    with pytest.raises(Undrawable) as caught:
        pick_next(logits, decoding, torch.Generator().manual_seed(0))
    assert caught.value.rows == [2, 4]


@pytest.mark.parametrize(
    "decoding, field",
    [
        (Decoding(-1.0), "temperature"),
        (Decoding(math.inf), "temperature"),
        (Decoding(math.nan), "temperature"),
        (Decoding(top_k=0), "top_k"),
        (Decoding(top_p=0.0), "top_p"),
        (Decoding(top_p=math.nan), "top_p"),
    ],
)
def test_settings_nothing_can_be_drawn_with_are_named(decoding, field):
    assert decoding.problem().field == field
    with pytest.raises(ValueError, match=field):
        pick_next(rows(), decoding)


# --- the command ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run, *_ = train_tiny_run(tmp_path_factory.mktemp("guard"), model={"backend": "reference"})
    return run


def sample(run_dir, *args):
    return run_cli("sample", "--checkpoint", str(run_dir), "--length", "30", "--seed", "3", *BACKEND, *args)


def assert_one_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.stderr


@pytest.mark.slow
def test_sample_with_a_tiny_temperature_is_the_greedy_text(run_dir):
    greedy = sample(run_dir, "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    for temperature in ("1e-300", "5e-324"):
        tiny = sample(run_dir, "--temperature", temperature)
        assert tiny.returncode == 0 and "Traceback" not in tiny.stderr, tiny.stderr
        assert tiny.stdout == greedy.stdout
    nucleus = sample(run_dir, "--temperature", "1", "--top-p", "5e-324")
    assert nucleus.returncode == 0 and nucleus.stdout == greedy.stdout, nucleus.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, option",
    [
        (("--temperature", "inf"), "--temperature"),
        (("--temperature", "nan"), "--temperature"),
        (("--top-p", "nan"), "--top-p"),
    ],
)
def test_sample_with_a_setting_nothing_can_be_drawn_with_is_one_line(run_dir, args, option):
    assert_one_line(sample(run_dir, *args), option)


@pytest.mark.slow
@pytest.mark.parametrize("num_samples", ["1", "3"])
def test_sample_from_a_model_with_nan_weights_is_one_line(run_dir, tmp_path, num_samples):
    payload = load_checkpoint(run_dir)
    payload["model"] = {
        name: torch.full_like(value, float("nan")) if value.is_floating_point() else value
        for name, value in payload["model"].items()
    }
    broken = tmp_path / "nan.pt"
    save_checkpoint(payload, broken)
    assert_one_line(sample(broken, "--num-samples", num_samples), "not finite", "earlier checkpoint")
