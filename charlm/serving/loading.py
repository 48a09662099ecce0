"""The model a server serves, described from its checkpoint (torch and charlm only, no web stack)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.config import Config
from charlm.data.text import TextSettings
from charlm.data.vocab import Vocab

# Builds the engine process's model: the model, its vocabulary and the context its steps run in
# (None: none). Picklable, since the spawned process calls it.
ModelLoader = Callable[[], tuple[torch.nn.Module, Vocab, Callable[[], contextlib.AbstractContextManager] | None]]


@dataclass
class ServedModel:
    """What the server serves: how it reads text, how it is described, and how the engine process
    builds the model."""

    vocab: Vocab
    text_settings: TextSettings
    name: str
    description: dict
    load: ModelLoader


def served_model(
    checkpoint: Path,
    payload: dict,
    model: torch.nn.Module,
    vocab: Vocab,
    cfg: Config,
    precision: str,
    load: ModelLoader,
) -> ServedModel:
    """What `charlm serve` serves: the model, how prompts are read, and how /v1/models describes it."""
    run = Path(checkpoint)
    name = (run.parent.name if run.is_file() else run.name) or "charlm"
    description = {
        "type": cfg.model.type,
        "hidden_size": cfg.model.hidden_size,
        "num_layers": cfg.model.num_layers,
        "vocab_size": len(vocab),
        "unit": vocab.unit,
        "parameters": sum(p.numel() for p in model.parameters()),
        "backend": model.backend,
        "precision": precision,
        "trained_steps": payload.get("step"),
        "best_val_loss": payload.get("best_val_loss"),
        "config": cfg.to_dict(),
    }
    return ServedModel(
        vocab=vocab, text_settings=TextSettings.from_config(cfg.data), name=name, description=description, load=load
    )
