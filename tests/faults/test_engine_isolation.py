"""One request cannot take the serving engine's batch down with it.

Whatever a request asks for (a temperature so small that its scaled scores overflow, a subnormal
top_p, a top_k of 0, n = 0, an empty prompt) and whatever scores the model gives one row (NaN,
+inf, all -inf), that request ends alone: it either draws (a tiny temperature is greedy decoding)
or gets its own error event, and an innocent request beside it in the batch ends with its full text.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import PARAGRAPH, Collect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.inference.sample import Decoding, generate, make_generator
from charlm.models.model import CharLM
from charlm.serving.api import Limits, RequestError, parse_request
from charlm.serving.completion import Completion
from charlm.serving.engine import Engine

INNOCENT_TOKENS = 300  # longer than any other request here, so it is still in the batch when they end
INNOCENT_PROMPT = "it was the "
WAIT = 60  # seconds for a request that should end (a hang fails the test instead of stalling it)
CPU = torch.device("cpu")


class PoisonedScores(torch.nn.Module):
    """A model whose scores for a row are `value` at every position where that row reads `poison`:
    a row that reads the poisoned character (in its prompt, or drawn) cannot draw its next one."""

    def __init__(self, inner: torch.nn.Module, poison: int, value: float):
        super().__init__()
        self.inner, self.poison, self.value = inner, poison, value

    def forward(self, ids, state=None):
        logits, state = self.inner(ids, state)  # [B, T, V]
        return logits.masked_fill((ids == self.poison)[..., None].to(logits.device), self.value), state


@pytest.fixture(scope="module")
def served():
    """A tiny untrained model, its vocabulary, the innocent request's prompt and greedy text, and a
    character that greedy text never uses (to poison)."""
    torch.manual_seed(0)
    vocab = Vocab.from_text(PARAGRAPH * 3)
    # the reference backend: the engine's draw is what is tested, and it needs no C++ build (tens of
    # seconds on a test run's fresh cache)
    model = CharLM(
        ModelConfig(type="lstm", hidden_size=24, num_layers=2, embedding_dim=8), len(vocab), "reference"
    ).eval()
    ids = vocab.encode(INNOCENT_PROMPT).ids.long()
    expected = greedy_text(model, vocab, ids, INNOCENT_TOKENS)
    clean = greedy_text(model, vocab, vocab.encode("the ").ids.long(), 40)  # another greedy request's
    unused = [c for c in vocab.chars if c not in expected + clean + INNOCENT_PROMPT + "\n"]
    assert unused, "the innocent text uses every character: pick another prompt"
    return model, vocab, ids, expected, unused[0]


def greedy_text(model, vocab, ids, length, n=1):
    out = generate(model, ids, length, n, Decoding(temperature=0))
    return [vocab.decode(row.tolist()) for row in out] if n > 1 else vocab.decode(out[0].tolist())


def completion(ids, max_tokens, decoding, seed=1, **fields) -> Completion:
    return Completion(ids, max_tokens, decoding, make_generator(CPU, seed)[0], **fields)


def beside_innocent(model, vocab, innocent_ids, others: list[Completion], wait=WAIT) -> Collect:
    """Run `others` (their sinks Collect instances) beside a long greedy request, all joining at the
    engine's first step; the innocent request's events. Every request must end within `wait` seconds."""
    engine = Engine(model, vocab, max_requests=64)
    innocent = Collect()
    engine.submit(completion(innocent_ids, INNOCENT_TOKENS, Decoding(temperature=0), sink=innocent))
    for job in others:
        job.sink.beside = innocent
        engine.submit(job)
    engine.start()
    try:
        for job in others:
            assert job.sink.done.wait(wait), f"a request with {job.decoding}, n={job.n} never ended"
        assert innocent.done.wait(wait), "the innocent request never ended"
        assert engine.in_flight == 0
    finally:
        engine.stop()
    return innocent


def assert_full_text(innocent: Collect, expected: str) -> None:
    assert innocent.errors() == []
    assert innocent.events[-1] == {"done": True}
    assert [(e["finish_reason"], e["tokens"]) for e in innocent.finals()] == [("length", INNOCENT_TOKENS)]
    assert innocent.texts()[0] == expected


# --- parameters that made the scores overflow ----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-40, 1e-30])
def test_a_tiny_temperature_is_greedy_decoding_and_fails_no_one(served, temperature):
    model, vocab, innocent_ids, expected, _ = served
    ids = vocab.encode("the ").ids.long()
    tiny = Collect()
    innocent = beside_innocent(model, vocab, innocent_ids, [completion(ids, 40, Decoding(temperature), n=2, sink=tiny)])
    assert tiny.errors() == [] and tiny.overlapped
    # the limit of the distribution as the temperature goes to 0: all mass on the most likely id
    assert tiny.texts(2) == greedy_text(model, vocab, ids, 40, n=2)
    assert_full_text(innocent, expected)


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46])
def test_a_subnormal_top_p_keeps_the_most_likely_character(served, top_p):
    model, vocab, innocent_ids, expected, _ = served
    ids = vocab.encode("the ").ids.long()
    nucleus = Collect()
    innocent = beside_innocent(
        model, vocab, innocent_ids, [completion(ids, 40, Decoding(1.0, None, top_p), sink=nucleus)]
    )
    assert nucleus.errors() == [] and nucleus.overlapped
    assert nucleus.texts() == [greedy_text(model, vocab, ids, 40)]
    assert_full_text(innocent, expected)


def test_a_huge_temperature_draws_from_every_character(served):
    model, vocab, innocent_ids, expected, _ = served
    wild = Collect()
    innocent = beside_innocent(
        model, vocab, innocent_ids, [completion(vocab.encode("the ").ids.long(), 200, Decoding(1e300), sink=wild)]
    )
    assert wild.errors() == [] and len(wild.texts()[0]) == 200
    assert len(set(wild.texts()[0])) > len(vocab) // 2  # about uniform: most characters show up in 200
    assert_full_text(innocent, expected)


# --- a model's non-finite scores ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "decoding",
    [Decoding(temperature=0), Decoding(0.8), Decoding(0.8, 5, 0.9)],
    ids=["greedy", "sampled", "top-k-top-p"],
)
def test_non_finite_scores_for_one_row_fail_only_its_request(served, value, decoding):
    model, vocab, innocent_ids, expected, poison = served
    poisoned = PoisonedScores(model, vocab.encode(poison).ids.item(), value)
    bad, clean = Collect(), Collect()
    innocent = beside_innocent(
        poisoned,
        vocab,
        innocent_ids,
        [
            completion(vocab.encode("the " + poison).ids.long(), 40, decoding, n=2, sink=bad),
            completion(vocab.encode("the ").ids.long(), 40, Decoding(temperature=0), sink=clean),
        ],
    )
    assert len(bad.errors()) == 1 and bad.events == [{"error": bad.errors()[0], "status": 500}] and bad.overlapped
    assert "not finite" in bad.errors()[0]
    assert clean.errors() == [] and clean.texts() == [greedy_text(model, vocab, vocab.encode("the ").ids.long(), 40)]
    assert_full_text(innocent, expected)


def test_a_row_that_draws_into_nan_scores_mid_stream_fails_alone(served):
    """A request streams until one of its rows reads the poisoned character; then it ends with its
    error, after the text it had sent, and the innocent request goes on."""
    model, vocab, innocent_ids, expected, poison = served
    poisoned = PoisonedScores(model, vocab.encode(poison).ids.item(), float("nan"))
    wild = Collect()
    # temperature 100 is about uniform: in 400 draws the poisoned character is all but certain
    innocent = beside_innocent(
        poisoned,
        vocab,
        innocent_ids,
        [completion(vocab.encode("the ").ids.long(), 400, Decoding(100.0), n=3, seed=5, sink=wild)],
    )
    assert wild.errors() and wild.events[-1] == {"error": wild.errors()[0], "status": 500} and wild.overlapped
    # the row that drew the poisoned character sent it (the draw was fine), then failed at its next draw
    texts = wild.texts(3)
    assert sum(text.count(poison) for text in texts) == 1 and any(text.endswith(poison) for text in texts), texts
    assert_full_text(innocent, expected)


# --- requests the engine cannot serve at all ------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(decoding=Decoding(temperature=-1.0)), "temperature"),
        (dict(decoding=Decoding(temperature=float("nan"))), "temperature"),
        (dict(decoding=Decoding(temperature=float("inf"))), "temperature"),
        (dict(decoding=Decoding(top_k=0)), "top_k"),
        (dict(decoding=Decoding(top_k=-3)), "top_k"),
        (dict(decoding=Decoding(top_p=0.0)), "top_p"),
        (dict(decoding=Decoding(top_p=1.5)), "top_p"),
        (dict(decoding=Decoding(top_p=float("nan"))), "top_p"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=[0, 10**6]), "prompt"),
        (dict(prompt=[-1]), "prompt"),
    ],
)
def test_a_request_the_engine_cannot_serve_gets_its_own_error(served, fields, named):
    model, vocab, innocent_ids, expected, _ = served
    prompt = torch.tensor(fields.pop("prompt", [1, 2, 3]), dtype=torch.long)
    job = dict(max_tokens=20, decoding=Decoding(), n=1)
    job.update(fields)
    refused = Collect()
    innocent = beside_innocent(
        model,
        vocab,
        innocent_ids,
        [completion(prompt, job["max_tokens"], job["decoding"], n=job["n"], sink=refused)],
        wait=20,
    )
    assert len(refused.events) == 1 and named in refused.errors()[0], refused.events
    assert refused.events[0]["status"] == 400  # the server answers 400: the request, not the server, is at fault
    assert_full_text(innocent, expected)


# --- fuzzing: any parameters, any prompt ----------------------------------------------------------------


def _servable(decoding: Decoding, n: int, max_tokens: int, prompt: list[int], vocab_size: int) -> bool:
    """What the engine can serve, said independently of its code."""
    t, k, p = decoding.temperature, decoding.top_k, decoding.top_p
    return (
        math.isfinite(t)
        and t >= 0
        and (k is None or k >= 1)
        and (p is None or 0 < p <= 1)
        and n >= 1
        and max_tokens >= 1
        and len(prompt) >= 1
        and all(0 <= i < vocab_size for i in prompt)
    )


_edge_floats = st.sampled_from(
    [
        0.0,
        -0.0,
        5e-324,
        1e-310,
        1e-300,
        1e-46,
        1e-45,
        1e-38,
        1e-6,
        0.5,
        1.0,
        1.5,
        100.0,
        1e38,
        1e300,
        float("inf"),
        float("-inf"),
        float("nan"),
        -1.0,
    ]
)
_temperatures = _edge_floats | st.floats(allow_nan=True, allow_infinity=True)
_top_ps = st.none() | _edge_floats | st.floats(0, 1, exclude_min=True)
_top_ks = st.none() | st.integers(-3, 40)
_stops = st.lists(st.text(alphabet="ithe wasy", max_size=3), max_size=3)

FUZZ = settings(
    max_examples=40,
    deadline=30_000,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.slow
@FUZZ
@given(
    data=st.data(),
    temperature=_temperatures,
    top_k=_top_ks,
    top_p=_top_ps,
    n=st.integers(0, 4),
    max_tokens=st.integers(0, 30),
    stop=_stops,
    seed=st.integers(0, 2**32),
)
def test_fuzz_any_parameters_beside_an_innocent_request(
    served, data, temperature, top_k, top_p, n, max_tokens, stop, seed
):
    model, vocab, innocent_ids, expected, _ = served
    prompt = data.draw(
        st.lists(st.integers(-1, len(vocab)), max_size=40)
        | st.lists(st.integers(0, len(vocab) - 1), min_size=1, max_size=40),
        label="prompt",
    )
    decoding = Decoding(temperature, top_k, top_p)
    other = Collect()
    innocent = beside_innocent(
        model,
        vocab,
        innocent_ids,
        [
            Completion(
                torch.tensor(prompt, dtype=torch.long),
                max_tokens,
                decoding,
                make_generator(CPU, seed)[0],
                n=n,
                stop=tuple(stop),
                sink=other,
            )
        ],
        wait=20,
    )
    assert_full_text(innocent, expected)
    if _servable(decoding, n, max_tokens, prompt, len(vocab)):
        assert other.errors() == [] and other.events[-1] == {"done": True}
        finals = other.finals()
        assert sorted(e["index"] for e in finals) == list(range(n))
        assert all(e["finish_reason"] in ("length", "stop") and 1 <= e["tokens"] <= max_tokens for e in finals)
        assert all(len(text) <= max_tokens for text in other.texts(n))
    else:
        assert len(other.events) == 1 and other.errors(), other.events


_json_values = (
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats()
    | st.text(max_size=5)
    | st.lists(st.text(alphabet="the ", max_size=3), max_size=5)
)


def _mostly(valid, junk=_json_values):
    """`valid` seven times in eight, else any JSON value: most bodies should reach the engine."""
    return st.integers(0, 7).flatmap(lambda k: junk if k == 0 else valid)


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {
            "temperature": _mostly(_edge_floats | st.floats(0, 100)),
            "top_p": _mostly(_edge_floats | st.floats(0, 1)),
        },
        optional={
            "prompt": _mostly(st.text(alphabet="the wasi,.", max_size=40)),
            "top_k": _mostly(st.integers(-1, 40)),
            "n": _mostly(st.integers(0, 4) | st.just(17)),
            "max_tokens": _mostly(st.integers(0, 40) | st.just(41)),
            "stop": _mostly(_stops),
            "seed": _mostly(st.integers(0, 2**64)),
        },
    )
)
def test_fuzz_the_api_refuses_with_a_named_field_or_the_engine_serves_it(served, body):
    """Every request body is refused (400, naming the field) or served to its end beside the innocent one."""
    model, vocab, innocent_ids, expected, _ = served
    try:
        request = parse_request(json.dumps(body).encode(), Limits(max_tokens=40))
    except RequestError as err:
        assert err.status == 400
        assert any(err.message.startswith(field) for field in body), (body, err.message)
        return
    known = "".join(c for c in request.prompt if c in vocab.chars)
    ids = vocab.encode(known or "\n").ids.long()
    other = Collect()
    innocent = beside_innocent(
        model,
        vocab,
        innocent_ids,
        [
            completion(
                ids,
                request.max_tokens,
                request.decoding,
                seed=request.seed or 0,
                n=request.n,
                stop=tuple(request.stop or ()),
                sink=other,
            )
        ],
    )
    assert other.errors() == [] and other.events[-1] == {"done": True}, other.events
    assert_full_text(innocent, expected)


# --- the same on a GPU, where a bad index is a device-side assert that ends the process's CUDA context ------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_tiny_temperature_and_nan_scores_fail_no_one(served):
    model, vocab, innocent_ids, expected, poison = served
    gpu = copy.deepcopy(model).cuda()
    poisoned = PoisonedScores(gpu, vocab.encode(poison).ids.item(), float("nan"))
    tiny, bad = Collect(), Collect()
    ids = vocab.encode("the ").ids.long()
    engine = Engine(poisoned, vocab)
    innocent = Collect()
    cuda = torch.device("cuda")
    engine.submit(
        Completion(innocent_ids, INNOCENT_TOKENS, Decoding(temperature=0), make_generator(cuda, 0)[0], sink=innocent)
    )
    engine.submit(Completion(ids, 40, Decoding(1e-300), make_generator(cuda, 1)[0], n=2, sink=tiny))
    engine.submit(
        Completion(vocab.encode("the " + poison).ids.long(), 40, Decoding(0.8), make_generator(cuda, 2)[0], sink=bad)
    )
    engine.start()
    try:
        for sink in (tiny, bad, innocent):
            assert sink.done.wait(WAIT)
    finally:
        engine.stop()
    assert tiny.errors() == [] and len(tiny.texts(2)[0]) == 40
    assert len(bad.errors()) == 1 and "not finite" in bad.errors()[0]
    assert innocent.errors() == [] and len(innocent.texts()[0]) == INNOCENT_TOKENS
    torch.cuda.synchronize()  # a device-side assert would surface here
