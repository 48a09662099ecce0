"""`model.backend: auto` decided by measurement: on first use of a key (the machine, the build, the
precision and the run's shapes) each eligible backend is timed on the real shapes, the fastest is
kept, and the choice is cached with its figures, so later runs with the same key start at once.

Why measure: which backend wins depends on things no table can hold. On an AMD EPYC (AVX512-BF16)
charlm's bf16 loops beat oneDNN's LSTM by 1.3x; on an Intel Xeon with AMX oneDNN's tiles made
`fused` 1.8x faster than them; without the C++ build the native loops lose everywhere.

CHARLM_AUTO=fixed skips measuring and uses the fixed table (registry.resolve_backend): what the
tests use, so that they do not depend on timing. The weights are the same on every backend, so
inference (eval, sample, serve) measures its own shapes and may pick differently from training.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from charlm import hardware
from charlm.atomic import write_text_atomic
from charlm.cache import cache_root
from charlm.errors import UserError
from charlm.models import registry
from charlm.models.model import CharLM
from charlm.models.timing import time_in_blocks

AUTO_ENV = "CHARLM_AUTO"  # "measure" (the default) or "fixed"
BUDGET_S = 2.7  # the whole measurement, model building and warm-up included: under 3 s
TIE = 0.03  # native stays unless another backend is faster by more than this
CACHE_NAME = "backend-choices.json"
VERSION = 1  # of the cache's entries: a change of what is measured starts afresh


@dataclass(frozen=True)
class Workload:
    """What the model will run: 'train' (forward, cross-entropy, backward and an AdamW step on
    [batch, steps]), 'eval' (a no-grad forward of [batch, steps]) or 'generate' (`steps` one-character
    no-grad steps of `batch` streams, the state carried)."""

    mode: str
    batch: int
    steps: int

    @staticmethod
    def training(batch: int, steps: int) -> Workload:
        return Workload("train", batch, steps)

    @staticmethod
    def of_training(train) -> Workload:
        """A run's step: one micro-batch (train.batch_size / gradient_accumulation_steps) of seq_len."""
        return Workload("train", max(1, train.batch_size // train.gradient_accumulation_steps), train.seq_len)

    @staticmethod
    def evaluation(streams: int = 64, window: int = 128) -> Workload:
        return Workload("eval", streams, window)

    @staticmethod
    def generation(streams: int = 1) -> Workload:
        return Workload("generate", streams, 16)


@dataclass
class Choice:
    """The backend to run and why: `how` completes 'backend auto -> ...' in one line."""

    backend: str
    how: str
    measured: bool = False  # timed just now (not fixed, not from the cache)
    seconds: dict[str, float] = field(default_factory=dict)  # per backend, one workload call

    def describe(self) -> str:
        return f"backend auto -> {self.backend} ({self.how})"


def mode() -> str:
    value = os.environ.get(AUTO_ENV, "measure").strip().lower() or "measure"
    if value not in ("measure", "fixed"):
        raise UserError(f"{AUTO_ENV}={value!r}: use measure (time the backends once per shape) or fixed")
    return value


def candidates(cell_type: str) -> tuple[str, ...]:
    """The backends worth timing: all but reference, the readable step-by-step cells."""
    return tuple(b for b in registry.lookup(cell_type).backends if b != "reference")


def choose(
    choice: str, model_cfg, vocab_size: int, device: torch.device, precision: str, workload: Workload | None
) -> Choice:
    """The concrete backend for `model_cfg` on `device`: `choice` itself unless it is auto; auto is
    measured on the CPU (cached per key), else, or without a workload, the fixed rule."""
    if choice != registry.AUTO:
        return Choice(choice, "as configured")
    eligible = candidates(model_cfg.type)
    fixed = registry.resolve_backend(choice, model_cfg.type, device.type, precision)
    if len(eligible) < 2:
        return Choice(fixed, f"the only fast backend for {registry.lookup(model_cfg.type).title}")
    if device.type != "cpu":
        return Choice(fixed, f"fixed rule on {device.type}")
    if workload is None or mode() == "fixed":
        return Choice(fixed, "fixed table" + (f", {AUTO_ENV}=fixed" if workload is not None else ""))
    key = measurement_key(model_cfg, device, precision, workload)
    cached = read_cache().get(key)
    if isinstance(cached, dict) and cached.get("backend") in eligible and isinstance(cached.get("seconds"), dict):
        return Choice(
            cached["backend"],
            _figures_text(cached["backend"], cached["seconds"]) + f", measured {cached.get('date', '?')}; from cache",
            seconds=cached["seconds"],
        )
    started = time.perf_counter()
    seconds = measure(eligible, model_cfg, vocab_size, device, precision, workload)
    took = time.perf_counter() - started
    best = pick(seconds, "native")
    try:
        store(
            key,
            {"backend": best, "seconds": seconds, "took_s": round(took, 2), "date": datetime.date.today().isoformat()},
        )
        kept = "cached"
    except OSError as err:  # a read-only cache folder: the run goes on, measuring again next time
        kept = f"not cached: {err.strerror or err}"
    return Choice(
        best, f"{_figures_text(best, seconds)}, measured in {took:.1f} s; {kept}", measured=True, seconds=seconds
    )


def pick(seconds: dict[str, float], prior: str) -> str:
    """The fastest backend, unless `prior` (native, for choose()) is within TIE of it: a few seconds
    of timing on a shared machine cannot tell 3% apart, and in every longer comparison here the
    native loops kept their rate better (10-minute runs of the shipped config: native 3,034-3,253
    steps, oneDNN's bf16 LSTM 2,793-3,076)."""
    fastest = min(seconds, key=seconds.__getitem__)
    if prior in seconds and seconds[prior] <= seconds[fastest] * (1 + TIE):
        return prior
    return fastest


def _figures_text(best: str, seconds: dict[str, float]) -> str:
    """'1.26x fused': the pick's speed over each other backend's ('0.98x fused, a tie' where the
    fixed table's pick won within TIE)."""
    others = [
        f"{seconds[b] / seconds[best]:.2f}x {b}" + (", a tie" if seconds[b] < seconds[best] else "")
        for b in seconds
        if b != best
    ]
    return ", ".join(others) if others else "measured"


def measurement_key(model_cfg, device: torch.device, precision: str, workload: Workload) -> str:
    """Everything the answer depends on, as one string (the cache's key)."""
    from charlm.models.native import build_id  # noqa: PLC0415 - builds the loops on first use

    parts = {
        "v": VERSION,
        "device": device.type,
        "cpu": hardware.cpu_model(),
        "isa": hardware.isa_level(),
        "onednn_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "mkl_cap": os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "build": build_id(),
        "precision": precision,
        "cell": model_cfg.type,
        "layers": model_cfg.num_layers,
        "hidden": model_cfg.hidden_size,
        "input": model_cfg.input,
        "embedding": model_cfg.embedding_dim,
        "weight_dropout": model_cfg.weight_dropout > 0,
        "mode": workload.mode,
        "batch": workload.batch,
        "steps": workload.steps,
    }
    return json.dumps(parts, sort_keys=True)


def cache_path():
    return cache_root() / CACHE_NAME


def read_cache() -> dict:
    """The cached choices by key; an unreadable file counts as empty (it is only a cache)."""
    try:
        entries = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def store(key: str, entry: dict) -> None:
    entries = read_cache()
    entries[key] = entry
    cache_path().parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache_path(), json.dumps(entries, indent=1, sort_keys=True))


def measure(
    backends: tuple[str, ...],
    model_cfg,
    vocab_size: int,
    device: torch.device,
    precision: str,
    workload: Workload,
    budget: float = BUDGET_S,
) -> dict[str, float]:
    """Seconds of one workload call on each backend, the same weights for all, timed in blocks
    (time_in_blocks); `budget` counts from the start, model building included. The caller's RNG
    is left as it was."""
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        runs = {b: _workload_call(b, model_cfg, vocab_size, device, precision, workload) for b in backends}
        return time_in_blocks(runs, budget - (time.perf_counter() - started))


def _workload_call(
    backend: str, model_cfg, vocab_size: int, device: torch.device, precision: str, workload: Workload
) -> Callable[[], object]:
    """One call of `workload` on a fresh model (seed 0) built for `backend`."""
    torch.manual_seed(0)
    model = CharLM(model_cfg, vocab_size, backend).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)

    x = torch.randint(0, vocab_size, (workload.batch, workload.steps), device=device)
    if workload.mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def train_step():
            with autocast():
                logits, _ = model(x)
                loss = F.cross_entropy(logits.reshape(-1, vocab_size).float(), x.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return train_step
    model.eval()
    if workload.mode == "eval":

        @torch.no_grad()
        def evaluate():
            with autocast():
                return model(x)[0].float().sum().item()

        return evaluate

    @torch.no_grad()
    def generate():
        state = model.init_state(workload.batch, device)
        with autocast():
            for t in range(workload.steps):
                logits, state = model(x[:, t : t + 1], state)
        return logits.float().sum().item()

    return generate
