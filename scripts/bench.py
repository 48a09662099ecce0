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
import collections
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from reference_lstm import TorchNNLM
from torch import nn

from charlm import hardware
from charlm.config import ModelConfig
from charlm.data.sources import read_text
from charlm.data.vocab import Vocab
from charlm.inference.evaluate import IGNORE, evaluate_ids, stream_layout
from charlm.inference.sample import generate, make_generator
from charlm.models.autotune import Workload, candidates, choose
from charlm.models.model import CharLM
from charlm.models.native import cpp_loops
from charlm.training.runtime import usable_precision

V, E, L = 65, 64, 2  # Tiny Shakespeare's vocabulary size, the default embedding, layers
VARIANTS = ("native", "fused", "torch.nn")
PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PROFILE_T = 5  # steps of the profiled forward: small, and distinct from L in the op counts
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(kind: str, backend: str, hidden: int, layers: int, device: torch.device) -> CharLM:
    torch.manual_seed(0)  # every variant starts from the same weights
    return CharLM(ModelConfig(type=kind, hidden_size=hidden, num_layers=layers, embedding_dim=E), V, backend).to(device)


@torch.no_grad()
def torch_nn_copy(model: CharLM, kind: str) -> TorchNNLM:
    """The plain torch.nn model with `model`'s weights: charlm's cells use torch.nn's names and layout."""
    peer = TorchNNLM(V, E, model.rnn.hidden_size, model.rnn.num_layers, kind)
    assert model.embedding is not None, "the bench models read characters through an embedding"
    peer.embedding.weight.copy_(model.embedding.weight)
    for k, cell in enumerate(model.rnn.layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(peer.rnn, f"{name}_l{k}").copy_(getattr(cell, name))
    peer.head.load_state_dict(model.head.state_dict())
    return peer


def build_variant(kind: str, variant: str, hidden: int, device: torch.device) -> nn.Module:
    """One of VARIANTS, built on the CPU from seed 0 and moved to `device`."""
    built = make_model(kind, "native" if variant == "torch.nn" else variant, hidden, L, torch.device("cpu"))
    model: nn.Module = built
    if variant == "torch.nn":
        model = torch_nn_copy(built, kind)
        check_same_function(built, model)
    return model.to(device)  # torch.nn's RNN modules re-flatten their weights here (cuDNN wants one chunk)


@torch.no_grad()
def check_same_function(model: nn.Module, peer: nn.Module) -> None:
    x = torch.randint(0, V, (2, 8))
    assert torch.allclose(model(x)[0], peer(x)[0], atol=1e-4), "torch.nn copy does not compute what charlm does"


def train_step(model, optimizer, x, y, precision: str = "fp32") -> None:
    dtype = PRECISION[precision]
    with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def rotated_medians(runs: Mapping[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each run; every round calls each once, the order rotated by one per round."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_training(kind: str, batch: int, seq: int, hidden: int, rounds: int, device: torch.device,
                   precision: str = "fp32", variants=VARIANTS) -> dict[str, float]:
    """Chars/s of each variant's full training step, rotated round by round."""
    models = {v: build_variant(kind, v, hidden, device) for v in variants}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=1e-3) for v, m in models.items()}
    x = torch.randint(0, V, (batch, seq), device=device)
    y = torch.randint(0, V, (batch, seq), device=device)
    runs = {v: (lambda v=v: train_step(models[v], optimizers[v], x, y, precision)) for v in variants}
    rotated_medians(runs, 2, device)  # warm-up: allocator, oneDNN primitive caches, AdamW state
    return {v: batch * seq / s for v, s in rotated_medians(runs, rounds, device).items()}


@torch.no_grad()
def generate_torch_nn(model: TorchNNLM, prompt: torch.Tensor, length: int, streams: int,
                      generator: torch.Generator) -> torch.Tensor:
    """A user's sampling loop: read the prompt once, then one step per character with the state cached."""
    logits, state = model(prompt[None])  # [1, P, V]
    logits = logits[:, -1].expand(streams, -1)  # [N, V]
    state = tuple(s.repeat(1, streams, 1) for s in state)  # each [L, N, H]
    out = torch.empty(streams, length, dtype=torch.long)
    for t in range(length):
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)  # [N, 1]
        out[:, t] = nxt[:, 0].cpu()
        if t + 1 < length:
            logits, state = model(nxt, state)  # [N, 1, V]
            logits = logits[:, -1]
    return out


