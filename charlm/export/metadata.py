"""What an exported file carries besides its tensors, as strings (safetensors and ONNX metadata hold
strings only): charlm's export format version, the resolved config (without credentials or the
folders of the machine it trained on) and the vocabulary as JSON, and the training facts of the
checkpoint the weights came from; and reading them back, checked, from a file anyone may have made."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath

from charlm import __version__
from charlm.config import Config, ConfigError, redact_uri, validate_config
from charlm.data.vocab import Vocab
from charlm.errors import UserError
from charlm.store.checkpoint import wrong_fact

FORMAT_VERSION = 1  # of the keys below and what they hold
VERSION_KEY = "charlm.format_version"
CHARLM_VERSION_KEY = "charlm.version"  # the charlm that wrote the file
CONFIG_KEY = "charlm.config"  # the resolved config (model, data, train, sample sections), JSON
VOCAB_KEY = "charlm.vocab"  # Vocab.to_dict(): unit, specials, chars; JSON
TRAINING_KEY = "charlm.training"  # the checkpoint's progress facts, JSON (what `charlm info` shows)
TRAINING_FACTS = ("step", "epoch", "elapsed", "best_val_loss", "best_step", "device", "backend")
# Config values that name files on the machine that trained: an export keeps their names only.
PATH_KEYS = (("data", "path"), ("data", "val_path"), ("train", "init_from"))


class ExportFileError(UserError):
    """An exported file that is missing, damaged, not charlm's, or newer than this charlm reads."""


@dataclass(frozen=True)
class Described:
    """What an exported file says about its weights."""

    config: Config
    vocab: Vocab
    training: dict  # TRAINING_FACTS, None where the checkpoint had no value


def shareable_config(cfg: Config) -> dict:
    """The config as an export carries it: the file names of data.path, data.val_path and train.init_from
    without their folders (an export travels; the user's home and layout stay home), and
    train.mlflow_uri without user, password or token."""
    config = cfg.to_dict()
    for section, key in PATH_KEYS:
        if config[section].get(key) is not None:
            config[section][key] = PurePath(config[section][key]).name
    if config["train"].get("mlflow_uri") is not None:
        config["train"]["mlflow_uri"] = redact_uri(config["train"]["mlflow_uri"])
    return config


def metadata_of(cfg: Config, vocab: Vocab, payload: Mapping) -> dict[str, str]:
    """The metadata of an export of the checkpoint `payload` (its config `cfg`, vocabulary `vocab`)."""
    return {
        VERSION_KEY: str(FORMAT_VERSION),
        CHARLM_VERSION_KEY: __version__,
        CONFIG_KEY: json.dumps(shareable_config(cfg), ensure_ascii=False),
        VOCAB_KEY: json.dumps(vocab.to_dict(), ensure_ascii=False),
        TRAINING_KEY: json.dumps({key: payload.get(key) for key in TRAINING_FACTS}),
    }


def read_metadata(metadata: Mapping[str, str] | None, source: str) -> Described:
    """The config, vocabulary and training facts of an exported file, checked; `source` names it in errors."""
    metadata = metadata or {}
    if VERSION_KEY not in metadata:
        raise ExportFileError(f"{source} was not written by charlm export (its metadata has no {VERSION_KEY})")
    version = metadata[VERSION_KEY]
    if not re.fullmatch(r"[0-9]{1,9}", version) or int(version) > FORMAT_VERSION:  # ASCII digits: "²" is a digit too
        raise ExportFileError(
            f"{source} has export format {version[:20]!r}, newer than this charlm ({__version__}) "
            f"reads (format {FORMAT_VERSION}); upgrade charlm"
        )
    try:
        config = validate_config(json.loads(metadata[CONFIG_KEY]), f"{source} config")
        vocab = Vocab.from_dict(json.loads(metadata[VOCAB_KEY]))
        training = json.loads(metadata.get(TRAINING_KEY, "{}"))
    except (KeyError, ValueError, TypeError, AssertionError, ConfigError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportFileError(
            f"{source} has an invalid charlm config or vocabulary in its metadata ({reason})"
        ) from None
    if not isinstance(training, dict) or wrong_fact(training) is not None:
        wrong = wrong_fact(training) if isinstance(training, dict) else "not a mapping"
        raise ExportFileError(f"{source} has invalid training facts in its metadata ({wrong})")
    config.model.check_fits(len(vocab), f"{source} config")  # before any model is built from it
    return Described(config, vocab, {key: training.get(key) for key in TRAINING_FACTS})
