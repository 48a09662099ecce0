#!/usr/bin/env python3
"""Load test of `charlm serve` on 127.0.0.1: batched serving against one request at a time.

Starts `charlm serve --checkpoint RUN` on a free local port, then for each number of clients C
(default 1, 8, 32, 64) runs the same C requests of N characters (streamed, each with its own
seed) two ways, in alternating order: all C at once (the server batches them), and one after
another (each request alone). Reports total characters per second, time to first character
and per-request latency (p50 / p99) for each. Bounded: every request has a timeout and the
whole run stops at --max-seconds.

    python scripts/load_serve.py --checkpoint runs/shakespeare_lstm --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charlm",
            "serve",
            "--checkpoint",
            checkpoint,
            "--port",
            str(port),
            "--max-requests",
            "256",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert proc.stderr is not None  # stderr=PIPE
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user would stop it; killed if it has not ended within 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def one_request(client: httpx.Client, url: str, body: dict, timeout: float) -> dict:
    """Stream one completion; its start, first-character and end times and its character count."""
    start = time.perf_counter()
    first, chars = None, 0
    with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=timeout) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text and first is None:
                first = time.perf_counter()
            chars += len(text)
    end = time.perf_counter()
    return {"ttfc": (first or end) - start, "latency": end - start, "chars": chars}


def run_batched(url: str, bodies: list[dict], timeout: float) -> tuple[float, list[dict]]:
    """All requests at once, one client thread each. The clients are made before the clock starts
    (an httpx.Client builds an SSL context: tens of ms of the client's CPU, no work of the server's)
    and their threads wait at a barrier, so the requests leave together."""
    results: list = [None] * len(bodies)
    clients = [httpx.Client() for _ in bodies]
    ready = threading.Barrier(len(bodies) + 1)

    def client(k: int) -> None:
        ready.wait()
        results[k] = one_request(clients[k], url, bodies[k], timeout)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(bodies))]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(timeout)
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return wall, results


def run_one_at_a_time(url: str, bodies: list[dict], timeout: float) -> tuple[float, list[dict]]:
    """The same requests one after another from one client (made before the clock starts, as above)."""
    with httpx.Client() as c:
        start = time.perf_counter()
        results = [one_request(c, url, body, timeout) for body in bodies]
        return time.perf_counter() - start, results


def summary(wall: float, results: list[dict]) -> dict:
    done = [r for r in results if r is not None]
    latencies = sorted(r["latency"] for r in done)
    ttfc = sorted(r["ttfc"] for r in done)

    def pct(values, q):
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    chars = sum(r["chars"] for r in done)
    return {
        "requests": len(done),
        "chars": chars,
        "seconds": wall,
        "chars_per_s": chars / wall,
        "ttfc_p50": statistics.median(ttfc),
        "ttfc_p99": pct(ttfc, 0.99),
        "latency_p50": statistics.median(latencies),
        "latency_p99": pct(latencies, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--chars", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("serve_args", nargs="*", help="passed on to charlm serve (after --)")
    args = parser.parse_args()

    proc, url = start_server(args.checkpoint, args.serve_args)
    began, rows = time.monotonic(), []
    try:
        warm = {"prompt": args.prompt, "max_tokens": 50, "seed": 0}
        run_batched(url, [warm] * 4, 60)  # first calls: allocator, thread pools
        for i, clients in enumerate(int(c) for c in args.clients.split(",")):
            if time.monotonic() - began > args.max_seconds:
                print(f"stopping: --max-seconds {args.max_seconds} reached", file=sys.stderr)
                break
            bodies = [
                {"prompt": args.prompt, "max_tokens": args.chars, "temperature": args.temperature, "seed": 1000 + k}
                for k in range(clients)
            ]
            timeout = max(60.0, args.max_seconds)
            ways = [("batched", run_batched), ("one at a time", run_one_at_a_time)]
            row: dict[str, Any] = {"clients": clients}
            for name, way in ways if i % 2 == 0 else ways[::-1]:  # alternate which goes first
                row[name] = summary(*way(url, bodies, timeout))
            row["speedup"] = row["batched"]["chars_per_s"] / row["one at a time"]["chars_per_s"]
            rows.append(row)
            b, s = row["batched"], row["one at a time"]
            print(
                f"{clients:>3} clients: batched {b['chars_per_s']:>8,.0f} chars/s (ttfc p50 {b['ttfc_p50'] * 1e3:.0f} ms, "
                f"latency p50 {b['latency_p50']:.2f} s, p99 {b['latency_p99']:.2f} s) | one at a time "
                f"{s['chars_per_s']:>8,.0f} chars/s (latency p50 {s['latency_p50']:.2f} s) | {row['speedup']:.1f}x",
                flush=True,
            )
    finally:
        stop_server(proc)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "chars": args.chars, "rows": rows}))


if __name__ == "__main__":
    main()
