"""The model a server serves, described from its checkpoint (torch and charlm only, no web stack)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from charlm.data.text import TextSettings
from charlm.serving.app import ServedModel


def served_model(checkpoint: Path, payload: dict, model, vocab, cfg, precision: str, load: Callable) -> ServedModel:
    """What `charlm serve` serves: the model, how prompts are read, and how /v1/models describes it."""
    run = Path(checkpoint)
    name = (run.parent.name if run.is_file() else run.name) or "charlm"
    description = {
        "type": cfg.model.type, "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
        "vocab_size": len(vocab), "unit": vocab.unit, "parameters": sum(p.numel() for p in model.parameters()),
        "backend": model.backend, "precision": precision, "trained_steps": payload.get("step"),
        "best_val_loss": payload.get("best_val_loss"), "config": cfg.to_dict(),
    }
    return ServedModel(vocab=vocab, text_settings=TextSettings.from_config(cfg.data), name=name,
                       description=description, load=load)
