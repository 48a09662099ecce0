"""A soak of `charlm serve` (issue 25): 32 clients on 127.0.0.1 for a bounded time, streaming, leaving
mid-stream and sending bad requests at random; every good request must come back whole, the server's
memory must stay put, and it must be healthy at the end. `pytest -s -k soak` prints its figures."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from live_server import LiveServer, run_dir, sse_events  # noqa: F401 - run_dir is a fixture used here

httpx = pytest.importorskip("httpx")

CLIENTS = 32
SECONDS = 20
MAX_TOKENS = 300
RSS_GROWTH_MB = 48  # what the server process may grow by over the soak, after its warm-up


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


class Tally:
    """What the clients did and saw (shared by their threads)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.latencies: list[float] = []
        self.problems: list[str] = []

    def add(self, kind: str, latency: float = None, problem: str = None) -> None:
        with self.lock:
            self.counts[kind] += 1
            if latency is not None:
                self.latencies.append(latency)
            if problem is not None:
                self.problems.append(problem)


def good_stream(client: httpx.Client, url: str, rng: random.Random, tally: Tally) -> None:
    body = {
        "prompt": "it was",
        "max_tokens": rng.randint(20, MAX_TOKENS),
        "n": rng.choice([1, 1, 2]),
        "temperature": 0.9,
        "stream": True,
    }
    start = time.monotonic()
    with client.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        if response.status_code != 200:
            response.read()
            return tally.add("good", problem=f"status {response.status_code}: {response.text[:200]}")
        events = sse_events(response)
    texts = [""] * body["n"]
    for event in events[:-1]:
        if "error" in event:
            return tally.add("good", problem=f"error event {event}")
        texts[event["choices"][0]["index"]] += event["choices"][0]["text"]
    if events[-1:] != ["[DONE]"] or any(len(t) != body["max_tokens"] for t in texts):
        return tally.add(
            "good", problem=f"incomplete: {[len(t) for t in texts]} of {body['max_tokens']}, last {events[-1:]}"
        )
    tally.add("good", latency=time.monotonic() - start)


def leave_mid_stream(client: httpx.Client, url: str, rng: random.Random, tally: Tally) -> None:
    body = {"prompt": "the age", "max_tokens": MAX_TOKENS, "stream": True}
    with client.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        for k, _ in enumerate(response.iter_lines()):
            if k >= rng.randint(0, 6):
                break  # leaving the block closes the connection mid-stream
    tally.add("disconnect")


def leave_while_waiting(port: int, rng: random.Random, tally: Tally) -> None:
    """A non-streaming request whose client closes its socket before the answer."""
    body = json.dumps({"prompt": "it", "max_tokens": MAX_TOKENS}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(rng.uniform(0, 0.2))
    tally.add("disconnect")


BAD = [  # (headers, body, expected status)
    ({"Content-Type": "application/json"}, b"{not json", 400),
    ({"Content-Type": "text/plain"}, json.dumps({"prompt": "it"}).encode(), 415),
    ({"Content-Type": "application/json", "Host": "rebind.attacker.example"}, b"{}", 421),
    ({"Content-Type": "application/json"}, json.dumps({"prompt": "it", "max_tokens": 10**6}).encode(), 400),
    ({"Content-Type": "application/json"}, json.dumps({"prompt": "it", "temperature": "hot"}).encode(), 400),
    ({"Content-Type": "application/json", "Content-Length": str(2 << 20)}, b"", 413),
]


def bad_request(client: httpx.Client, url: str, port: int, rng: random.Random, tally: Tally) -> None:
    if rng.random() < 0.25:  # half a head, then gone
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            time.sleep(rng.uniform(0, 0.1))
        return tally.add("bad")
    headers, body, status = rng.choice(BAD)
    if "Content-Length" in headers:  # a declared size over the cap: the head alone is refused
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (2 << 20)
            )
            got = sock.recv(64)
        ok = got.startswith(b"HTTP/1.1 413")
    else:
        response = client.post(url + "/v1/completions", content=body, headers=headers, timeout=30)
        ok = response.status_code == status and "error" in response.json()
        got = response.status_code
    tally.add("bad", problem=None if ok else f"bad request {headers} {body[:40]!r}: got {got!r}, not {status}")


def client_loop(live: LiveServer, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client() as client:
        while time.monotonic() < until:
            pick = rng.random()
            try:
                if pick < 0.55:
                    good_stream(client, live.url, rng, tally)
                elif pick < 0.70:
                    leave_mid_stream(client, live.url, rng, tally)
                elif pick < 0.80:
                    leave_while_waiting(live.port, rng, tally)
                else:
                    bad_request(client, live.url, live.port, rng, tally)
            except httpx.HTTPError as err:
                tally.add("transport", problem=f"{type(err).__name__}: {err}")


@pytest.mark.slow
def test_soak_32_clients_streaming_leaving_and_misbehaving(run_dir):
    live = LiveServer(run_dir, "--max-tokens", str(MAX_TOKENS), "--max-requests", "64", "--client-timeout", "2")
    try:
        for _ in range(3):  # warm-up: the first requests allocate what every later one reuses
            good_stream(httpx.Client(), live.url, random.Random(0), Tally())
        before = rss_mb(live.proc.pid)
        tally = Tally()
        until = time.monotonic() + SECONDS
        threads = [threading.Thread(target=client_loop, args=(live, k, until, tally)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 90)
        assert not any(t.is_alive() for t in threads), "a client never finished"
        deadline = time.monotonic() + 10
        while httpx.get(live.url + "/health", timeout=5).json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(live.url + "/health", timeout=5)
        after = rss_mb(live.proc.pid)
    finally:
        code, err = live.stop()
    latencies = sorted(tally.latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    counts = tally.counts
    print(
        f"\nsoak: {CLIENTS} clients for {SECONDS} s: {sum(counts.values())} requests, {counts['good']} good "
        f"({len(latencies)} completed in full), {counts['disconnect']} disconnects, {counts['bad']} bad requests, "
        f"{counts['transport']} transport errors; server RSS {before:.0f} -> {after:.0f} MB; "
        f"p99 latency of good requests {p99:.2f} s (median {latencies[len(latencies) // 2]:.2f} s)"
    )
    assert not tally.problems, "\n".join(tally.problems[:10])
    assert counts["good"] > 50 and counts["disconnect"] > 20 and counts["bad"] > 20
    assert len(latencies) == counts["good"]
    assert health.status_code == 200 and health.json() == {**health.json(), "status": "ok", "in_flight": 0}
    assert after - before < RSS_GROWTH_MB, f"server RSS grew {after - before:.0f} MB"
    assert "Traceback" not in err, err
