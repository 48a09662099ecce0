"""Benchmark charlm's native recurrent core against torch's fused kernels (oneDNN / cuDNN).

    python scripts/bench.py            # full table (a few minutes on 2 CPU cores)
    python scripts/bench.py --quick    # fewer rounds and smaller texts (under a minute)
    python scripts/bench.py --json     # ... and one JSON object as the last line

Training: one full step (forward, loss, backward, AdamW) per round; the variants of a shape
take turns within each round (interleaved), so a noisy machine slows them alike; the
median over rounds is reported. `fused` runs the same parameters through torch.lstm /
torch.gru / torch.rnn_tanh, the kernels behind torch.nn.LSTM / GRU / RNN.
Peak RSS: each variant again in a fresh subprocess (VmHWM after a few steps; ru_maxrss would
include the parent's memory at fork time).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from charlm.data import read_text
from charlm.evaluate import evaluate_ids
from charlm.model import CharLM
from charlm.native import cpp_loops
from charlm.sample import generate, make_generator
from charlm.vocab import Vocab

V, E = 65, 64  # Tiny Shakespeare's vocabulary size, the default embedding


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(kind: str, backend: str, hidden: int, layers: int, device: torch.device) -> CharLM:
    torch.manual_seed(0)
    return CharLM(V, cell=kind, hidden_size=hidden, num_layers=layers, embedding_dim=E, backend=backend).to(device)


PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(model, optimizer, x, y, precision: str = "fp32") -> None:
    dtype = PRECISION[precision]
    with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bench_training(kind: str, batch: int, seq: int, hidden: int, rounds: int, device: torch.device,
                   precision: str = "fp32") -> dict:
    """Median chars/s of native and fused, interleaved round by round."""
    models = {b: make_model(kind, b, hidden, 2, device) for b in ("native", "fused")}
    optimizers = {b: torch.optim.AdamW(m.parameters(), lr=1e-3) for b, m in models.items()}
    x = torch.randint(0, V, (batch, seq), device=device)
    y = torch.randint(0, V, (batch, seq), device=device)
    times = {b: [] for b in models}
    for r in range(rounds + 2):  # two warm-up rounds
        for b, model in models.items():
            sync(device)
            start = time.perf_counter()
            train_step(model, optimizers[b], x, y, precision)
            sync(device)
            if r >= 2:
                times[b].append(time.perf_counter() - start)
    return {b: batch * seq / statistics.median(t) for b, t in times.items()}


def bench_generation(streams: int, length: int, backend: str, device: torch.device) -> float:
    model = make_model("lstm", backend, 512, 2, device).eval()
    prompt = torch.randint(0, V, (16,))
    generate(model, prompt, 8, streams, generator=make_generator(device, 0)[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    generate(model, prompt, length, streams, generator=make_generator(device, 0)[0])
    sync(device)
    return streams * length / (time.perf_counter() - start)


def bench_eval(ids: torch.Tensor, backend: str, device: torch.device) -> float:
    model = make_model("lstm", backend, 256, 2, device)
    evaluate_ids(model, ids[:5000])  # warm-up
    sync(device)
    start = time.perf_counter()
    evaluate_ids(model, ids)
    sync(device)
    return ids.numel() / (time.perf_counter() - start)


def own_peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM restarts at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: may include the parent's


def peak_rss_mb(kind: str, backend: str, batch: int, seq: int, hidden: int, device: str) -> float:
    """Peak RSS of a fresh process that trains a few steps of one variant."""
    code = ("import sys, resource, torch; sys.argv=['bench']; import bench; "
            f"d=torch.device('{device}'); m=bench.make_model('{kind}','{backend}',{hidden},2,d); "
            "o=torch.optim.AdamW(m.parameters()); "
            f"x=torch.randint(0,bench.V,({batch},{seq}),device=d); "
            "[bench.train_step(m,o,x,x) for _ in range(3)]; "
            "print(bench.own_peak_rss_kb())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/", 1)[0])
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def text_ids(chars: int) -> torch.Tensor:
    text = read_text("builtin:python-stdlib")[:chars]
    ids = Vocab.from_text(text).encode(text).ids.long()
    return ids % V  # keep the benchmark vocabulary at V


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller texts (< 60 s on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISION), help="autocast for training steps")
    args = parser.parse_args()
    device = torch.device(args.device)
    rounds = 5 if args.quick else 25
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    native_kind = "C++ step loop" if device.type == "cpu" and cpp_loops() is not None else "PyTorch step loop"
    print(f"device: {where}; torch {torch.__version__}; native backend = {native_kind}; precision {args.precision}")
    results: dict = {}

    shapes = [("lstm", 32, 128, 256), ("rnn", 32, 128, 256), ("gru", 32, 128, 256)]
    if not args.quick:
        shapes += [("lstm", 32, 128, 512), ("lstm", 64, 128, 256)]
    print(f"\ntraining step (forward + backward + AdamW), median of {rounds} interleaved rounds, E={E}, L=2")
    print(f"{'model':6} {'B':>4} {'T':>4} {'H':>4}  {'native chars/s':>15} {'fused chars/s':>15} {'native/fused':>13}")
    for kind, batch, seq, hidden in shapes:
        speed = bench_training(kind, batch, seq, hidden, rounds, device, args.precision)
        ratio = speed["native"] / speed["fused"]
        print(f"{kind:6} {batch:>4} {seq:>4} {hidden:>4}  {speed['native']:>15,.0f} {speed['fused']:>15,.0f} {ratio:>13.2f}")
        if (batch, seq, hidden) == (32, 128, 256):
            results[f"{kind}_native_chars_per_s"] = speed["native"]
            results[f"{kind}_fused_chars_per_s"] = speed["fused"]
            results[f"{kind}_ratio"] = ratio
        else:
            results[f"{kind}_B{batch}_H{hidden}_ratio"] = ratio

    length = 200 if args.quick else 1000
    print(f"\ngeneration, LSTM 2x512, {length} characters per stream (no grad)")
    for streams in (1, 16):
        speed = {b: bench_generation(streams, length, b, device) for b in ("native", "fused")}
        print(f"{streams:>3} stream(s): native {speed['native']:>9,.0f} chars/s   fused {speed['fused']:>9,.0f} chars/s")
        results[f"gen{streams}_native_chars_per_s"] = speed["native"]
        results[f"gen{streams}_fused_chars_per_s"] = speed["fused"]
    results["gen_chars_per_s"] = results["gen1_native_chars_per_s"]

    chars = 200_000 if args.quick else 1_000_000
    ids = text_ids(chars)
    print(f"\nevaluation, LSTM 2x256, {ids.numel():,} characters of text, 64 streams")
    speed = {b: bench_eval(ids, b, device) for b in ("native", "fused")}
    print(f"native {speed['native']:>9,.0f} chars/s   fused {speed['fused']:>9,.0f} chars/s")
    results["eval_chars_per_s"] = speed["native"]
    results["eval_fused_chars_per_s"] = speed["fused"]

    if not args.quick:
        print("\npeak RSS, fresh process per variant, 3 training steps at B=32 T=128 H=256")
        for kind in ("lstm", "rnn", "gru"):
            rss = {b: peak_rss_mb(kind, b, 32, 128, 256, args.device) for b in ("native", "fused")}
            print(f"{kind:6} native {rss['native']:7.0f} MB   fused {rss['fused']:7.0f} MB")
            results[f"{kind}_native_peak_rss_mb"] = rss["native"]
            results[f"{kind}_fused_peak_rss_mb"] = rss["fused"]

    results["device"] = where
    results["precision"] = args.precision
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