BF16_NATIVE = "native bf16"  # charlm native under torch.autocast bf16: the mixed-precision loops


def in_precision(variant: str, device: torch.device, run: Callable[..., object]) -> Callable[[], object]:
    """`run`, under bf16 autocast for the BF16_NATIVE variant."""
    if variant != BF16_NATIVE:
        return run

    def autocast_run():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return run()
    return autocast_run


def inference_models(hidden: int, device: torch.device, bf16: bool) -> dict[str, nn.Module]:
    models = {v: build_variant("lstm", v, hidden, device).eval() for v in VARIANTS}
    if bf16:
        models[BF16_NATIVE] = models["native"]  # the same weights, run in bf16
    return models


def generation_runs(models: dict, streams: int, length: int, device: torch.device) -> dict[str, Callable]:
    prompt = torch.randint(0, V, (16,), device=device)
    sampler = {v: (generate_torch_nn if v == "torch.nn" else generate) for v in models}
    return {v: in_precision(v, device, lambda v=v, n=length: sampler[v](models[v], prompt, n, streams,
                                                                        generator=make_generator(device, 0)[0]))
            for v in models}


def bench_generation(streams: int, length: int, rounds: int, device: torch.device, bf16: bool) -> dict[str, float]:
    """Chars/s of LSTM 2x512 sampling, one cached step at a time, rotated round by round."""
    models = inference_models(512, device, bf16)
    for run in generation_runs(models, streams, 8, device).values():
        run()  # warm-up
    seconds = rotated_medians(generation_runs(models, streams, length, device), rounds, device)
    return {v: streams * length / s for v, s in seconds.items()}


@torch.no_grad()
def evaluate_torch_nn(model: TorchNNLM, inputs: torch.Tensor, targets: torch.Tensor, window: int = 64) -> float:
    """A user's scoring loop over S streams [S, N] in windows, state carried: mean cross-entropy."""
    device = next(model.parameters()).device
    state, total = None, 0.0
    for start in range(0, inputs.shape[1], window):
        logits, state = model(inputs[:, start:start + window].to(device), state)  # [S, W, V]
        y = targets[:, start:start + window].to(device)
        total += F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=IGNORE, reduction="sum").item()
    return total / int((targets != IGNORE).sum())


def evaluation_runs(models: dict, ids: torch.Tensor) -> dict[str, Callable]:
    """charlm's evaluate_ids for its backends; the same stream layout in a user's loop for torch.nn."""
    inputs, targets = stream_layout(ids, 64)  # [S, W + L]: what evaluate_ids reads
    device = next(iter(models.values())).head.weight.device
    return {v: in_precision(v, device, lambda v=v: evaluate_torch_nn(models[v], inputs, targets) if v == "torch.nn"
                            else evaluate_ids(models[v], ids, streams=64).loss_nats) for v in models}


def bench_eval(ids: torch.Tensor, rounds: int, device: torch.device, bf16: bool) -> dict[str, float]:
    """Chars/s of scoring `ids` with LSTM 2x256, 64 streams, rotated round by round."""
    models = inference_models(256, device, bf16)
    losses = {v: run() for v, run in evaluation_runs(models, ids[:5000]).items()}  # warm-up
    assert abs(losses["native"] - losses["torch.nn"]) < 1e-3, f"native and torch.nn disagree: {losses}"
    assert BF16_NATIVE not in losses or abs(losses[BF16_NATIVE] - losses["native"]) < 2e-2, losses
    seconds = rotated_medians(evaluation_runs(models, ids), rounds, device)
    return {v: ids.numel() / s for v, s in seconds.items()}


