"""The ONNX export: one time step of the model (ids [B] and the state in; logits [B, V] and the new
state out) with a dynamic batch axis, written in plain torch ops from the model's own cells, with the
config and vocabulary in the ONNX model's metadata_props (metadata.py), so the file alone can sample.

Graph inputs: ids int64 [B], then each state tensor float32 [L, B, H] under the name its cell gives
it (h; h and c for the LSTM: cells.py's `state_names`); outputs: logits float32 [B, V], then next_<name>
for each state tensor. Exported with torch.onnx.export(dynamo=True), which needs onnxscript.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from charlm.atomic import atomic_path
from charlm.config import Config
from charlm.data.vocab import Vocab
from charlm.export.extra import require
from charlm.export.metadata import metadata_of
from charlm.models.model import CharLM

SUFFIX = ".onnx"
EXAMPLE_BATCH = 2  # torch.export specialises an axis whose example size is 0 or 1, so it is not dynamic


def input_names(model: CharLM) -> list[str]:
    return ["ids", *model.rnn.state_names]


def output_names(model: CharLM) -> list[str]:
    return ["logits", *(f"next_{name}" for name in model.rnn.state_names)]


class SingleStep(nn.Module):
    """One step of a CharLM in eval mode: ids [B], state tensors [L, B, H] -> logits [B, V], new state.

    Each layer runs its cell's forward (the equations of cells.py, plain torch ops), whatever backend
    the model runs on, so the graph holds no custom or fused kernel; the weights are the model's own
    (shared, not copied). Dropout is off, as in eval mode."""

    def __init__(self, model: CharLM):
        super().__init__()
        self.embedding, self.layers, self.head = model.embedding, model.rnn.layers, model.head
        self.vocab_size = model.vocab_size

    def forward(self, ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.embedding is not None:
            x = F.embedding(ids, self.embedding.weight)  # [B, E]
        else:
            x = F.one_hot(ids, self.vocab_size).to(self.head.weight.dtype)  # [B, V]
        finals = []
        for k, cell in enumerate(self.layers):
            layer_state = cell(x, tuple(s[k] for s in state))  # each [B, H]
            x = layer_state[0]  # h_t feeds the next layer
            finals.append(layer_state)
        logits = self.head(x)  # [B, V]
        return (logits, *(torch.stack(parts) for parts in zip(*finals)))  # new state: each [L, B, H]


def write_onnx(path: Path, model: CharLM, vocab: Vocab, cfg: Config, payload: Mapping) -> None:
    """Export one step of `model` (on the CPU, float32) to `path`, atomically, with its metadata."""
    require("onnx")
    require("onnxscript")  # torch's dynamo exporter translates the graph with it
    step = SingleStep(model).eval()
    example = (torch.zeros(EXAMPLE_BATCH, dtype=torch.long), *model.init_state(EXAMPLE_BATCH))
    batch = torch.export.Dim("batch")
    dynamic = ({0: batch}, tuple({1: batch} for _ in example[1:]))  # ids, then *state (one varargs entry)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            step,
            example,
            dynamo=True,
            input_names=input_names(model),
            output_names=output_names(model),
            dynamic_shapes=dynamic,
            verbose=False,
        )
    assert program is not None, "the dynamo exporter returns the program it wrote"
    program.model.metadata_props.update(metadata_of(cfg, vocab, payload))
    program.model.doc_string = (
        f"charlm {cfg.model.type} {cfg.model.num_layers}x{cfg.model.hidden_size}, "
        "one step: ids [batch] and the state in, logits [batch, V] and the new state out"
    )
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)  # one self-contained file (the weights inside)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes (deprecations inside torch, optional torchvision ops it skips) are not the
    user's business; real failures still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
