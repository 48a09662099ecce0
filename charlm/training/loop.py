"""The run around the steps: train_step until the budget, a signal (on any rank) or the end of patience,
then the last checkpoint, the final evaluation and the end event; TrainOutcome says how it ended."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from charlm.errors import Interrupted
from charlm.inference.evaluate import EvalResult
from charlm.store.events import RunMetrics
from charlm.training import distributed
from charlm.training.signals import StopRequests
from charlm.training.trainer import StepEnd, Trainer


@dataclass
class TrainOutcome:
    run_dir: Path
    step: int
    epoch: int
    elapsed: float
    stop_reason: str  # "budget", "early_stop" or "interrupted"
    best_val_loss: float | None
    best_step: int | None
    last_val: EvalResult | None
    signal: int | None = None
    main: bool = True  # the process that reports (rank 0 under torchrun)


def run(trainer: Trainer, metrics: RunMetrics) -> TrainOutcome:
    """Train to the budget, a signal or the end of patience; events go to `metrics` and the display."""
    trainer.begin(metrics)
    reason = "budget"
    with StopRequests() as stop:
        while not stop_now(trainer, stop):
            if trainer.train_step() is StepEnd.OUT_OF_PATIENCE:
                reason = "early_stop"
                break
        # The signal itself, not just whether there was one: a rank that received none reports it too.
        signum = distributed.max_over_ranks(stop.signal or 0, trainer.world, trainer.device) or None
        if signum is not None and reason == "budget":
            reason = "interrupted"
        final_eval = reason == "budget" and trainer.last_eval_step != trainer.pos.step
        if reason == "interrupted" or (final_eval and trainer.saved_at[0] != trainer.pos.step):
            trainer.save()  # before a final evaluation too: a signal may cut that one short
    if final_eval:
        final_evaluation(trainer, stop.signal)
    end(trainer, reason)
    return TrainOutcome(
        trainer.run_dir,
        trainer.pos.step,
        trainer.pos.epoch,
        trainer.elapsed(),
        reason,
        trainer.pos.best_val_loss,
        trainer.pos.best_step,
        trainer.last_val,
        signum,
        trainer.world.main,
    )


def stop_now(trainer: Trainer, stop: StopRequests) -> bool:
    """Budget spent or a signal received, on any rank: then on every rank, at the same step."""
    local = stop.signal is not None or trainer.budget.reached(trainer.pos.step, trainer.elapsed())
    return distributed.any_rank(local, trainer.world, trainer.device)


def final_evaluation(trainer: Trainer, pending: int | None) -> None:
    """The evaluation at the end of the budget, with last.pt already written. It runs outside
    StopRequests: a signal ends it at once (Interrupted) instead of after the whole val split."""
    try:
        if pending is not None:  # it came during the save just before
            raise Interrupted(pending)
        trainer.evaluate()
    except Interrupted:
        end(trainer, "interrupted")
        raise


def end(trainer: Trainer, reason: str) -> None:
    """The end event: how the run ended and its totals."""
    pos = trainer.pos
    trainer.emit(
        "end",
        {
            "epoch": pos.epoch,
            "elapsed": trainer.elapsed(),
            "reason": reason,
            "best_val_loss": pos.best_val_loss,
            "best_step": pos.best_step,
            "skipped_steps": pos.skipped_steps,
            "rollbacks": pos.rollbacks,
        },
    )
