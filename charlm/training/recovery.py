"""When training goes wrong or stops improving: skip a non-finite step, roll back to last.pt with a
lower learning rate after train.max_bad_steps of them, give up (TrainingDiverged) after
train.max_rollbacks rollbacks; and stop early once validation has run out of patience."""

from __future__ import annotations

from typing import TYPE_CHECKING

from charlm.errors import UserError
from charlm.store.checkpoint import load_checkpoint
from charlm.store.metrics import MetricsLog
from charlm.store.rundir import LAST

if TYPE_CHECKING:
    from charlm.training.trainer import Trainer


class TrainingDiverged(UserError):
    """Non-finite losses that rolling back with a lower learning rate did not cure."""


def skip_bad_step(trainer: Trainer, metrics: MetricsLog, loss: float, grad_norm: float) -> None:
    """No update; the carried state, possibly poisoned, restarts from zero.

    With fp16 the loss scaler still ends its step: update() sees the inf that unscale_()
    found and shrinks the scale, as it must for the next steps to come out finite."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.update()
    trainer.state = trainer.model.init_state(trainer.local_batch)
    trainer.bad_streak += 1
    trainer.pos.skipped_steps += 1
    step, streak = trainer.pos.step, trainer.bad_streak
    metrics.write("skip", step=step, loss=loss, grad_norm=grad_norm, streak=streak)
    trainer.display.message(f"step {step}: non-finite loss or gradient (loss {loss}, grad norm "
                            f"{grad_norm}); update skipped ({streak} in a row)")
    if streak >= trainer.cfg.train.max_bad_steps:
        roll_back(trainer, metrics)


def roll_back(trainer: Trainer, metrics: MetricsLog) -> None:
    """Back to the last checkpoint with the learning rate cut, or give up."""
    cfg, pos = trainer.cfg.train, trainer.pos
    if pos.rollbacks >= cfg.max_rollbacks:
        raise TrainingDiverged(
            f"training diverged: {cfg.max_bad_steps} non-finite steps in a row after {pos.rollbacks} "
            f"rollback(s) (learning rate now x{pos.lr_scale:g}); lower train.lr or train.grad_clip and "
            f"resume from {trainer.run_dir / LAST} with --resume")
    rollbacks, lr_scale = pos.rollbacks + 1, pos.lr_scale * cfg.rollback_lr_factor
    elapsed, skipped = trainer.elapsed(), pos.skipped_steps
    scale = trainer.scaler.state_dict()
    trainer.restore(load_checkpoint(trainer.run_dir / LAST))
    # Steps and weights go back; wall time, the count of skipped steps and the fp16 loss
    # scale (shrunk by the skipped steps; the saved one overflowed) do not.
    pos = trainer.pos
    pos.rollbacks, pos.lr_scale, pos.skipped_steps = rollbacks, lr_scale, skipped
    if scale:
        trainer.scaler.load_state_dict(scale)
    pos.elapsed = elapsed
    metrics.write("rollback", step=pos.step, lr_scale=lr_scale, rollbacks=rollbacks)
    trainer.display.message(f"rolled back to step {pos.step} ({LAST}) with the learning rate cut to "
                            f"x{lr_scale:g} (rollback {rollbacks} of at most {cfg.max_rollbacks})")


def out_of_patience(trainer: Trainer) -> bool:
    """train.patience evaluations in a row without a new best: time to stop early."""
    patience = trainer.cfg.train.patience
    return patience is not None and trainer.pos.evals_since_best >= patience
