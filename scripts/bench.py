"""Benchmark charlm's recurrent backends against the torch.nn module a user would otherwise pick.

    python scripts/bench.py            # full tables (3-4 minutes on 2 CPU cores)
    python scripts/bench.py --quick    # fewer rounds, smaller texts (under 90 s)
    python scripts/bench.py --json     # ... and one JSON object as the last line

Variants, all with the same weights: charlm `native` (its own step loops), charlm `fused`
(torch.lstm / gru / rnn_tanh called on charlm's per-layer parameters) and `torch.nn` (a plain
Embedding -> torch.nn.LSTM / GRU / RNN -> Linear model, charlm's weights copied in; generation
and evaluation use the loop a user would write around it). Each round runs every variant once,
the order rotated by one every round so no variant is always first; after warm-up the median
over the rounds is reported, so a noisy machine slows all variants alike. Training is a full
step: forward, cross-entropy, backward, AdamW. A profiler pass records which variants run
oneDNN's (or cuDNN's) RNN kernels. Peak RSS: each variant alone in a fresh process (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_kernels import bf16_support, describe_device, report_kernels, report_peak_rss
from bench_variants import (
    BF16_NATIVE,
    PRECISION,
    VARIANTS,
    E,
    L,
    V,
    bench_eval,
    bench_generation,
    bench_mixed,
    bench_training,
    key,
)

from charlm import hardware
from charlm.config import ModelConfig
from charlm.data.sources import read_text
from charlm.data.vocab import Vocab
from charlm.models.autotune import Workload, candidates, choose
from charlm.models.native import cpp_loops
from charlm.training.runtime import usable_precision

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def text_ids(chars: int) -> tuple[torch.Tensor, str]:
    """Ids in [0, V) of the first `chars` characters of Tiny Shakespeare (else Python's stdlib source), and its name."""
    source, name = (str(SHAKESPEARE), "Tiny Shakespeare") if SHAKESPEARE.is_file() else ("builtin:python-stdlib",) * 2
    text = read_text(source)[:chars]
    ids = Vocab.from_text(text).encode(text).ids.long()
    return ids % V, name  # % V: keep the benchmark vocabulary at V whatever the text


def report_training(shapes: list, rounds: int, device: torch.device, precision: str, results: dict) -> None:
    print(
        f"\ntraining step (forward + cross-entropy + backward + AdamW), chars/s, median of {rounds} rounds, "
        f"order rotated each round; E={E}, L={L}, {precision}"
    )
    print(
        f"{'model':6} {'B':>4} {'T':>4} {'H':>4} {'native':>9} {'fused':>9} {'torch.nn':>9}"
        f" {'native/fused':>13} {'native/torch.nn':>16}"
    )
    for kind, batch, seq, hidden in shapes:
        speed = bench_training(kind, batch, seq, hidden, rounds, device, precision)
        vs_fused, vs_nn = speed["native"] / speed["fused"], speed["native"] / speed["torch.nn"]
        print(
            f"{kind:6} {batch:>4} {seq:>4} {hidden:>4} {speed['native']:>9,.0f} {speed['fused']:>9,.0f}"
            f" {speed['torch.nn']:>9,.0f} {vs_fused:>13.2f} {vs_nn:>16.2f}"
        )
        row = f"train_{kind}_B{batch}_T{seq}_H{hidden}"
        results.update({f"{row}_{key(v)}_chars_per_s": speed[v] for v in VARIANTS})
        results[f"{row}_native_vs_fused"], results[f"{row}_native_vs_torch_nn"] = vs_fused, vs_nn
        if (batch, seq, hidden) == (32, 128, 256):  # the headline shape keeps its short keys
            results.update({f"{kind}_{key(v)}_chars_per_s": speed[v] for v in VARIANTS})
            results[f"{kind}_ratio"], results[f"{kind}_vs_torch_nn"] = vs_fused, vs_nn
        else:
            results[f"{kind}_B{batch}_H{hidden}_ratio"] = vs_fused


BF16_SHAPES = [("lstm", 32, 128, 256), ("lstm", 64, 64, 384), ("gru", 32, 128, 256), ("rnn", 32, 128, 256)]


def report_bf16(rounds: int, device: torch.device, supported: bool, results: dict) -> None:
    """bf16 training: charlm's mixed-precision loops against its fp32 loops and torch.nn under bf16 autocast."""
    results["lstm_bf16_vs_torch_nn_bf16"] = results["lstm_bf16_vs_fp32"] = None
    if not supported:
        return
    print(
        f"\ntraining step under torch.autocast bf16 (master weights fp32), chars/s, median of {rounds} rotated rounds"
    )
    print(
        f"{'model':6} {'B':>4} {'T':>4} {'H':>4} {'native fp32':>12} {'native bf16':>12} {'torch.nn bf16':>14}"
        f" {'bf16/fp32':>10} {'bf16/torch.nn bf16':>19}"
    )
    for kind, batch, seq, hidden in BF16_SHAPES:
        speed = bench_mixed(kind, batch, seq, hidden, rounds, device)
        vs_fp32 = speed[BF16_NATIVE] / speed["native fp32"]
        vs_nn = speed[BF16_NATIVE] / speed["torch.nn bf16"]
        print(
            f"{kind:6} {batch:>4} {seq:>4} {hidden:>4} {speed['native fp32']:>12,.0f} {speed[BF16_NATIVE]:>12,.0f}"
            f" {speed['torch.nn bf16']:>14,.0f} {vs_fp32:>10.2f} {vs_nn:>19.2f}"
        )
        name = kind if (batch, seq, hidden) == (32, 128, 256) else f"{kind}_B{batch}_H{hidden}"
        results[f"{name}_bf16_native_chars_per_s"] = speed[BF16_NATIVE]
        results[f"{name}_bf16_torch_nn_chars_per_s"] = speed["torch.nn bf16"]
        results[f"{name}_bf16_vs_fp32"], results[f"{name}_bf16_vs_torch_nn_bf16"] = vs_fp32, vs_nn


AUTO_SHAPES = [(32, 128, 256), (64, 64, 384)]  # the two bench shapes: (B, T, H)
AUTO_CELLS = ("lstm", "gru", "rnn", "mingru")


def bench_auto_cell(
    kind: str, batch: int, seq: int, hidden: int, precision: str, rounds: int, device: torch.device
) -> tuple[str, dict[str, float]]:
    """What `model.backend: auto` picks for one cell, precision and shape (measured afresh, as on a
    first run), and chars/s of native, fused and torch.nn training steps, rotated round by round."""
    cfg = ModelConfig(type=kind, hidden_size=hidden, num_layers=L, embedding_dim=E)
    pick = choose("auto", cfg, V, device, precision, Workload.training(batch, seq)).backend
    variants = [*candidates(kind), *(["torch.nn"] if kind != "mingru" else [])]
    return pick, bench_training(kind, batch, seq, hidden, rounds, device, precision, variants)


def report_auto(shapes: list, rounds: int, device: torch.device, bf16: bool, results: dict) -> None:
    """auto's pick against the best of the backends it chose from, for every cell, precision and shape:
    auto_vs_best = chars/s of the pick / chars/s of the fastest eligible backend, same rounds."""
    os.environ["CHARLM_AUTO"] = "measure"  # and a fresh cache: each pick is measured, as on a first run
    os.environ["CHARLM_CACHE_DIR"] = str(Path(tempfile.mkdtemp(prefix="charlm-bench-auto-")))
    precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    print(
        f"\nmodel.backend: auto against each backend, training step chars/s, median of {rounds} rotated rounds "
        f"({torch.get_num_threads()} threads); auto measured afresh for each row"
    )
    print(
        f"{'model':6} {'prec':5} {'B':>4} {'T':>4} {'H':>4} {'native':>9} {'fused':>9} {'torch.nn':>9} "
        f"{'auto ->':>8} {'auto/best':>10}"
    )
    for kind in AUTO_CELLS:
        for precision in precisions:
            for batch, seq, hidden in shapes:
                pick, speed = bench_auto_cell(kind, batch, seq, hidden, precision, rounds, device)
                best = max(speed[b] for b in speed if b != "torch.nn")
                ratio = speed[pick] / best
                cells = "".join(f" {speed[v]:>9,.0f}" if v in speed else f" {'-':>9}" for v in VARIANTS)
                print(f"{kind:6} {precision:5} {batch:>4} {seq:>4} {hidden:>4}{cells} {pick:>8} {ratio:>10.2f}")
                name = f"{kind}_{precision}" + ("" if (batch, seq, hidden) == shapes[0] else f"_B{batch}_H{hidden}")
                results[f"auto_{name}"] = pick
                results[f"auto_vs_best_{name}"] = ratio
                results.update({f"auto_row_{name}_{key(v)}_chars_per_s": speed[v] for v in speed})


def report_generation(length: int, rounds: int, device: torch.device, bf16: bool, results: dict) -> None:
    print(
        f"\ngeneration, LSTM 2x512, {length} characters per stream, no grad, one cached step at a time, "
        f"chars/s, median of {rounds} rotated rounds"
    )
    for streams in (1, 16):
        speed = bench_generation(streams, length, rounds, device, bf16)
        print(
            f"{streams:>3} stream(s): "
            + "   ".join(f"{v} {speed[v]:>8,.0f}" for v in speed)
            + f"   native/torch.nn {speed['native'] / speed['torch.nn']:.2f}"
        )
        results.update({f"gen{streams}_{key(v)}_chars_per_s": speed[v] for v in VARIANTS})
        if BF16_NATIVE in speed:
            results[f"gen{streams}_bf16_chars_per_s"] = speed[BF16_NATIVE]
            results[f"gen{streams}_bf16_vs_fp32"] = speed[BF16_NATIVE] / speed["native"]
    results["gen_chars_per_s"] = results["gen1_native_chars_per_s"]


def report_eval(chars: int, rounds: int, device: torch.device, bf16: bool, results: dict) -> None:
    ids, source = text_ids(chars)
    print(
        f"\nevaluation, LSTM 2x256, {ids.numel():,} characters of {source}, 64 streams, state carried, "
        f"chars/s, median of {rounds} rotated rounds"
    )
    speed = bench_eval(ids, rounds, device, bf16)
    print(
        "   ".join(f"{v} {speed[v]:>9,.0f}" for v in speed)
        + f"   native/torch.nn {speed['native'] / speed['torch.nn']:.2f}"
    )
    results["eval_chars_per_s"] = speed["native"]
    results["eval_fused_chars_per_s"] = speed["fused"]
    results["eval_torch_nn_chars_per_s"] = speed["torch.nn"]
    results["eval_text_chars"] = ids.numel()
    if BF16_NATIVE in speed:
        results["eval_bf16_chars_per_s"] = speed[BF16_NATIVE]
        results["eval_bf16_vs_fp32"] = speed[BF16_NATIVE] / speed["native"]


def hardware_model() -> str:
    return hardware.cpu_model()


def usable_bf16(device: torch.device, supported: bool) -> bool:
    """Whether charlm itself runs bf16 here (it runs fp32 instead on a CPU, or a CHARLM_MAX_ISA level,
    without bf16 units): auto's bf16 rows are skipped where it would not."""
    return supported and usable_precision(device, "bf16")[0] == "bf16"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller texts (< 90 s on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISION), help="autocast for training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    parser.add_argument(
        "--auto-only", action="store_true", help="only auto's rows: every cell in fp32 and bf16 at both bench shapes"
    )
    parser.add_argument(
        "--isa-matrix",
        action="store_true",
        help="auto's rows once per ISA level this CPU has (CHARLM_MAX_ISA with oneDNN and MKL "
        "capped alike) and once without the C++ loops, each in a fresh process",
    )
    return parser.parse_args()


