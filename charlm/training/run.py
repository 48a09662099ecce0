"""One training run from start to end: its context resolved once, the run dir locked, the setup,
the trainer, the run and what is said about it. Under torchrun rank 0 alone touches the run dir
(lock, config, metrics, checkpoints); the other ranks train in lockstep with it."""

from __future__ import annotations

from pathlib import Path

from charlm.config import Config
from charlm.errors import Interrupted, UserError
from charlm.models.model import count_parameters
from charlm.store.checkpoint import check_resumable
from charlm.store.events import Display, Event, RunMetrics
from charlm.store.metrics import NoMetrics
from charlm.store.rundir import RunLock, write_config
from charlm.training import announce, distributed, loop
from charlm.training.announce import FINISHED, STARTING
from charlm.training.context import RunContext, resolve_context
from charlm.training.loggers import open_loggers
from charlm.training.loop import TrainOutcome
from charlm.training.runtime import describe_device
from charlm.training.setup import Start, build_model, check_same_freeze, prepare, stage
from charlm.training.signals import StopRequests
from charlm.training.trainer import Trainer


def train(
    cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False, *, display: Display
) -> TrainOutcome:
    """Train a model as `cfg` says, writing the run into `run_dir` (locked while training).

    `display` shows the run (charlm.report.progress.TrainingDisplay, or anything that meets the
    Display protocol): the run is handed it, so training imports nothing from report."""
    with stage(STARTING):
        ctx = resolve_context(cfg, run_dir, resume, overwrite)
    try:
        with distributed.peers_may_stop(ctx.world):
            if ctx.world.main:
                with RunLock(run_dir) as lock:
                    outcome = _train_locked(ctx, display, (*lock.notices, *ctx.notices))
            else:
                outcome = _train_locked(ctx, display.silenced(), ())
            # A rank that tears its gloo connections down while another still finishes up can abort
            # the other one; leave together.
            with stage(FINISHED):
                distributed.barrier(ctx.world)
        return outcome
    finally:
        # Not cut short by a signal (torchrun sends SIGTERM to the others once one rank exits
        # with an error code): a half-destroyed process group aborts the process at exit.
        with StopRequests():
            distributed.stop(ctx.world)


def _train_locked(ctx: RunContext, display: Display, notices: tuple[str, ...]) -> TrainOutcome:
    with stage(STARTING):
        trainer, metrics = _start(ctx, display, notices)
    try:
        with display:
            return loop.run(trainer, metrics)
    except Interrupted as stop:  # only from the final evaluation: the loop itself stops between steps
        stop.during = stop.during or announce.final_evaluation_note(trainer, ctx.run_dir)
        raise
    finally:
        metrics.close()


def _start(ctx: RunContext, display: Display, notices: tuple[str, ...]) -> tuple[Trainer, RunMetrics]:
    """Everything before the first step: the setup, the trainer (restored, or saved once: from scratch
    or from train.init_from's weights), the logs, and what the run says as it starts."""
    start = prepare(ctx, display)
    for line in (*start.corpus.notices, *notices, *start.notices):
        display.message(line)
    if start.source is not None:  # config.yaml names the very file it started from (a run dir's best.pt)
        cfg = ctx.cfg
        ctx = ctx.with_config(
            cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": str(start.source.path)})})
        )
    built = build_model(ctx, start.corpus, start.source)
    trainer = Trainer(ctx.cfg, ctx.run_dir, start.corpus, built.model, ctx.device, display, ctx.world)
    _restore_or_save(trainer, ctx, start)
    resumed = start.payload is not None
    metrics: RunMetrics = NoMetrics()
    if ctx.world.main:
        metrics = open_loggers(ctx.cfg, ctx.run_dir, trainer.pos.step, resumed, display.message)
        write_config(ctx.run_dir, ctx.cfg.to_dict())
        for line in (
            *announce.start_lines(ctx, trainer, start.corpus, built.choice, resumed),
            *announce.origin_lines(built.origin, ctx.cfg.train.freeze, trainer.model, len(start.corpus.vocab)),
        ):
            display.message(line)
    corpus = start.corpus
    metrics.log(
        Event(
            "start",
            trainer.pos.step,
            dict(
                resumed=resumed,
                device=describe_device(ctx.device),
                backend=trainer.model.backend,
                num_parameters=count_parameters(trainer.model),
                vocab_size=len(corpus.vocab),
                train_chars=corpus.train_ids.numel(),
                val_chars=corpus.val_ids.numel(),
                world_size=ctx.world.size,
                **built.origin,
            ),
        )
    )
    return trainer, metrics


def _restore_or_save(trainer: Trainer, ctx: RunContext, start: Start) -> None:
    """A resumed run continues from its last.pt; a new one writes last.pt at once, so that from here
    on the run dir always holds a loadable checkpoint."""
    if start.payload is None:
        trainer.save()
        return
    check_resumable(start.payload, ctx.cfg, start.corpus)
    check_same_freeze(start.payload, ctx.cfg)
    trainer.restore(start.payload)
    if trainer.budget.reached(trainer.pos.step, trainer.pos.elapsed):
        raise UserError(
            f"the run in {ctx.run_dir} already reached its budget (step {trainer.pos.step}); "
            "raise train.max_steps or train.max_time with --set to train further"
        )
