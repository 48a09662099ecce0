"""Versioned, atomic checkpoint files: plain values and tensors, read with torch.load(weights_only=True),
which refuses anything else (no code runs from a file); the model a checkpoint describes; and the
check that a checkpoint can resume a run (checkpoint_contents.py is what a training one holds)."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from charlm import __version__
from charlm.atomic import atomic_open
from charlm.config import Config, ConfigError, ModelConfig, validate_config
from charlm.data.vocab import Vocab
from charlm.errors import UserError
from charlm.models import registry
from charlm.models.autotune import Workload, choose
from charlm.models.model import CharLM
from charlm.store.rundir import BEST, LAST

if TYPE_CHECKING:
    from charlm.data.corpus import Corpus

FORMAT = "charlm-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, foreign or inconsistent."""


# The progress facts `charlm info` shows (and an export carries), by the type they must have when present:
# a crafted file with a string for a number ends in one line here, not in a traceback where it is shown.
FACT_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "epoch": int,
    "best_step": int,
    "best_val_loss": (int, float),
    "elapsed": (int, float),
    "device": str,
    "backend": str,
}


def wrong_fact(facts: Mapping) -> str | None:
    """The first progress fact of the wrong type, as `step 'many'`; None when each is right or absent."""
    for key, kind in FACT_TYPES.items():
        value = facts.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            return f"{key} {value!r}"[:60]
    return None


def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint file, or a run dir (its best.pt, else its last.pt)."""
    path = Path(spec)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run dir {path} holds no checkpoint ({BEST} or {LAST}); train first")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write atomically (see charlm.atomic): a crash at any moment leaves either the old file or
    the new one, never half of one; a failed write (disk full) leaves the old one and says so."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "charlm_version": __version__, **payload}
    try:
        with atomic_open(path, "wb") as handle:
            torch.save(payload, handle)
    except OSError as err:
        raise CheckpointError(
            f"could not write checkpoint {path}: {err.strerror or err}; the previous checkpoint is unchanged"
        ) from None


def load_checkpoint(spec: str | Path) -> dict:
    """The payload of a checkpoint file or run dir, on the CPU, checked for format and version."""
    path = resolve_checkpoint(spec)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is foreign or cut short
        raise CheckpointError(f"{path} is damaged or not a checkpoint (not a complete torch archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is not a charlm checkpoint or holds objects that are not plain data; "
            "refusing to load it (loading never runs code from a file)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({reason})") from None
    _check_format(payload, path)
    return payload


def _check_format(payload: object, path: Path) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charlm checkpoint")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}, newer than this charlm "
            f"({__version__}) reads (format {FORMAT_VERSION}); upgrade charlm"
        )
    for key in ("config", "vocab", "model"):
        if key not in payload:
            raise CheckpointError(f"{path} is incomplete: it has no {key!r} entry")
    if not isinstance(payload["config"], dict) or not isinstance(payload["vocab"], dict):
        raise CheckpointError(f"{path} is damaged: its config and vocabulary must be mappings")
    wrong = wrong_fact(payload)
    if wrong is not None:
        raise CheckpointError(f"{path} is damaged: its progress fact {wrong} has the wrong type")


def check_resumable(payload: dict, cfg: Config, corpus: Corpus) -> None:
    """A checkpoint resumes only with the same model, data and batch layout (the backend may change)."""
    saved, now = _with_defaults(payload["config"]), cfg.to_dict()
    changed = [
        f"{section}.{key}"
        for section in ("model", "data")
        for key in now[section]
        if saved.get(section, {}).get(key) != now[section][key] and f"{section}.{key}" != "model.backend"
    ]
    changed += [
        f"train.{key}"
        for key in ("batch_size", "seq_len", "random_offsets")
        if saved.get("train", {}).get(key) != now["train"][key]
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume: {', '.join(changed)} differ from the checkpoint's config; "
            "resume with the run's own config (omit --config) or start a new run"
        )
    if payload.get("data_fingerprint") != corpus.fingerprint:
        raise CheckpointError("cannot resume: the training text has changed since the checkpoint was written")
    if "progress" not in payload or "optimizer" not in payload:
        raise CheckpointError("cannot resume: the checkpoint holds no training state (optimizer, progress)")


def _with_defaults(saved: dict) -> dict:
    """A checkpoint's config with the keys added since it was written at their defaults
    (which reproduce what it did), so they do not read as changed."""
    try:
        return validate_config(saved, "checkpoint config").to_dict()
    except ConfigError:
        return saved


def model_from_checkpoint(
    payload: dict,
    device: torch.device | str = "cpu",
    backend: str | None = None,
    precision: str = "fp32",
    workload: Workload | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[CharLM, Vocab]:
    """Rebuild the model and vocabulary a checkpoint describes, with its weights, in eval mode.

    `backend` runs the same weights through another backend than its config's model.backend;
    auto (either way) is measured on `workload` for `device` and `precision` (without one: the fixed
    table), and `report` is told the choice when it was measured just now."""
    try:
        model_cfg = validate_config(payload["config"], "checkpoint config").model
        vocab = Vocab.from_dict(payload["vocab"])
    except (ConfigError, KeyError, TypeError, ValueError, AssertionError) as err:
        raise CheckpointError(f"checkpoint has an invalid config or vocabulary: {err}") from None
    model_cfg.check_fits(len(vocab), "checkpoint config")  # before CharLM allocates anything
    device = torch.device(device)
    choice = backend if backend is not None else model_cfg.backend
    chosen = choose(choice, model_cfg, len(vocab), device, precision, workload)
    if chosen.measured and report is not None:
        report(chosen.describe())
    model = CharLM(model_cfg, len(vocab), chosen.backend)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else "")
        raise CheckpointError(
            f"checkpoint weights do not match its config and vocabulary ({len(vocab)} characters): {detail}"
        ) from None
    return model.to(device).eval(), vocab


def describe_model(cfg: ModelConfig, ran_on: str | None = None) -> str:
    """One line: the cell type, sizes, input, dropout and backend (`ran_on`: what auto resolved to)."""
    input_desc = f"embedding {cfg.embedding_dim}" if cfg.input == "embedding" else "one-hot"
    weight_drop = f", weight dropout {cfg.weight_dropout}" if cfg.weight_dropout else ""
    return (
        f"{registry.lookup(cfg.type).title} {cfg.num_layers}x{cfg.hidden_size}, {input_desc} input, dropout {cfg.dropout}"
        f"{weight_drop}, backend {registry.describe_backend(cfg.backend, ran_on)}"
    )
