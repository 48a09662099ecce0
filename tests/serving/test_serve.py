"""`charlm serve`: the batched engine against generate(), and a live server on 127.0.0.1 driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import PARAGRAPH, Collect, run_cli
from live_server import LiveServer, run_dir, sse_events  # noqa: F401 - run_dir is a fixture used here

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.inference.sample import PROMPT_CHUNK, Decoding, generate, make_generator
from charlm.models.model import CharLM
from charlm.serving.completion import Completion
from charlm.serving.engine import Busy, Engine
from charlm.serving.rows import Row

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


# --- the engine, without a server ------------------------------------------------------------


def small_model():
    torch.manual_seed(0)
    text = PARAGRAPH * 3
    vocab = Vocab.from_text(text)
    model = CharLM(ModelConfig(type="lstm", hidden_size=24, num_layers=2, embedding_dim=8), len(vocab), "native").eval()
    return model, vocab


def expected_text(model, vocab, ids, length, decoding, seed, n=1):
    generator, _ = make_generator(torch.device("cpu"), seed)
    out = generate(model, ids, length, n, decoding, generator)
    return [vocab.decode(row.tolist()) for row in out]


def test_engine_alone_equals_generate_and_in_a_batch_too():
    model, vocab = small_model()
    engine = Engine(model, vocab, max_requests=32).start()
    try:
        jobs = []
        for k in range(12):
            ids = vocab.encode("it was " * (1 + k % 3)).ids.long()
            decoding = Decoding(temperature=0.5 + 0.1 * k, top_k=None if k % 2 else 5, top_p=None if k % 3 else 0.9)
            sink = Collect()
            job = Completion(
                ids,
                max_tokens=20 + k,
                decoding=decoding,
                generator=make_generator(torch.device("cpu"), 100 + k)[0],
                n=1 + k % 2,
                sink=sink,
            )
            jobs.append((job, sink, ids, decoding, k))
        # the first alone, the rest submitted together (they share the batch)
        engine.submit(jobs[0][0])
        assert jobs[0][1].done.wait(120)  # the first call may build the C++ step loop
        for job, *_ in jobs[1:]:
            engine.submit(job)
        for job, sink, ids, decoding, k in jobs:
            assert sink.done.wait(60)
            assert sink.texts(job.n) == expected_text(model, vocab, ids, 20 + k, decoding, 100 + k, job.n)
            finals = [e for e in sink.events if "finish_reason" in e]
            assert sorted(e["index"] for e in finals) == list(range(job.n))
            assert all(e["finish_reason"] == "length" and e["tokens"] == 20 + k for e in finals)
        assert engine.in_flight == 0
    finally:
        engine.stop()


def test_a_long_prompt_is_read_between_steps_and_samples_as_generate_does():
    model, vocab = small_model()
    engine = Engine(model, vocab).start()
    try:
        running = Collect()
        first = Completion(
            vocab.encode("it").ids.long(), 100_000, Decoding(), make_generator(torch.device("cpu"), 1)[0], sink=running
        )
        engine.submit(first)
        while not running.events:
            time.sleep(0.01)
        chunks = 8
        text = (PARAGRAPH * (1 + chunks * PROMPT_CHUNK // len(PARAGRAPH)))[: chunks * PROMPT_CHUNK - 5]
        ids = vocab.encode(text).ids.long()
        steps_between = []

        class FirstEvent(Collect):
            def __call__(self, event):  # runs in the engine's thread
                if not self.events:
                    steps_between.append(engine.steps - steps_before)
                super().__call__(event)

        sink = FirstEvent()
        steps_before = engine.steps
        engine.submit(Completion(ids, 30, Decoding(top_k=5), make_generator(torch.device("cpu"), 9)[0], sink=sink))
        assert sink.done.wait(60)
        # the streaming request took a step for every chunk of the prompt but the last
        assert steps_between[0] >= chunks - 1, steps_between
        assert sink.texts() == expected_text(model, vocab, ids, 30, Decoding(top_k=5), 9)
        cancelled = Collect()
        late = Completion(ids, 30, Decoding(), make_generator(torch.device("cpu"), 2)[0], sink=cancelled)
        engine.submit(late)
        late.cancel()
        assert cancelled.done.wait(60)
        first.cancel()
        assert running.done.wait(60)
        deadline = time.monotonic() + 10
        while engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.in_flight == 0
    finally:
        engine.stop()


def test_engine_refuses_more_than_its_cap_and_frees_cancelled_requests():
    model, vocab = small_model()
    engine = Engine(model, vocab, max_requests=2).start()
    try:
        ids = vocab.encode("it").ids.long()
        sinks = [Collect(), Collect()]
        jobs = [Completion(ids, 100_000, Decoding(), make_generator(torch.device("cpu"), 1)[0], sink=s) for s in sinks]
        for job in jobs:
            engine.submit(job)
        with pytest.raises(Busy):
            engine.submit(Completion(ids, 5, Decoding(), make_generator(torch.device("cpu"), 1)[0], sink=Collect()))
        for job, sink in zip(jobs, sinks):
            job.cancel()
            assert sink.done.wait(10)
        assert engine.in_flight == 0
        engine.submit(Completion(ids, 5, Decoding(), make_generator(torch.device("cpu"), 1)[0], sink=Collect()))
    finally:
        engine.stop()


def test_stopping_the_engine_ends_requests_in_flight():
    model, vocab = small_model()
    engine = Engine(model, vocab).start()
    sink = Collect()
    engine.submit(
        Completion(
            vocab.encode("it").ids.long(), 10**9, Decoding(), make_generator(torch.device("cpu"), 1)[0], sink=sink
        )
    )
    while not sink.events:
        time.sleep(0.01)
    engine.stop()
    assert sink.done.is_set() and sink.events[-2]["finish_reason"] == "shutdown" and engine.in_flight == 0
    with pytest.raises(Busy, match="shutting down"):
        engine.submit(Completion(vocab.encode("it").ids.long(), 5, Decoding(), None, sink=Collect()))


def test_a_bug_fails_the_requests_in_flight_and_the_engine_serves_on(capfd):
    model, vocab = small_model()
    calls = {"n": 0}
    original = model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    model.forward = flaky
    engine = Engine(model, vocab).start()
    try:
        first = Collect()
        engine.submit(
            Completion(
                vocab.encode("it").ids.long(), 50, Decoding(), make_generator(torch.device("cpu"), 1)[0], sink=first
            )
        )
        assert first.done.wait(60) and first.events[-1] == {"error": "internal error: RuntimeError", "status": 503}
        second = Collect()
        engine.submit(
            Completion(
                vocab.encode("it").ids.long(), 5, Decoding(), make_generator(torch.device("cpu"), 1)[0], sink=second
            )
        )
        assert second.done.wait(60) and len(second.texts()[0]) == 5 and engine.in_flight == 0
    finally:
        engine.stop()
    assert "RuntimeError: injected" in capfd.readouterr().err


class Letters:
    """A stand-in for the vocabulary's stream decoder: id k is the k-th letter."""

    def feed(self, index):
        return "abcdefghij"[index]

    def flush(self):
        return ""


