"""The variants scripts/bench.py compares, built with the same weights (charlm native, charlm fused,
a plain torch.nn model), and the timed runs of each: training steps, generation and evaluation,
every round calling each variant once in an order rotated by one per round."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from reference_lstm import TorchNNLM
from torch import nn

from charlm.config import ModelConfig
from charlm.inference.evaluate import IGNORE, evaluate_ids, stream_layout
from charlm.inference.sample import generate, make_generator
from charlm.models.model import CharLM

V, E, L = 65, 64, 2  # Tiny Shakespeare's vocabulary size, the default embedding, layers
VARIANTS = ("native", "fused", "torch.nn")
PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_NATIVE = "native bf16"  # charlm native under torch.autocast bf16: the mixed-precision loops


def key(variant: str) -> str:
    return variant.replace(".", "_")


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


def bench_training(
    kind: str,
    batch: int,
    seq: int,
    hidden: int,
    rounds: int,
    device: torch.device,
    precision: str = "fp32",
    variants=VARIANTS,
) -> dict[str, float]:
    """Chars/s of each variant's full training step, rotated round by round."""
    models = {v: build_variant(kind, v, hidden, device) for v in variants}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=1e-3) for v, m in models.items()}
    x = torch.randint(0, V, (batch, seq), device=device)
    y = torch.randint(0, V, (batch, seq), device=device)
    runs = {v: (lambda v=v: train_step(models[v], optimizers[v], x, y, precision)) for v in variants}
    rotated_medians(runs, 2, device)  # warm-up: allocator, oneDNN primitive caches, AdamW state
    return {v: batch * seq / s for v, s in rotated_medians(runs, rounds, device).items()}


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


@torch.no_grad()
def generate_torch_nn(
    model: TorchNNLM, prompt: torch.Tensor, length: int, streams: int, generator: torch.Generator
) -> torch.Tensor:
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
    return {
        v: in_precision(
            v,
            device,
            lambda v=v, n=length: sampler[v](models[v], prompt, n, streams, generator=make_generator(device, 0)[0]),
        )
        for v in models
    }


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
        logits, state = model(inputs[:, start : start + window].to(device), state)  # [S, W, V]
        y = targets[:, start : start + window].to(device)
        total += F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=IGNORE, reduction="sum").item()
    return total / int((targets != IGNORE).sum())


def evaluation_runs(models: dict, ids: torch.Tensor) -> dict[str, Callable]:
    """charlm's evaluate_ids for its backends; the same stream layout in a user's loop for torch.nn."""
    inputs, targets = stream_layout(ids, 64)  # [S, W + L]: what evaluate_ids reads
    device = next(iter(models.values())).head.weight.device
    return {
        v: in_precision(
            v,
            device,
            lambda v=v: (
                evaluate_torch_nn(models[v], inputs, targets)
                if v == "torch.nn"
                else evaluate_ids(models[v], ids, streams=64).loss_nats
            ),
        )
        for v in models
    }


def bench_eval(ids: torch.Tensor, rounds: int, device: torch.device, bf16: bool) -> dict[str, float]:
    """Chars/s of scoring `ids` with LSTM 2x256, 64 streams, rotated round by round."""
    models = inference_models(256, device, bf16)
    losses = {v: run() for v, run in evaluation_runs(models, ids[:5000]).items()}  # warm-up
    assert abs(losses["native"] - losses["torch.nn"]) < 1e-3, f"native and torch.nn disagree: {losses}"
    assert BF16_NATIVE not in losses or abs(losses[BF16_NATIVE] - losses["native"]) < 2e-2, losses
    seconds = rotated_medians(evaluation_runs(models, ids), rounds, device)
    return {v: ids.numel() / s for v, s in seconds.items()}


def own_peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM restarts at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: may include the parent's
