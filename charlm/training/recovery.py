"""When training goes wrong or stops improving: what to do after a non-finite step (skip it; after
train.max_bad_steps in a row roll back to last.pt with a lower learning rate; after train.max_rollbacks
rollbacks give up), the progress a rollback continues from, and when validation is out of patience.
These decide; the Trainer acts on the decision."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from pathlib import Path

from charlm.config import TrainConfig
from charlm.errors import UserError
from charlm.store.rundir import LAST
from charlm.training.checkpoint_contents import Progress


class TrainingDiverged(UserError):
    """Non-finite losses that rolling back with a lower learning rate did not cure."""


class AfterBadStep(Enum):
    SKIP = "skip"  # no update; train on from a fresh carried state
    ROLL_BACK = "roll back"  # back to last.pt with the learning rate cut
    GIVE_UP = "give up"  # TrainingDiverged


def after_bad_step(streak: int, rollbacks: int, cfg: TrainConfig) -> AfterBadStep:
    """What the `streak`-th non-finite step in a row calls for, after `rollbacks` rollbacks."""
    if streak < cfg.max_bad_steps:
        return AfterBadStep.SKIP
    return AfterBadStep.ROLL_BACK if rollbacks < cfg.max_rollbacks else AfterBadStep.GIVE_UP


def skipped(step: int, loss: float, grad_norm: float, streak: int) -> str:
    return (
        f"step {step}: non-finite loss or gradient (loss {loss}, grad norm {grad_norm}); update skipped "
        f"({streak} in a row)"
    )


def diverged(cfg: TrainConfig, pos: Progress, run_dir: Path) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: {cfg.max_bad_steps} non-finite steps in a row after {pos.rollbacks} "
        f"rollback(s) (learning rate now x{pos.lr_scale:g}); lower train.lr or train.grad_clip and "
        f"resume from {run_dir / LAST} with --resume"
    )


def rolled_back(restored: Progress, before: Progress, elapsed: float, cfg: TrainConfig) -> Progress:
    """The progress to continue from after a rollback: steps and best-so-far go back to the checkpoint's
    (`restored`); wall time, the count of skipped steps and of rollbacks do not, and the learning rate
    is cut once more."""
    return replace(
        restored,
        rollbacks=before.rollbacks + 1,
        lr_scale=before.lr_scale * cfg.rollback_lr_factor,
        skipped_steps=before.skipped_steps,
        elapsed=elapsed,
    )


def rolled_back_message(pos: Progress, cfg: TrainConfig) -> str:
    return (
        f"rolled back to step {pos.step} ({LAST}) with the learning rate cut to x{pos.lr_scale:g} "
        f"(rollback {pos.rollbacks} of at most {cfg.max_rollbacks})"
    )


def out_of_patience(patience: int | None, evals_since_best: int) -> bool:
    """train.patience evaluations in a row without a new best: time to stop early."""
    return patience is not None and evals_since_best >= patience