def feed_row(units, stop=(), max_tokens=100):
    job = Completion(torch.tensor([0]), max_tokens, Decoding(), None, stop=tuple(stop))
    row = Row(job, 0, Letters())
    events = [e for e in (row.add(u, 0.5) for u in units) if e is not None]
    return "".join(e["text"] for e in events), events


def test_stop_sequences_end_the_text_before_them_even_across_steps():
    text, events = feed_row([0, 1, 2, 3, 4, 5], stop=["cd"])  # a b c d ...
    assert text == "ab" and events[-1]["finish_reason"] == "stop"
    # "c" is held back until "d" shows it is not the stop sequence "ce"
    text, events = feed_row([0, 2, 3, 2, 4], stop=["ce"])
    assert [e["text"] for e in events] == ["a", "cd", ""] and text == "acd"
    text, events = feed_row([0, 1, 2], stop=["zz"], max_tokens=3)
    assert text == "abc" and events[-1]["finish_reason"] == "length" and events[-1]["tokens"] == 3


# --- a live server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(run_dir):
    live = LiveServer(run_dir, "--max-tokens", "3000", "--max-requests", "40")
    yield live
    live.stop()


@pytest.mark.slow
def test_health_and_models(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "run"
    models = httpx.get(server.url + "/v1/models").json()
    entry = models["data"][0]
    assert models["object"] == "list" and entry["id"] == "run" and entry["object"] == "model"
    assert entry["charlm"]["vocab_size"] > 20 and entry["charlm"]["type"] == "lstm"
    assert entry["charlm"]["num_layers"] == 2 and "config" not in entry["charlm"]  # no paths or tracking URIs


@pytest.mark.slow
def test_completion_equals_charlm_sample_with_the_same_seed(server, run_dir):
    body = {"prompt": "it was", "max_tokens": 30, "temperature": 0.7, "top_k": 10, "seed": 4}
    result = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
    choice = result["choices"][0]
    assert result["object"] == "text_completion" and choice["finish_reason"] == "length"
    assert len(choice["text"]) == 30 and result["usage"]["completion_tokens"] == 30
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + 30
    sample = run_cli(
        "sample",
        "--checkpoint",
        str(run_dir),
        "--prompt",
        "it was",
        "--length",
        "30",
        "--temperature",
        "0.7",
        "--top-k",
        "10",
        "--seed",
        "4",
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout == "it was" + choice["text"] + "\n"


@pytest.mark.slow
def test_streamed_equals_not_streamed(server):
    body = {"prompt": "the age", "max_tokens": 60, "temperature": 1.0, "top_p": 0.9, "seed": 11, "n": 2}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]" and len(events) > 2
    texts, reasons = ["", ""], [None, None]
    for event in events[:-1]:
        choice = event["choices"][0]
        texts[choice["index"]] += choice["text"]
        assert len(choice["charlm_probs"]) == len(choice["text"])
        assert all(0 < p <= 1 for p in choice["charlm_probs"])
        reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert texts == [c["text"] for c in whole["choices"]] and reasons == ["length", "length"]


@pytest.mark.slow
def test_stop_sequence_over_http(server):
    body = {"prompt": "it was the", "max_tokens": 200, "temperature": 1.0, "seed": 5, "stop": ["s", "t"]}
    choice = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    full = httpx.post(server.url + "/v1/completions", json={**body, "stop": None}, timeout=30).json()["choices"][0]
    cut = min(full["text"].find(s) for s in "st" if s in full["text"])
    assert cut > 0 and choice["text"] == full["text"][:cut] and choice["finish_reason"] == "stop"


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"prompt": "it", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "it", "max_tokens": 5000}).encode(), 400, "above this server's cap of 3000"),
    (json.dumps({"prompt": "it", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "it", "n": 99}).encode(), 400, "n 99 is above"),
    (json.dumps({"prompt": "Zebra \u00e9"}).encode(), 400, "never saw in training: 'Z', 'é'"),
    (json.dumps({"prompt": ["a", "b"]}).encode(), 400, "one prompt"),
    (json.dumps({"prompt": "it", "stop": [""]}).encode(), 400, "stop"),
]


