"""Fine-tuning (train.init_from, `charlm train --init-from`): a new run that starts from a trained
model's weights. The checkpoint must describe the same network and the same kind of unit; its
vocabulary is extended by the new text's characters and its weights are copied over id by id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.config import Config, ConfigError, DataConfig, ModelConfig, validate_config
from charlm.data.corpus import Progress, load_corpus
from charlm.data.vocab import Vocab
from charlm.errors import UserError
from charlm.models.model import CharLM
from charlm.store.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint

# What makes two models' weights interchangeable (embedding_dim only with an embedding), and what a
# unit is: a character must mean to the new run what it meant to the trained model.
SHAPE = ("type", "num_layers", "hidden_size", "input")
UNIT_SETTINGS = ("unit", "normalize", "newlines", "documents")


@dataclass(frozen=True)
class Source:
    """The checkpoint a fine-tuned run starts from."""

    path: Path  # the checkpoint file (a run dir's best.pt, as `charlm sample` reads it)
    config: Config
    vocab: Vocab
    weights: dict[str, torch.Tensor]  # the weights sample uses: with train.ema_decay, the average
    step: int | None
    best_val_loss: float | None


def load_source(spec: str, cfg: Config) -> Source:
    """The checkpoint `spec` names (a file, or a run dir: its best.pt, else last.pt), checked against
    the new run's config: the same network shape and the same units, else one line saying what to set."""
    try:
        path = resolve_checkpoint(spec)
        payload = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"--init-from: {err}") from None
    try:
        config = validate_config(payload["config"], "checkpoint config")
        vocab = Vocab.from_dict(payload["vocab"])
    except (ConfigError, KeyError, TypeError, AssertionError) as err:
        raise CheckpointError(f"--init-from: {path} has an invalid config or vocabulary: {err}") from None
    check_shape(config.model, cfg.model)
    check_units(config.data, cfg.data)
    return Source(path.absolute(), config, vocab, payload["model"], payload.get("step"), payload.get("best_val_loss"))


def check_shape(old: ModelConfig, new: ModelConfig) -> None:
    """The new model must have every weight the trained one has, shaped alike (dropout and backend may differ)."""
    differ = [name for name in SHAPE if getattr(old, name) != getattr(new, name)]
    if old.input == "embedding" and old.embedding_dim != new.embedding_dim:
        differ.append("embedding_dim")
    if differ:
        fix = " ".join(f"model.{name}={getattr(old, name)}" for name in differ)
        raise UserError(
            f"--init-from: the checkpoint is a {_shape(old)}, the config asks for a {_shape(new)}; "
            f"set {fix} (or train from scratch)"
        )


def _shape(model: ModelConfig) -> str:
    feed = "one-hot input" if model.input == "onehot" else f"embedding {model.embedding_dim}"
    return f"{model.num_layers}x{model.hidden_size} {model.type} ({feed})"


def check_units(old: DataConfig, new: DataConfig) -> None:
    differ = [name for name in UNIT_SETTINGS if getattr(old, name) != getattr(new, name)]
    if differ:
        now = ", ".join(
            f"data.{name} is {getattr(new, name)} here but {getattr(old, name)} in the checkpoint" for name in differ
        )
        fix = " ".join(f"data.{name}={getattr(old, name)}" for name in differ)
        raise UserError(f"--init-from: {now}; the trained model's units must mean the same: set {fix}")


def given_vocab(
    data: DataConfig, payload: dict | None, source: Source | None, progress: Progress | None = None
) -> Vocab | None:
    """The vocabulary a fine-tuned run encodes its text with (None for any other run: the text's own).

    Starting (`source`): the trained model's vocabulary extended by the new training text's characters
    that data.min_freq and data.max_vocab keep (read from the text's own encoding, which is cached).
    Resuming (`payload`, its last.pt): the vocabulary it has. Either way the corpus is keyed by it, so
    a resume finds the same encoding."""
    if payload is not None:
        fine_tuned = (payload.get("config") or {}).get("train", {}).get("init_from") is not None
        return Vocab.from_dict(payload["vocab"]) if fine_tuned else None
    if source is None:
        return None
    return source.vocab.extended(load_corpus(data, progress).vocab)


