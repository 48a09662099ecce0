#!/usr/bin/env python3
"""How long a streaming request stalls while the serving engine reads another request's long prompt.

Runs charlm's serving engine (the one `charlm serve` runs) in this process on a trained
checkpoint, in the main thread and with the kernel threads of `charlm serve`'s engine process: one request streams characters; then a second request arrives with a prompt of
--prompt-chars characters (taken from the model's own vocabulary). Measured: the longest gap
between two characters of the streaming request while the long prompt is read, the median
gap before it arrived, and how long the long request waited for its first character. Two ways,
in alternating order: the prompt read in chunks of PROMPT_CHUNK between steps (what the engine
does), and the prompt read in one pass (PROMPT_CHUNK set beyond the prompt's length, which is
what the engine did before).

    python scripts/prompt_stall.py --checkpoint runs/shakespeare_lstm --precision bf16 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

import charlm.inference.sample as sample
import charlm.serving.engine as engine_module
from charlm.cli.common import in_precision, load_model
from charlm.inference.sample import Decoding, make_generator
from charlm.serving.engine import Completion, Engine
from charlm.serving.worker import engine_threads


class Timed:
    """A sink that stamps each event's arrival."""

    def __init__(self):
        self.times, self.done = [], threading.Event()

    def __call__(self, event):
        if "text" in event:
            self.times.append(time.perf_counter())
        if event.get("done") or "error" in event:
            self.done.set()


def long_prompt(vocab, chars: int) -> torch.Tensor:
    letters = [c for c in vocab.chars if c.isalpha()] or list("etaoinshr")  # a bytes vocabulary has no chars
    text = "".join(letters[(k * 7) % len(letters)] if k % 6 else " " for k in range(chars))
    return vocab.encode(text).ids.long()


def one_trial(model, vocab, precision: str, prompt: torch.Tensor, chunk: int) -> dict:
    """The engine in this, the main thread (as `charlm serve` runs it), driven from another."""
    sample.PROMPT_CHUNK = engine_module.PROMPT_CHUNK = chunk
    engine = Engine(model, vocab, precision_context=lambda: in_precision(model, precision))
    result: dict = {}
    driver = threading.Thread(target=drive, args=(engine, vocab, prompt, result), daemon=True)
    driver.start()
    engine.run()
    driver.join()
    if "error" in result:
        raise SystemExit(result["error"])
    return result


def drive(engine: Engine, vocab, prompt: torch.Tensor, result: dict) -> None:
    try:
        streaming = Timed()
        first = Completion(
            long_prompt(vocab, 4), 10**9, Decoding(), make_generator(torch.device("cpu"), 1)[0], sink=streaming
        )
        engine.submit(first)
        while len(streaming.times) < 200:
            time.sleep(0.005)
        arrived = time.perf_counter()
        reader = Timed()
        engine.submit(Completion(prompt, 5, Decoding(), make_generator(torch.device("cpu"), 2)[0], sink=reader))
        if not reader.done.wait(300):
            result["error"] = "the long prompt was not read within 300 s"
            return
        first.cancel()
        streaming.done.wait(60)
        gaps_before = [b - a for a, b in zip(streaming.times, streaming.times[1:]) if b <= arrived]
        window = [t for t in streaming.times if arrived <= t <= reader.times[0]]
        during = [b - a for a, b in zip([arrived] + window, window + [reader.times[0]])]
        result.update(
            max_gap_ms=1e3 * max(during),
            median_gap_before_ms=1e3 * statistics.median(gaps_before[-100:]),
            first_char_s=reader.times[0] - arrived,
        )
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--prompt-chars", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(engine_threads())  # as charlm serve's engine process does
    _, model, vocab, _ = load_model(args.checkpoint, "cpu", None, args.precision)
    prompt = long_prompt(vocab, args.prompt_chars)
    chunked = sample.PROMPT_CHUNK
    ways = {"chunked": chunked, "one pass": args.prompt_chars + 1}
    results: dict[str, list[dict]] = {way: [] for way in ways}
    one_trial(model, vocab, args.precision, prompt[: 2 * chunked], chunked)  # warm-up (and the C++ build)
    for r in range(args.rounds):
        for way in list(ways) if r % 2 == 0 else list(ways)[::-1]:
            results[way].append(one_trial(model, vocab, args.precision, prompt, ways[way]))
    summary = {
        way: {key: statistics.median(t[key] for t in trials) for key in trials[0]} for way, trials in results.items()
    }
    print(
        f"{args.prompt_chars:,}-character prompt arriving while one request streams, {args.precision}, "
        f"median of {args.rounds} rounds (PROMPT_CHUNK = {chunked}):"
    )
    for way, s in summary.items():
        print(
            f"  {way:9} longest gap {s['max_gap_ms']:8.1f} ms (usual gap {s['median_gap_before_ms']:.2f} ms), "
            f"long request's first character after {s['first_char_s']:.2f} s"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "precision": args.precision,
                    "prompt_chars": args.prompt_chars,
                    "chunk": chunked,
                    **{f"{way.replace(' ', '_')}_{k}": v for way, s in summary.items() for k, v in s.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