@pytest.mark.slow
@pytest.mark.parametrize("body, status, fragment", BAD_REQUESTS)
def test_bad_requests_get_a_json_error_and_status(server, body, status, fragment):
    response = httpx.post(
        server.url + "/v1/completions", content=body, timeout=10, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["code"] == status


@pytest.mark.slow
def test_routes_methods_and_body_size(server):
    missing = httpx.get(server.url + "/v1/engines")
    assert missing.status_code == 404 and "no route /v1/engines" in missing.json()["error"]["message"]
    wrong = httpx.get(server.url + "/v1/completions")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]
    huge = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20), timeout=10)
    assert huge.status_code == 413 and "cap" in huge.json()["error"]["message"]
    named = httpx.post(server.url + "/v1/completions", json={"prompt": "it", "file": "/etc/passwd"}, timeout=10)
    assert named.status_code == 200  # unknown fields are ignored: nothing in a request names a file


@pytest.mark.slow
def test_32_parallel_requests_all_correct(server):
    bodies = [{"prompt": "it was", "max_tokens": 40, "temperature": 0.9, "seed": 1000 + k} for k in range(32)]
    alone = [
        httpx.post(server.url + "/v1/completions", json=b, timeout=30).json()["choices"][0]["text"] for b in bodies[:4]
    ]
    results = [None] * 32

    def ask(k):
        results[k] = httpx.post(server.url + "/v1/completions", json=bodies[k], timeout=60).json()

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    texts = [r["choices"][0]["text"] for r in results]
    assert all(len(t) == 40 for t in texts)
    assert all(r["usage"]["completion_tokens"] == 40 for r in results)
    # in a batch only float rounding may differ from the request alone, and it almost never moves a draw
    assert sum(a == b for a, b in zip(alone, texts[:4])) >= 3
    assert len(set(texts)) > 25  # each request drew from its own generator