def vocab_dims(model: CharLM) -> dict[str, int]:
    """The parameters with a vocabulary dimension, and which one it is."""
    dims = {"head.weight": 0, "head.bias": 0}  # [V, H], [V]
    if model.embedding is not None:
        dims["embedding.weight"] = 0  # [V, E]
    else:
        dims["rnn.layers.0.weight_ih"] = 1  # [G*H, V]: one-hot input, a column per id
    return dims


@torch.no_grad()
def transfer_weights(model: CharLM, weights: dict[str, torch.Tensor], old: Vocab, new: Vocab) -> list:
    """Copy trained `weights` (for vocabulary `old`) into `model`, freshly initialised for `new`.

    Every parameter is copied as it is, except along the vocabulary dimension (embedding rows, or
    layer 0's weight_ih columns with one-hot input; the head's weight rows and bias): there each id
    gets the row its token had under `old`. A token `old` lacks keeps the fresh model's row (embedding
    N(0, 1), head weight U(+-1/sqrt(H)): what it would start training from scratch with), except its
    head bias, set to the lowest trained bias: a new character starts out as unlikely as the rarest
    one it knew, rather than (with bias ~0) more likely than most. Returns the new tokens."""
    state = model.state_dict()  # the model's own tensors: writing into them sets the weights
    if set(weights) != set(state):
        raise CheckpointError(
            f"--init-from: the checkpoint's weights do not fit its config "
            f"(differing: {', '.join(sorted(set(weights) ^ set(state)))})"
        )
    index = {token: i for i, token in enumerate(old.tokens())}
    tokens = new.tokens()
    source_id = torch.tensor([index.get(token, -1) for token in tokens])  # [V_new]: old id, or -1 if new
    kept = source_id >= 0
    dims = vocab_dims(model)
    for name, target in state.items():
        trained, dim = weights[name], dims.get(name)
        expected = target.shape if dim is None else (*target.shape[:dim], len(old), *target.shape[dim + 1 :])
        if tuple(trained.shape) != tuple(expected):
            raise CheckpointError(
                f"--init-from: the checkpoint's {name} is {tuple(trained.shape)}, "
                f"its config and vocabulary make it {tuple(expected)}"
            )
        if dim is None:
            target.copy_(trained)
            continue
        rows, trained_rows = target.movedim(dim, 0), trained.movedim(dim, 0)  # views, vocabulary first
        rows[kept] = trained_rows[source_id[kept]].to(rows.dtype)
        if name == "head.bias":
            rows[~kept] = trained.min().to(rows.dtype)
    return [token for token, k in zip(tokens, kept.tolist()) if not k]


def start_facts(source: Source, new_tokens: list) -> dict:
    """What the run's start event records about where it started."""
    return {
        "checkpoint": str(source.path),
        "step": source.step,
        "best_val_loss": source.best_val_loss,
        "new_tokens": [str(t) for t in new_tokens],
    }


def describe_start(facts: dict, vocab_size: int) -> str:
    """One line for the training display."""
    best = facts["best_val_loss"]
    trained = f"step {facts['step']}" + (f", best val loss {best:.4f}" if best is not None else "")
    new = facts["new_tokens"]
    shown = ", ".join(repr(t) for t in new[:24]) + (", ..." if len(new) > 24 else "")
    added = f"; {len(new)} new: {shown}" if new else "; no new ones"
    return (
        f"fine-tuning {facts['checkpoint']} ({trained}): {vocab_size - len(new)} of {vocab_size} "
        f"vocabulary entries keep their trained weights{added}"
    )