@contextlib.contextmanager
def silenced_stderr():
    """fd 2 to /dev/null: the profiler's tracing library logs its start and stop there."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profiled_ops(module: nn.Module, x: torch.Tensor, dtype=None) -> collections.Counter:
    """Op names (with counts) that one forward + backward of `module` on x runs, recorded by torch.profiler."""
    with silenced_stderr(), torch.profiler.profile() as prof:
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
            out = module(x)[0]
        out.float().sum().backward()
    return collections.Counter(event.name for event in prof.events())


def vendor_rnn_ops(kind: str, variant: str, device: torch.device, dtype=None) -> list[str]:
    """The oneDNN (mkldnn) and cuDNN RNN ops one training forward + backward of a small variant runs."""
    x = torch.randint(0, V, (2, PROFILE_T), device=device)
    ops = profiled_ops(build_variant(kind, variant, 16, device), x, dtype)
    return sorted(n for n in ops if n.startswith("aten::") and ("mkldnn" in n or "cudnn_rnn" in n))


def step_loop_evidence(kind: str, device: torch.device) -> tuple[int, int]:
    """torch.nn's recurrent module alone: its aten::linear calls and the autograd matmul nodes of its backward."""
    rnn = cast(nn.Module, build_variant(kind, "torch.nn", 16, device).rnn)  # nn.Module types it as Tensor | Module
    ops = profiled_ops(rnn, torch.randn(2, PROFILE_T, E, device=device))
    return ops["aten::linear"], ops["AddmmBackward0"] + ops["MmBackward0"]


def rnn_kernel_check(device: torch.device, bf16: bool) -> dict[str, dict[str, list[str]]]:
    """Per model kind and variant, the vendor RNN ops it runs; the LSTMs under bf16 autocast too."""
    found = {kind: {v: vendor_rnn_ops(kind, v, device) for v in VARIANTS} for kind in ("lstm", "gru", "rnn")}
    if bf16:
        found["lstm_bf16"] = {v: vendor_rnn_ops("lstm", v, device, torch.bfloat16) for v in ("native", "torch.nn")}
    return found


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 rows can run here, and a line that says why."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"bf16: {'supported' if ok else 'not supported'} on this GPU"
    try:  # the check torch itself uses before it picks oneDNN's bf16 kernels
        ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        ok = False
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if not ok:
        return False, "bf16: this CPU lacks bf16 support in oneDNN; bf16 rows skipped"
    how = f"bf16 instructions: {', '.join(native)}" if native else "no bf16 instructions, so oneDNN emulates it"
    return True, f"bf16: supported by oneDNN on this CPU ({how})"


def describe_kernels(found: dict) -> list[str]:
    """One line per model kind: the vendor RNN ops each variant ran ('none' when it ran none)."""
    lines = []
    for kind, per_variant in found.items():
        parts = [f"{v}: {', '.join(ops) if ops else 'none'}" for v, ops in per_variant.items()]
        lines.append(f"  {kind:9} " + "   ".join(parts))
    return lines


def own_peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM restarts at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: may include the parent's


