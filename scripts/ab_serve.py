#!/usr/bin/env python3
"""`charlm serve` of two code trees side by side: is a change within noise of the code before it?

Both servers run at once on 127.0.0.1 (each from its own tree, e.g. a `git worktree` of the
earlier commit), and the requests alternate between them round by round, A B, B A, ..., so a
drift of a shared machine's speed weighs on both alike. For each client count C every round
sends C streamed requests of --chars characters at once (one client thread each, as
scripts/load_serve.py does) and records total chars/s; the medians and every round are printed.
--engine instead times the generation engine alone: both trees' charlm/serving/engine.py loaded
in this one process, on the same model, one request of `streams` rows at a time.

    git worktree add /tmp/before 0f7cc71
    python scripts/ab_serve.py --checkpoint runs/x --before /tmp/before --clients 1,8,32
    python scripts/ab_serve.py --checkpoint runs/x --before /tmp/before --engine
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_serve

HERE = Path(__file__).resolve().parents[1]


def start(tree: Path, checkpoint: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = load_serve.free_port()
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
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"the server of {tree} did not start within 120 s")


def servers(args) -> None:
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    running = {name: start(tree, args.checkpoint, args.serve_args) for name, tree in trees.items()}
    try:
        for clients in args.clients:
            rates: dict[str, list[float]] = {name: [] for name in running}
            for r in range(args.rounds):
                for name in list(running) if r % 2 == 0 else list(running)[::-1]:
                    bodies = [
                        {
                            "prompt": args.prompt,
                            "max_tokens": args.chars,
                            "temperature": 0.8,
                            "seed": 1000 * r + k,
                            "stream": True,
                        }
                        for k in range(clients)
                    ]
                    wall, _ = load_serve.run_batched(running[name][1], bodies, 120)
                    rates[name].append(args.chars * clients / wall)
            report(f"{clients:>3} client(s)", rates)
    finally:
        for proc, _ in running.values():
            load_serve.stop_server(proc)


def engine_module(tree: Path, name: str):
    """charlm/serving/engine.py of `tree`, loaded under `name` (it imports the rest from this process's charlm)."""
    spec = importlib.util.spec_from_file_location(name, tree / "charlm" / "serving" / "engine.py")
    assert spec is not None and spec.loader is not None, f"{tree} holds no charlm/serving/engine.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def engines(args) -> None:
    import torch  # noqa: PLC0415 - only --engine needs torch in this process

    from charlm.cli.common import load_model  # noqa: PLC0415 - only --engine loads charlm here; servers run in their own trees
    from charlm.inference.sample import Decoding, make_generator  # noqa: PLC0415 - only --engine loads charlm here; servers run in their own trees

    torch.set_num_threads(1)  # as `charlm serve`'s engine on 2 cores
    modules = {
        "before": engine_module(Path(args.before).resolve(), "engine_before"),
        "after": engine_module(Path(args.after).resolve(), "engine_after"),
    }
    _, model, vocab, _ = load_model(Path(args.checkpoint), "cpu", "native", "fp32")[:4]
    prompt = torch.tensor(vocab.encode(args.prompt).ids, dtype=torch.long)

    def run(module, streams: int) -> float:
        engine, done, count = module.Engine(model, vocab), threading.Event(), [0]

        def sink(event: dict) -> None:
            count[0] += len(event.get("text", ""))
            if event.get("done") or "error" in event:
                done.set()

        def drive() -> None:
            engine.submit(
                module.Completion(
                    prompt, args.chars, Decoding(0.8), make_generator(torch.device("cpu"), 1)[0], n=streams, sink=sink
                )
            )
            done.wait(300)
            engine.stop()

        start = time.perf_counter()
        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        engine.run()
        driver.join()
        return count[0] / (time.perf_counter() - start)

    for streams in args.clients:
        rates: dict[str, list[float]] = {name: [] for name in modules}
        for r in range(args.rounds):
            for name in list(modules) if r % 2 == 0 else list(modules)[::-1]:
                rates[name].append(run(modules[name], streams))
        report(f"engine, {streams:>2} stream(s)", rates)


def report(what: str, rates: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"{what}: "
        + "   ".join(f"{name} {medians[name]:,.0f} chars/s" for name in rates)
        + f"   after/before {medians['after'] / medians['before']:.3f}"
    )
    for name, values in rates.items():
        print(f"    {name:6} " + " ".join(f"{v:,.0f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--before", required=True, help="the earlier code's tree (a git worktree)")
    parser.add_argument("--after", default=str(HERE), help="the later code's tree (default: this one)")
    parser.add_argument("--clients", default="1,8,32", help="client counts (with --engine: streams)")
    parser.add_argument("--chars", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--engine", action="store_true", help="time the engines alone, in this process")
    parser.add_argument("serve_args", nargs="*", help="passed on to charlm serve (after --)")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    (engines if args.engine else servers)(args)


if __name__ == "__main__":
    main()
