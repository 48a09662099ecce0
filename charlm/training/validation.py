"""Validation during training: the val loss over every rank's share, the best-so-far bookkeeping,
the checkpoint written with each evaluation, and the short preview sample shown with it."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from charlm.data.text import TextSettings
from charlm.inference.evaluate import EvalResult, evaluate_totals, result_of
from charlm.inference.sample import Decoding, generate, prompt_ids
from charlm.training import distributed
from charlm.store.metrics import MetricsLog

if TYPE_CHECKING:
    from charlm.training.trainer import Trainer


def validate(trainer: Trainer) -> EvalResult:
    """The whole val split; under torchrun each rank scores its share and the sums are reduced."""
    world = trainer.world
    with trainer.evaluated_weights():
        total, count = evaluate_totals(trainer.model, trainer.corpus.val_ids, trainer.cfg.train.eval_batch_size,
                                       part=(world.rank, world.size))
    total, count = distributed.sum_over_ranks([total, float(count)], world, trainer.device)
    return result_of(total, int(count))


def evaluate_and_save(trainer: Trainer, metrics: MetricsLog) -> None:
    """Validate, log and show the result (with a preview sample, also logged as a `sample` event
    where train.loggers has a logger that shows samples), then checkpoint (best.pt too on a new best)."""
    started = time.perf_counter()
    result = validate(trainer)
    pos = trainer.pos
    best = math.isfinite(result.loss_nats) and (pos.best_val_loss is None or result.loss_nats < pos.best_val_loss)
    if best:
        pos.best_val_loss, pos.best_step, pos.evals_since_best = result.loss_nats, pos.step, 0
    else:
        pos.evals_since_best += 1
    trainer.last_val, trainer.last_eval_step = result, pos.step
    seconds = time.perf_counter() - started
    metrics.write("eval", step=pos.step, epoch=pos.epoch, val_loss=result.loss_nats,
                  val_bpc=result.bpc, best_val_loss=pos.best_val_loss, elapsed=trainer.elapsed(),
                  eval_seconds=seconds)
    trainer.display.on_eval(pos.step, result.loss_nats, result.bpc, best, seconds, pos.best_val_loss)
    show, log = trainer.display.wants_samples, metrics.wants_samples
    if trainer.world.main and (show or log):
        text = preview(trainer)  # one sample for both: the same text on screen and in the logs
        if show:
            trainer.display.on_sample(pos.step, text)
        if log:
            metrics.write("sample", step=pos.step, text=text)
    trainer.save(best)


def preview(trainer: Trainer, length: int = 120) -> str:
    """A short sample from the sample section's prompt. Its own generator: the training
    RNG (dropout) is untouched, so a run with previews equals one without."""
    cfg, vocab = trainer.cfg, trainer.corpus.vocab
    generator = torch.Generator(device=trainer.device).manual_seed(cfg.train.seed + trainer.pos.step)
    context, _ = prompt_ids(vocab, cfg.sample.prompt, TextSettings.from_config(cfg.data))
    with trainer.evaluated_weights():
        out = generate(trainer.model, context, length, 1, Decoding.of(cfg.sample), generator)
    return vocab.decode(out[0])