def peak_rss_mb(kind: str, variant: str, batch: int, seq: int, hidden: int, device: str) -> float:
    """Peak RSS of a fresh process that trains a few steps of one variant."""
    code = ("import sys, torch; sys.argv=['bench']; import bench; "
            f"d=torch.device('{device}'); m=bench.build_variant('{kind}','{variant}',{hidden},d); "
            "o=torch.optim.AdamW(m.parameters()); "
            f"x=torch.randint(0,bench.V,({batch},{seq}),device=d); "
            "[bench.train_step(m,o,x,x) for _ in range(3)]; "
            "print(bench.own_peak_rss_kb())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def text_ids(chars: int) -> tuple[torch.Tensor, str]:
    """Ids in [0, V) of the first `chars` characters of Tiny Shakespeare (else Python's stdlib source), and its name."""
    source, name = (str(SHAKESPEARE), "Tiny Shakespeare") if SHAKESPEARE.is_file() else ("builtin:python-stdlib",) * 2
    text = read_text(source)[:chars]
    ids = Vocab.from_text(text).encode(text).ids.long()
    return ids % V, name  # % V: keep the benchmark vocabulary at V whatever the text


def key(variant: str) -> str:
    return variant.replace(".", "_")


def report_training(shapes: list, rounds: int, device: torch.device, precision: str, results: dict) -> None:
    print(f"\ntraining step (forward + cross-entropy + backward + AdamW), chars/s, median of {rounds} rounds, "
          f"order rotated each round; E={E}, L={L}, {precision}")
    print(f"{'model':6} {'B':>4} {'T':>4} {'H':>4} {'native':>9} {'fused':>9} {'torch.nn':>9}"
          f" {'native/fused':>13} {'native/torch.nn':>16}")
    for kind, batch, seq, hidden in shapes:
        speed = bench_training(kind, batch, seq, hidden, rounds, device, precision)
        vs_fused, vs_nn = speed["native"] / speed["fused"], speed["native"] / speed["torch.nn"]
        print(f"{kind:6} {batch:>4} {seq:>4} {hidden:>4} {speed['native']:>9,.0f} {speed['fused']:>9,.0f}"
              f" {speed['torch.nn']:>9,.0f} {vs_fused:>13.2f} {vs_nn:>16.2f}")
        row = f"train_{kind}_B{batch}_T{seq}_H{hidden}"
        results.update({f"{row}_{key(v)}_chars_per_s": speed[v] for v in VARIANTS})
        results[f"{row}_native_vs_fused"], results[f"{row}_native_vs_torch_nn"] = vs_fused, vs_nn
        if (batch, seq, hidden) == (32, 128, 256):  # the headline shape keeps its short keys
            results.update({f"{kind}_{key(v)}_chars_per_s": speed[v] for v in VARIANTS})
            results[f"{kind}_ratio"], results[f"{kind}_vs_torch_nn"] = vs_fused, vs_nn
        else:
            results[f"{kind}_B{batch}_H{hidden}_ratio"] = vs_fused


BF16_SHAPES = [("lstm", 32, 128, 256), ("lstm", 64, 64, 384), ("gru", 32, 128, 256), ("rnn", 32, 128, 256)]


def bench_mixed(kind: str, batch: int, seq: int, hidden: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Chars/s of native fp32, native bf16 and torch.nn bf16 training steps, rotated round by round."""
    combos = {"native fp32": ("native", "fp32"), BF16_NATIVE: ("native", "bf16"), "torch.nn bf16": ("torch.nn", "bf16")}
    models = {name: build_variant(kind, variant, hidden, device) for name, (variant, _) in combos.items()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    x = torch.randint(0, V, (batch, seq), device=device)
    y = torch.randint(0, V, (batch, seq), device=device)
    runs = {name: (lambda n=name: train_step(models[n], optimizers[n], x, y, combos[n][1])) for name in combos}
    rotated_medians(runs, 2, device)  # warm-up
    return {name: batch * seq / s for name, s in rotated_medians(runs, rounds, device).items()}


def report_bf16(rounds: int, device: torch.device, supported: bool, results: dict) -> None:
    """bf16 training: charlm's mixed-precision loops against its fp32 loops and torch.nn under bf16 autocast."""
    results["lstm_bf16_vs_torch_nn_bf16"] = results["lstm_bf16_vs_fp32"] = None
    if not supported:
        return
    print(f"\ntraining step under torch.autocast bf16 (master weights fp32), chars/s, median of {rounds} rotated rounds")
    print(f"{'model':6} {'B':>4} {'T':>4} {'H':>4} {'native fp32':>12} {'native bf16':>12} {'torch.nn bf16':>14}"
          f" {'bf16/fp32':>10} {'bf16/torch.nn bf16':>19}")
    for kind, batch, seq, hidden in BF16_SHAPES:
        speed = bench_mixed(kind, batch, seq, hidden, rounds, device)
        vs_fp32 = speed[BF16_NATIVE] / speed["native fp32"]
        vs_nn = speed[BF16_NATIVE] / speed["torch.nn bf16"]
        print(f"{kind:6} {batch:>4} {seq:>4} {hidden:>4} {speed['native fp32']:>12,.0f} {speed[BF16_NATIVE]:>12,.0f}"
              f" {speed['torch.nn bf16']:>14,.0f} {vs_fp32:>10.2f} {vs_nn:>19.2f}")
        name = kind if (batch, seq, hidden) == (32, 128, 256) else f"{kind}_B{batch}_H{hidden}"
        results[f"{name}_bf16_native_chars_per_s"] = speed[BF16_NATIVE]
        results[f"{name}_bf16_torch_nn_chars_per_s"] = speed["torch.nn bf16"]
        results[f"{name}_bf16_vs_fp32"], results[f"{name}_bf16_vs_torch_nn_bf16"] = vs_fp32, vs_nn


AUTO_SHAPES = [(32, 128, 256), (64, 64, 384)]  # the two bench shapes: (B, T, H)
AUTO_CELLS = ("lstm", "gru", "rnn", "mingru")


def bench_auto_cell(kind: str, batch: int, seq: int, hidden: int, precision: str, rounds: int,
                    device: torch.device) -> tuple[str, dict[str, float]]:
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
    print(f"\nmodel.backend: auto against each backend, training step chars/s, median of {rounds} rotated rounds "
          f"({torch.get_num_threads()} threads); auto measured afresh for each row")
    print(f"{'model':6} {'prec':5} {'B':>4} {'T':>4} {'H':>4} {'native':>9} {'fused':>9} {'torch.nn':>9} "
          f"{'auto ->':>8} {'auto/best':>10}")
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
    print(f"\ngeneration, LSTM 2x512, {length} characters per stream, no grad, one cached step at a time, "
          f"chars/s, median of {rounds} rotated rounds")
    for streams in (1, 16):
        speed = bench_generation(streams, length, rounds, device, bf16)
        print(f"{streams:>3} stream(s): " + "   ".join(f"{v} {speed[v]:>8,.0f}" for v in speed)
              + f"   native/torch.nn {speed['native'] / speed['torch.nn']:.2f}")
        results.update({f"gen{streams}_{key(v)}_chars_per_s": speed[v] for v in VARIANTS})
        if BF16_NATIVE in speed:
            results[f"gen{streams}_bf16_chars_per_s"] = speed[BF16_NATIVE]
            results[f"gen{streams}_bf16_vs_fp32"] = speed[BF16_NATIVE] / speed["native"]
    results["gen_chars_per_s"] = results["gen1_native_chars_per_s"]


def report_eval(chars: int, rounds: int, device: torch.device, bf16: bool, results: dict) -> None:
    ids, source = text_ids(chars)
    print(f"\nevaluation, LSTM 2x256, {ids.numel():,} characters of {source}, 64 streams, state carried, "
          f"chars/s, median of {rounds} rotated rounds")
    speed = bench_eval(ids, rounds, device, bf16)
    print("   ".join(f"{v} {speed[v]:>9,.0f}" for v in speed)
          + f"   native/torch.nn {speed['native'] / speed['torch.nn']:.2f}")
    results["eval_chars_per_s"] = speed["native"]
    results["eval_fused_chars_per_s"] = speed["fused"]
    results["eval_torch_nn_chars_per_s"] = speed["torch.nn"]
    results["eval_text_chars"] = ids.numel()
    if BF16_NATIVE in speed:
        results["eval_bf16_chars_per_s"] = speed[BF16_NATIVE]
        results["eval_bf16_vs_fp32"] = speed[BF16_NATIVE] / speed["native"]


def report_kernels(device: torch.device, bf16: bool, results: dict) -> None:
    """Print, from profiled runs, which variants use a vendor RNN kernel, and what torch.nn runs otherwise."""
    found = rnn_kernel_check(device, bf16)
    print(f"vendor RNN kernels (ops named *mkldnn* / *cudnn_rnn*) seen by torch.profiler in one forward + "
          f"backward of each variant on {device.type}:")
    print("\n".join(describe_kernels(found)))
    for kind in ("lstm", "gru", "rnn"):
        if not found[kind]["torch.nn"]:
            calls, backward = step_loop_evidence(kind, device)
            loop = (" (per layer one input projection + one per step): torch's generic step loop, differentiated "
                    "by autograd" if calls == backward == L * (PROFILE_T + 1) else "")
            print(f"  torch.nn.{kind.upper()}: no vendor RNN kernel; at T={PROFILE_T}, L={L} it ran {calls} "
                  f"aten::linear and {backward} matmul backward nodes{loop}")
    results["rnn_kernel_ops"] = found


def report_peak_rss(device: str, results: dict) -> None:
    print("\npeak RSS, fresh process per variant, 3 training steps at B=32 T=128 H=256")
    for kind in ("lstm", "rnn", "gru"):
        rss = {v: peak_rss_mb(kind, v, 32, 128, 256, device) for v in VARIANTS}
        print(f"{kind:6} " + "   ".join(f"{v} {rss[v]:6.0f} MB" for v in VARIANTS))
        results.update({f"{kind}_{key(v)}_peak_rss_mb": rss[v] for v in VARIANTS})


def describe_device(device: torch.device) -> tuple[str, list[str]]:
    """The device in words, and lines on the vendor libraries torch can use there."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
        return where, [f"cuDNN: available {torch.backends.cudnn.is_available()}, "
                       f"version {torch.backends.cudnn.version()}, enabled {torch.backends.cudnn.enabled}"]
    where = f"CPU, {torch.get_num_threads()} threads"
    return where, [f"oneDNN (mkldnn): available {torch.backends.mkldnn.is_available()}, "
                   f"enabled {torch.backends.mkldnn.enabled} (torch.backends.mkldnn)"]


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
    parser.add_argument("--auto-only", action="store_true",
                        help="only auto's rows: every cell in fp32 and bf16 at both bench shapes")
    parser.add_argument("--isa-matrix", action="store_true",
                        help="auto's rows once per ISA level this CPU has (CHARLM_MAX_ISA with oneDNN and MKL "
                             "capped alike) and once without the C++ loops, each in a fresh process")
    return parser.parse_args()


def isa_matrix(args) -> None:
    """Run --auto-only in a child process per ISA level (and one with CHARLM_NO_CPP=1), then print
    one table of them all: what an older or smaller CPU of this family would do."""
    top = hardware.cpu_isa_level()
    rows = [(level, {hardware.ISA_ENV: level, "ONEDNN_MAX_CPU_ISA": hardware.ONEDNN_ISA[level],
                     "MKL_ENABLE_INSTRUCTIONS": hardware.MKL_ISA[level]})
            for level in hardware.ISA_LEVELS if hardware.at_least(top, level)]
    rows.append(("no C++", {"CHARLM_NO_CPP": "1"}))
    matrix, started = {}, time.perf_counter()
    for name, env in rows:
        command = [sys.executable, str(Path(__file__).resolve()), "--auto-only", "--json",
                   *(["--quick"] if args.quick else []), *(["--threads", str(args.threads)] if args.threads else [])]
        print(f"\n=== {name}: {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        print("\n".join(lines[:-1]), flush=True)
        if done.returncode != 0:
            print(done.stderr[-2000:])
            raise SystemExit(f"the {name} row failed")
        matrix[name] = json.loads(lines[-1])
    print(f"\nISA matrix on {hardware.cpu_model()}, {matrix[rows[0][0]]['threads']} threads, training step "
          "chars/s (auto/best: auto's pick over the fastest of native and fused)")
    print(f"{'level':12} {'model':6} {'prec':5} {'B':>3} {'H':>4} {'native':>8} {'fused':>8} {'torch.nn':>8} "
          f"{'auto ->':>7} {'auto/best':>9}")
    worst = 1.0
    for name, found in matrix.items():
        for k in sorted(k for k in found if k.startswith("auto_vs_best_")):
            cell = k[len("auto_vs_best_"):]
            kind, precision = cell.split("_")[:2]
            batch, hidden = (64, 384) if "_B64_" in cell + "_" else (32, 256)
            speed = [found.get(f"auto_row_{cell}_{v}_chars_per_s") for v in ("native", "fused", "torch_nn")]
            shown = "".join(f" {s:>8,.0f}" if s else f" {'-':>8}" for s in speed)
            print(f"{name:12} {kind:6} {precision:5} {batch:>3} {hidden:>4}{shown} {found[f'auto_{cell}']:>7} "
                  f"{found[k]:>9.2f}")
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
    results: dict = {"device": where, "precision": args.precision, "rounds": rounds, "bf16_supported": bf16,
                     "threads": torch.get_num_threads(), "cpu": hardware_model()}
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