def isa_matrix(args) -> None:
    """Run --auto-only in a child process per ISA level (and one with CHARLM_NO_CPP=1), then print
    one table of them all: what an older or smaller CPU of this family would do."""
    top = hardware.cpu_isa_level()
    rows = [
        (
            level,
            {
                hardware.ISA_ENV: level,
                "ONEDNN_MAX_CPU_ISA": hardware.ONEDNN_ISA[level],
                "MKL_ENABLE_INSTRUCTIONS": hardware.MKL_ISA[level],
            },
        )
        for level in hardware.ISA_LEVELS
        if hardware.at_least(top, level)
    ]
    rows.append(("no C++", {"CHARLM_NO_CPP": "1"}))
    matrix, started = {}, time.perf_counter()
    for name, env in rows:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--auto-only",
            "--json",
            *(["--quick"] if args.quick else []),
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
        print(f"\n=== {name}: {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        print("\n".join(lines[:-1]), flush=True)
        if done.returncode != 0:
            print(done.stderr[-2000:])
            raise SystemExit(f"the {name} row failed")
        matrix[name] = json.loads(lines[-1])
    print(
        f"\nISA matrix on {hardware.cpu_model()}, {matrix[rows[0][0]]['threads']} threads, training step "
        "chars/s (auto/best: auto's pick over the fastest of native and fused)"
    )
    print(
        f"{'level':12} {'model':6} {'prec':5} {'B':>3} {'H':>4} {'native':>8} {'fused':>8} {'torch.nn':>8} "
        f"{'auto ->':>7} {'auto/best':>9}"
    )
    worst = 1.0
    for name, found in matrix.items():
        for k in sorted(k for k in found if k.startswith("auto_vs_best_")):
            cell = k[len("auto_vs_best_") :]
            kind, precision = cell.split("_")[:2]
            batch, hidden = (64, 384) if "_B64_" in cell + "_" else (32, 256)
            speed = [found.get(f"auto_row_{cell}_{v}_chars_per_s") for v in ("native", "fused", "torch_nn")]
            shown = "".join(f" {s:>8,.0f}" if s else f" {'-':>8}" for s in speed)
            print(
                f"{name:12} {kind:6} {precision:5} {batch:>3} {hidden:>4}{shown} {found[f'auto_{cell}']:>7} "
                f"{found[k]:>9.2f}"
            )
            worst = min(worst, found[k])
    print(f"\nlowest auto/best in the matrix: {worst:.2f}; took {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps({"cpu": hardware.cpu_model(), "matrix": matrix, "auto_vs_best_min": worst}))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa_matrix:
        isa_matrix(args)
        return
    started = time.perf_counter()
    device = torch.device(args.device)
    rounds = 5 if args.quick else 15
    where, libraries = describe_device(device)
    native_kind = "C++ step loop" if device.type == "cpu" and cpp_loops() is not None else "PyTorch step loop"
    print(f"device: {where}; torch {torch.__version__}; native backend = {native_kind}; precision {args.precision}")
    bf16, bf16_line = bf16_support(device)
    print("\n".join(libraries + [bf16_line]))
    results: dict = {
        "device": where,
        "precision": args.precision,
        "rounds": rounds,
        "bf16_supported": bf16,
        "threads": torch.get_num_threads(),
        "cpu": hardware_model(),
    }
    if args.auto_only:
        report_auto(AUTO_SHAPES, rounds, device, usable_bf16(device, bf16), results)
        results["bench_seconds"] = time.perf_counter() - started
        print(f"\nbenchmark took {results['bench_seconds']:.0f} s")
        if args.json:
            print(json.dumps(results))
        return
    if device.type == "cpu":
        results["mkldnn_available"] = torch.backends.mkldnn.is_available()
        results["mkldnn_enabled"] = torch.backends.mkldnn.enabled
    report_kernels(device, bf16, results)

    shapes = [("lstm", 32, 128, 256), ("lstm", 64, 64, 384), ("gru", 32, 128, 256), ("rnn", 32, 128, 256)]
    if not args.quick:
        shapes += [("lstm", 32, 128, 512), ("lstm", 64, 128, 256)]
    report_training(shapes, rounds, device, args.precision, results)
    report_bf16(rounds, device, bf16, results)
    native_bf16 = bf16 and device.type == "cpu" and cpp_loops() is not None  # the mixed-precision loops
    report_auto(AUTO_SHAPES[:1] if args.quick else AUTO_SHAPES, rounds, device, usable_bf16(device, bf16), results)
    report_generation(100 if args.quick else 400, 3 if args.quick else 5, device, native_bf16, results)
    report_eval(100_000 if args.quick else 1_000_000, 3, device, native_bf16, results)
    if not args.quick:
        report_peak_rss(args.device, results)
    results["bench_seconds"] = time.perf_counter() - started
    print(f"\nbenchmark took {results['bench_seconds']:.0f} s")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
