"""What a training run tells its user, gathered in one place: the lines shown as it starts (device,
data, model, training options, where it starts from) and what a signal cut short at each stage.
Each function returns text; the run hands it to the display the CLI gave it."""

from __future__ import annotations

from pathlib import Path

import torch

from charlm import hardware
from charlm.data.corpus import Corpus
from charlm.models.autotune import Choice
from charlm.models.model import CharLM, count_parameters
from charlm.models.registry import describe_backend
from charlm.store.rundir import LAST
from charlm.training.context import RunContext
from charlm.training.init_from import describe_start, vocab_dims
from charlm.training.runtime import describe_device
from charlm.training.trainer import Trainer

# What a signal cut short, by stage (charlm train prints "interrupted (SIGINT) <stage>").
STARTING = "while starting the run; nothing was trained"
ENCODING = "while reading and encoding the corpus; nothing was trained"
WAITING = "while waiting for rank 0 to read and encode the corpus; nothing was trained"
FINISHED = "after training had finished; every file of the run is written"


def final_evaluation_note(trainer: Trainer, run_dir: Path) -> str:
    budget = "train.max_steps" if trainer.cfg.train.max_steps is not None else "train.max_time"
    return (
        f"during the final evaluation; training had finished: {run_dir / LAST} holds the trained model "
        f"(step {trainer.pos.step}). To train it further, resume with a larger budget: "
        f"charlm train --resume --out {run_dir} --set {budget}=..."
    )


def start_lines(ctx: RunContext, trainer: Trainer, corpus: Corpus, choice: Choice, resumed: bool) -> list[str]:
    """Device, data, model and the training options that differ from the plain defaults."""
    cfg, model = ctx.cfg, trainer.model
    lines = [f"device: {_where(ctx)}", _data_line(corpus)]
    backend = describe_backend(cfg.model.backend, model.backend)
    lines.append(
        f"model: {cfg.model.type} {cfg.model.num_layers}x{cfg.model.hidden_size} (backend {backend}), "
        f"{count_parameters(model):,} parameters; {trainer.batches.windows_per_epoch} steps per epoch"
    )
    if cfg.model.backend == "auto":
        lines.append(choice.describe())
    extras = _training_options(ctx, model.backend, trainer.local_batch)
    if extras:
        lines.append("training: " + ", ".join(extras))
    if resumed:
        lines.append(f"resuming from step {trainer.pos.step} (epoch {trainer.pos.epoch})")
    return lines


def origin_lines(origin: dict, names: list[str], model: CharLM, vocab_size: int) -> list[str]:
    """Where the weights came from (train.init_from) and what train.freeze keeps as it is."""
    lines = []
    if "init_from" in origin:
        lines.append(describe_start(origin["init_from"], vocab_size))
    if "frozen" in origin:
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        lines.append(
            f"frozen (train.freeze: {', '.join(names)}): {frozen:,} of {count_parameters(model):,} "
            "parameters stay as they are"
        )
        untrained = [name for name in origin["frozen"] if name in vocab_dims(model)]
        new = len(origin.get("init_from", {}).get("new_tokens", []))
        if new and untrained:
            lines.append(
                f"warning: {', '.join(untrained)} frozen: the {new} new vocabulary entries' rows there "
                "keep their initial values"
            )
    return lines


def _where(ctx: RunContext) -> str:
    where = describe_device(ctx.device) + (f", {ctx.world.size} processes (torchrun)" if ctx.world.enabled else "")
    if ctx.device.type == "cpu":
        threads = torch.get_num_threads()
        where += f" ({hardware.cpu_model()}, {threads} thread{'s' if threads > 1 else ''})"
    return where


def _data_line(corpus: Corpus) -> str:
    skipped = f" ({corpus.val_oov_chars:,} val characters not in it)" if corpus.val_oov_chars else ""
    return (
        f"data: {corpus.train_ids.numel():,} train / {corpus.val_ids.numel():,} val units, "
        f"vocabulary {len(corpus.vocab)}{skipped}"
    )


def _training_options(ctx: RunContext, backend: str, local_batch: int) -> list[str]:
    train, model = ctx.cfg.train, ctx.cfg.model
    extras = _precision(train.precision, ctx.device, backend)
    if train.gradient_accumulation_steps > 1:
        extras.append(f"{train.gradient_accumulation_steps} accumulation steps per update")
    if model.weight_dropout:
        extras.append(f"weight dropout {model.weight_dropout:g}")
    if train.random_offsets:
        extras.append("random window offsets per epoch")
    if train.ema_decay:
        extras.append(f"validating an average of the weights (ema_decay {train.ema_decay:g})")
    if ctx.world.enabled:
        extras.append(f"global batch {train.batch_size} = {ctx.world.size} x {local_batch} streams")
    return extras


def _precision(precision: str, device: torch.device, backend: str) -> list[str]:
    if precision == "fp32":
        return []
    if precision == "bf16" and device.type == "cuda" and backend == "fused":  # see charlm.models.fused
        return ["precision bf16 (the cuDNN recurrence in float32 with TF32: cuDNN's autocast would run it in fp16)"]
    return [f"precision {precision}"]
