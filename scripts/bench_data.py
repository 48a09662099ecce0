"""Measure the data pipeline: encoding a big corpus, starting from the cache, and peak memory.

    python scripts/bench_data.py              # ~200 MB corpus (a few minutes on 2 cores)
    python scripts/bench_data.py --mb 20      # smaller and quicker
    python scripts/bench_data.py --json       # ... and one JSON object as the last line

The corpus is the shared Tiny Shakespeare and Tang poems files (or, without them, Python's
standard library source) concatenated until it reaches --mb megabytes, in a temporary
folder. Every measurement runs in a fresh process, so its peak RSS is its own:
  encode  - cold cache: stream, count, build the vocabulary, write the memory-mapped ids
  start   - the same corpus again: the cache hit
  train   - a few training steps on it, after reading every token once (the worst case)
  model   - the same training steps on random ids, no corpus: the model's own cost, so that
            "peak RSS <= 2 x token array + model" can be checked
Then a 65-symbol vocabulary (Shakespeare) against a 6,000-symbol one (Tang poems) at equal
model size: step time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = [SHARED / "tinyshakespeare" / "input.txt", SHARED / "chinese" / "tang_poems.txt"]


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM restarts at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: may include the parent's


def train_steps(ids, vocab_size: int, steps: int) -> dict:
    """A few training steps of the benchmark model (LSTM 2x256, B=64, T=64) on `ids`."""
    import torch  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)

    from charlm.config import validate_config  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)
    from charlm.data.batches import TBPTTBatches  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)
    from charlm.models.model import CharLM  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)
    from charlm.training.optim import build_optimizer  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)
    from charlm.training.trainer import Trainer  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)

    cfg = validate_config(
        {
            "data": {"path": "unused.txt"},
            "model": {"hidden_size": 256, "num_layers": 2},
            "train": {"max_steps": 1, "batch_size": 64, "seq_len": 64},
        }
    )
    model = CharLM(cfg.model, vocab_size, "native")  # what README's figures were measured with
    optimizer = build_optimizer(model, cfg.train)
    batches = TBPTTBatches(ids, 64, 64)
    state, times = model.init_state(64), []
    for step in range(steps):
        start = time.perf_counter()
        x, y = batches.window(step % batches.windows_per_epoch)
        logits, state = model(x, state)
        loss = Trainer.loss(logits, y)
        del logits
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = model.detach_state(state)
        times.append(time.perf_counter() - start)
    del torch
    return {"ms_per_step": 1000 * sorted(times[2:])[len(times[2:]) // 2]}


def worker(mode: str, path: str, cache: str, extra: dict) -> dict:
    """Runs inside a fresh process; returns its measurements."""
    if mode == "model":  # the same training with no corpus at all: what the model alone costs
        import torch  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)

        ids = torch.randint(0, extra["vocab"], (64 * 64 * 4 + 1,), generator=torch.Generator().manual_seed(0))
        return {**train_steps(ids, extra["vocab"], extra.get("steps", 6)), "peak_rss_mb": peak_rss_mb()}

    from charlm.config import DataConfig  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)
    from charlm.data.corpus import load_corpus  # noqa: PLC0415 - each worker mode imports only what it measures (peak RSS)

    started = time.perf_counter()
    corpus = load_corpus(DataConfig(path=path, val_fraction=0.01), cache=Path(cache))
    result = {
        "seconds": time.perf_counter() - started,
        "tokens": corpus.train_ids.numel() + corpus.val_ids.numel(),
        "token_mb": (corpus.train_ids.numel() + corpus.val_ids.numel()) * corpus.train_ids.element_size() / 2**20,
        "vocab": len(corpus.vocab),
    }
    if mode == "train":
        if extra.get("touch_all"):
            ids, chunk = corpus.train_ids, 1 << 22  # every page of the token file read once, chunk by chunk
            result["checksum"] = sum(int(ids[i : i + chunk].long().sum()) for i in range(0, ids.numel(), chunk))
        result.update(train_steps(corpus.train_ids, len(corpus.vocab), extra.get("steps", 12)))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_worker(mode: str, path: Path, cache: Path, **extra) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_data; "
        f"print(json.dumps(bench_data.worker({mode!r}, {str(path)!r}, {str(cache)!r}, {extra!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_big_corpus(folder: Path, megabytes: float) -> Path:
    sources = [p for p in SOURCES if p.exists()]
    if not sources:
        from charlm.data.builtin import python_stdlib_files  # noqa: PLC0415 - the parent imports no charlm; only this fallback needs it

        sources = python_stdlib_files()
    pieces = [p.read_bytes() for p in sources]
    target, out = int(megabytes * 2**20), folder / "big.txt"
    with open(out, "wb") as handle:
        written = 0
        while written < target:
            for piece in pieces:
                handle.write(piece)
                written += len(piece)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200, help="size of the concatenated corpus in MB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        big = build_big_corpus(tmp, args.mb)
        size_mb = big.stat().st_size / 2**20
        print(f"corpus: {size_mb:.0f} MB ({big})")
        encode = run_worker("encode", big, tmp / "cache")
        start = run_worker("start", big, tmp / "cache")
        train = run_worker("train", big, tmp / "cache", touch_all=True, steps=6)
        print(
            f"encode (cold cache): {encode['seconds']:.1f} s, {encode['tokens']:,} tokens, vocabulary "
            f"{encode['vocab']:,}, token array {encode['token_mb']:.0f} MB, peak RSS {encode['peak_rss_mb']:.0f} MB"
        )
        print(f"start (cache hit):   {start['seconds']:.2f} s, peak RSS {start['peak_rss_mb']:.0f} MB")
        model = run_worker("model", big, tmp / "cache", vocab=train["vocab"], steps=6)
        bound = 2 * train["token_mb"] + model["peak_rss_mb"]
        print(
            f"training, every token read: peak RSS {train['peak_rss_mb']:.0f} MB; the same training with no "
            f"corpus: {model['peak_rss_mb']:.0f} MB; bound 2 x token array + that = {bound:.0f} MB"
        )
        results.update(
            corpus_mb=size_mb,
            encode_s=encode["seconds"],
            cache_hit_s=start["seconds"],
            tokens=encode["tokens"],
            token_mb=encode["token_mb"],
            encode_peak_rss_mb=encode["peak_rss_mb"],
            train_peak_rss_mb=train["peak_rss_mb"],
            model_only_peak_rss_mb=model["peak_rss_mb"],
            rss_bound_mb=bound,
        )

        if all(p.exists() for p in SOURCES):
            print("\nequal model (LSTM 2x256, embedding 64, B=64, T=64): small vs large vocabulary")
            for name, path in (("shakespeare", SOURCES[0]), ("tang_poems", SOURCES[1])):
                r = run_worker("train", path, tmp / "cache", steps=12)
                print(
                    f"{name:12} vocabulary {r['vocab']:>5,}: {r['ms_per_step']:.0f} ms/step, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB"
                )
                results[f"{name}_vocab"] = r["vocab"]
                results[f"{name}_ms_per_step"] = r["ms_per_step"]
                results[f"{name}_peak_rss_mb"] = r["peak_rss_mb"]
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
