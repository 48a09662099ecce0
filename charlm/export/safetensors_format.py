"""The safetensors export: the model's weights under their state_dict names, with the config, vocabulary
and training facts as JSON strings in its metadata (metadata.py); and the way back to a charlm model.

A safetensors file is a JSON header and raw tensor bytes: reading one runs no code, so loading it is
as safe as loading a checkpoint with weights_only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.atomic import atomic_open
from charlm.config import Config
from charlm.data.vocab import Vocab
from charlm.export.extra import require
from charlm.export.metadata import ExportFileError, metadata_of, read_metadata
from charlm.models.autotune import Workload
from charlm.models.model import CharLM
from charlm.store.checkpoint import model_from_checkpoint

SUFFIX = ".safetensors"


def write_safetensors(path: Path, model: CharLM, vocab: Vocab, cfg: Config, payload: Mapping) -> None:
    """Write `model`'s weights (float32, as trained) and what rebuilds it to `path`, atomically."""
    st = require("safetensors.torch")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    # "format": "pt" tells safetensors' own loaders (and other tools) the tensors are in torch's layout.
    data = st.save(tensors, metadata={"format": "pt", **metadata_of(cfg, vocab, payload)})
    with atomic_open(path, "wb") as handle:
        handle.write(data)


@dataclass(frozen=True)
class Loaded:
    """A model read back from a safetensors export, with what describes it."""

    model: CharLM  # on the device asked for, in eval mode
    vocab: Vocab
    config: Config
    training: dict  # the checkpoint's step, best_val_loss, ... (metadata.TRAINING_FACTS)


def load_safetensors(
    path: str | Path,
    device: torch.device | str = "cpu",
    backend: str | None = None,
    precision: str = "fp32",
    workload: Workload | None = None,
    report: Callable[[str], None] | None = None,
) -> Loaded:
    """The model a `charlm export --format safetensors` file holds, run on `backend` (default: its
    config's model.backend, auto resolved for `device`, `precision` and `workload`)."""
    safetensors = require("safetensors", command=f"reading {Path(path).name}")
    path = Path(path)
    if not path.is_file():
        raise ExportFileError(f"model file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            # The metadata is checked (sizes included) before a single tensor is read.
            described = read_metadata(handle.metadata(), str(path))
            weights = {name: handle.get_tensor(name) for name in handle.keys()}
    except (safetensors.SafetensorError, OSError) as err:
        raise ExportFileError(f"{path} is damaged or not a safetensors file ({err})") from None
    payload = {"config": described.config.to_dict(), "vocab": described.vocab.to_dict(), "model": weights}
    model, vocab = model_from_checkpoint(payload, device, backend, precision, workload, report)
    return Loaded(model, vocab, described.config, described.training)