@pytest.mark.slow
def test_a_client_that_disconnects_frees_its_slot(server):
    with httpx.stream(
        "POST", server.url + "/v1/completions", timeout=30, json={"prompt": "it", "max_tokens": 3000, "stream": True}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["in_flight"] == 0


@pytest.mark.slow
def test_too_many_in_flight_is_429(run_dir):
    live = LiveServer(run_dir, "--max-requests", "1", "--max-tokens", "100000")
    try:
        with httpx.stream(
            "POST",
            live.url + "/v1/completions",
            timeout=30,
            json={"prompt": "it", "max_tokens": 100000, "stream": True},
        ) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
            next(lines)
            second = httpx.post(live.url + "/v1/completions", json={"prompt": "it"}, timeout=10)
            assert second.status_code == 429 and "in flight" in second.json()["error"]["message"]
    finally:
        live.stop()


@pytest.mark.slow
def test_api_key_is_required_on_the_api_only(run_dir):
    live = LiveServer(run_dir, "--api-key", "s3cret", "--threads", "1")
    try:
        assert httpx.get(live.url + "/health").status_code == 200
        assert httpx.get(live.url + "/").status_code == 200
        denied = httpx.get(live.url + "/v1/models")
        assert denied.status_code == 401 and "Authorization: Bearer" in denied.json()["error"]["message"]
        wrong = httpx.post(
            live.url + "/v1/completions", json={"prompt": "it"}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        ok = httpx.post(
            live.url + "/v1/completions",
            json={"prompt": "it", "max_tokens": 5},
            headers={"Authorization": "Bearer s3cret"},
            timeout=30,
        )
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 5
    finally:
        live.stop()


@pytest.mark.slow
def test_sigint_ends_in_flight_streams_cleanly(run_dir):
    live = LiveServer(run_dir, "--max-tokens", "2000")
    events = []

    def read():
        with httpx.stream(
            "POST", live.url + "/v1/completions", timeout=60, json={"prompt": "it", "max_tokens": 2000, "stream": True}
        ) as response:
            events.extend(sse_events(response))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    code, err = live.stop()
    reader.join(60)
    assert code == 130, err  # Ctrl-C's exit code, as for every charlm command
    assert events and events[-1] == "[DONE]"  # the stream ended with its terminator, not a cut connection
    assert "Traceback" not in err


@pytest.mark.slow
def test_serve_without_the_extra_says_what_to_install(run_dir, tmp_path):
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['uvicorn'] = None\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "charlm", "serve", "--checkpoint", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "charlm: error: charlm serve needs the serving extra: pip install 'charlm[serve]'"


@pytest.mark.slow
def test_a_public_host_warns(run_dir):
    live = LiveServer(run_dir, "--host", "0.0.0.0")
    try:
        assert httpx.get(live.url + "/health").status_code == 200
    finally:
        code, err = live.stop()
    assert "warning: listening on 0.0.0.0, reachable from other machines by anyone (no --api-key)" in err


@pytest.mark.slow
def test_a_port_in_use_is_one_line_and_exit_2(server, run_dir):
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "charlm", "serve", "--checkpoint", str(run_dir), "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"charlm: error: cannot listen on 127.0.0.1:{port} (")
    assert len(result.stderr.strip().splitlines()) == 1


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the engine process")
def test_a_dead_engine_process_fails_requests_in_flight_and_then_503(run_dir):
    live = LiveServer(run_dir, "--max-tokens", "100000")
    try:
        with httpx.stream(
            "POST",
            live.url + "/v1/completions",
            timeout=30,
            json={"prompt": "it", "max_tokens": 100000, "stream": True},
        ) as response:
            lines = response.iter_lines()
            next(lines)
            engines = [
                pid for pid in child_pids(live.proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            assert len(engines) == 1
            os.kill(engines[0], signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert "engine process ended" in json.loads(rest[-1][len("data: ") :])["error"]["message"]
        after = httpx.post(live.url + "/v1/completions", json={"prompt": "it"}, timeout=10)
        assert after.status_code == 503 and "restart the server" in after.json()["error"]["message"]
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
    finally:
        live.stop()
