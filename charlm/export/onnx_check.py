"""Checking an ONNX export: run it in onnxruntime and the model in charlm on the same inputs, step by
step, each carrying its own state, and measure how far their logits and states drift apart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from charlm.config import Config
from charlm.data.text import TextSettings
from charlm.data.vocab import Vocab
from charlm.export.extra import require
from charlm.inference.sample import Decoding, generate, prompt_ids
from charlm.models.model import CharLM

# float32, step by step: the kernels differ in summation order, not in the equations, so they agree
# to a few units in the last place of each value; an entry passes within ATOL + RTOL * |value|.
ATOL = RTOL = 1e-5


@dataclass(frozen=True)
class Parity:
    """How far apart charlm and onnxruntime ended up, over every step, row and entry."""

    steps: int
    batch_sizes: tuple[int, ...]
    prompt: str
    logits: float  # the largest absolute difference of a logit
    state: float  # the largest absolute difference of a state entry (h, and c for the LSTM)
    largest: float  # the largest |value| charlm computed, for scale
    ratio: float  # the largest |difference| / (ATOL + RTOL * |value|): 1 or less passes

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0


def check_inputs(model: CharLM, vocab: Vocab, cfg: Config, steps: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Ids [B, steps] to feed both, one column per step: the config's sample prompt, then B different
    continuations that charlm draws (temperature 1, seeded): text the model meets in use."""
    prompt, _ = prompt_ids(vocab, cfg.sample.prompt, TextSettings.from_config(cfg.data))  # [P]
    generator = torch.Generator().manual_seed(seed)
    drawn = generate(model, prompt, max(steps - len(prompt), 1), batch_size, Decoding(temperature=1.0), generator)
    return torch.cat([prompt.expand(batch_size, -1), drawn], dim=1)[:, :steps]  # [B, steps]


@torch.no_grad()
def check_onnx(
    path: Path,
    model: CharLM,
    vocab: Vocab,
    cfg: Config,
    steps: int = 50,
    batch_sizes: tuple[int, ...] = (1, 3),
    seed: int = 0,
) -> Parity:
    """Run `steps` steps in charlm (`model` on the CPU, float32) and in onnxruntime from a blank state,
    at each batch size (the file's batch axis is dynamic); the largest differences seen."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state_names = [node.name for node in session.get_inputs()][1:]
    worst = {"logits": 0.0, "state": 0.0, "largest": 0.0, "ratio": 0.0}
    for batch_size in batch_sizes:
        ids = check_inputs(model, vocab, cfg, steps, batch_size, seed)  # [B, steps]
        ours = model.init_state(batch_size)  # each [L, B, H]
        theirs = [s.numpy() for s in ours]
        for t in range(ids.shape[1]):
            logits, ours = model(ids[:, t : t + 1], ours)  # [B, 1, V]
            logits_ort, *theirs = session.run(None, {"ids": ids[:, t].numpy(), **dict(zip(state_names, theirs))})
            _compare(worst, "logits", logits[:, 0], logits_ort)
            for a, b in zip(ours, theirs):
                _compare(worst, "state", a, b)
    return Parity(steps, tuple(batch_sizes), cfg.sample.prompt, **worst)


def _compare(worst: dict[str, float], kind: str, ours: torch.Tensor, theirs: np.ndarray) -> None:
    """Fold one output's differences into `worst` (the running maxima)."""
    values = ours.float().numpy()
    diff = np.abs(values - theirs)
    worst[kind] = max(worst[kind], float(diff.max()))
    worst["largest"] = max(worst["largest"], float(np.abs(values).max()))
    worst["ratio"] = max(worst["ratio"], float((diff / (ATOL + RTOL * np.abs(values))).max()))
