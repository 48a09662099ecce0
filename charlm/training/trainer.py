"""The training loop: forward and backward over micro-batches, clip, step, carry the TBPTT state;
the run loop and the ranks' agreement to stop. Handed its model, it does not know which cell it
trains; under torchrun it trains this rank's slice of the streams (see distributed.py)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from charlm.config import Config
from charlm.data.batches import TBPTTBatches
from charlm.data.corpus import Corpus
from charlm.errors import Interrupted
from charlm.inference.evaluate import EvalResult
from charlm.training import checkpoint_contents, distributed
from charlm.training.checkpoint_contents import Progress
from charlm.training.distributed import World
from charlm.store.metrics import MetricsLog
from charlm.training.metrics import IntervalStats
from charlm.training.optim import Budget, WeightAverage, build_optimizer, learning_rate
from charlm.training.recovery import out_of_patience, skip_bad_step
from charlm.training.runtime import autocast, batch_to_device, grad_scaler
from charlm.training.signals import StopRequests
from charlm.training.validation import evaluate_and_save
from charlm.training.wrapping import WrappedModel


@dataclass
class TrainOutcome:
    run_dir: Path
    step: int
    epoch: int
    elapsed: float
    stop_reason: str  # "budget", "early_stop" or "interrupted"
    best_val_loss: Optional[float]
    best_step: Optional[int]
    last_val: Optional[EvalResult]
    signal: Optional[int] = None
    main: bool = True  # the process that reports (rank 0 under torchrun)


def activation_penalties(top: dict, ar: float, tar: float) -> torch.Tensor:
    """AR and TAR (Merity et al. 2017) on the top layer's outputs [T, B, H]: ar * mean(h_dropped^2)
    keeps activations small, tar * mean((h_t - h_{t-1})^2) keeps them from jumping between steps
    (on the outputs before dropout, whose masks would make every step jump)."""
    penalty = torch.zeros((), device=top["h"].device)
    if ar:
        penalty = penalty + ar * top["h_dropped"].float().pow(2).mean()
    if tar and top["h"].shape[0] > 1:
        h = top["h"].float()
        penalty = penalty + tar * (h[1:] - h[:-1]).pow(2).mean()
    return penalty


class Trainer:
    """Trains the model it is handed on `corpus` as `cfg.train` says; checkpoints go to `run_dir`."""

    def __init__(self, cfg: Config, run_dir: Path, corpus: Corpus, model: torch.nn.Module, device: torch.device,
                 display, world: World = World()):
        self.cfg, self.run_dir, self.corpus, self.device, self.display = cfg, run_dir, corpus, device, display
        self.world = world
        train = cfg.train
        distributed.check_batch(world, train.batch_size, train.gradient_accumulation_steps)
        self.model = model.to(device)  # on CUDA, fused: also into cuDNN's flat buffer, before these take the weights
        self.optimizer = build_optimizer(self.model, train)
        self.ema = WeightAverage(self.model, train.ema_decay) if train.ema_decay else None
        if world.rank:
            torch.manual_seed(train.seed + 7919 * world.rank)  # same weights on every rank, its own dropout
        self.net = WrappedModel(self.model, world, device, train.compile, display.message)
        self.scaler = grad_scaler(device, train.precision)
        self.batches = TBPTTBatches(corpus.train_ids, train.batch_size, train.seq_len, train.random_offsets, train.seed)
        self.rows = world.rows(train.batch_size)  # this rank's streams
        self.local_batch = train.batch_size // world.size
        self.budget = Budget(train)
        self.pos = Progress()
        self.state = self.model.init_state(self.local_batch)
        self.last_val: Optional[EvalResult] = None
        self.last_eval_step, self.bad_streak = -1, 0
        self._t0 = time.perf_counter()
        self.saved_at = (0, 0.0)  # (step, elapsed) of the last checkpoint
        # After each checkpoint: the optional loggers get the evaluation it goes with only then (run.py).
        self.after_save: Callable[[], None] = lambda: None

    # --- checkpoints --------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.pos.elapsed + (time.perf_counter() - self._t0)

    def evaluated_weights(self):
        """A context in which the model holds the weights that are validated, saved as "model"
        and sampled from: the average with train.ema_decay, else the weights themselves."""
        return self.ema.applied(self.model) if self.ema else contextlib.nullcontext(self.model)

    def save(self, best: bool = False) -> None:
        """last.pt (and best.pt): every rank calls this together; rank 0 writes."""
        checkpoint_contents.save(self, best)
        self.saved_at = (self.pos.step, self.elapsed())
        self.after_save()

    def restore(self, payload: dict) -> None:
        """Continue exactly where the checkpoint left off (this rank's streams of its state)."""
        checkpoint_contents.load_into(self, payload)
        self._t0 = time.perf_counter()
        self.last_eval_step, self.bad_streak = self.pos.step, 0
        self.saved_at = (self.pos.step, self.pos.elapsed)

    def checkpoint_due(self) -> bool:
        cfg = self.cfg.train
        step, when = self.saved_at
        if cfg.checkpoint_steps is not None and self.pos.step - step >= cfg.checkpoint_steps:
            return True
        if cfg.checkpoint_seconds is None:
            return False
        return distributed.any_rank(self.elapsed() - when >= cfg.checkpoint_seconds, self.world, self.device)

    # --- one step -----------------------------------------------------------------------

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor, tuple, int]:
        """Loss and gradients of the next TBPTT window, from the carried state.

        With gradient_accumulation_steps k, this rank's streams go through in k micro-batches
        whose gradients add up to those of the whole batch (each loss is divided by k)."""
        train = self.cfg.train
        if self.pos.window == 0:
            self.state = self.model.init_state(self.local_batch)  # a new epoch starts from scratch
        x, y = self.batches.window(self.pos.window, self.rows, self.pos.epoch)  # [B/W, T] each
        x, y = batch_to_device(x, self.device), batch_to_device(y, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        k = train.gradient_accumulation_steps
        micro = self.local_batch // k
        loss_sum, finals = torch.zeros((), device=self.device), []
        with self.model.shared_weight_masks(self.update_generator("weight_dropout")):
            for j in range(k):
                loss_sum += self._micro_batch(x, y, slice(j * micro, (j + 1) * micro), j == k - 1, finals)
        self.scaler.unscale_(self.optimizer)
        max_norm = train.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # norm before clipping
        state = tuple(torch.cat(parts, dim=1) for parts in zip(*finals))  # [L, B/W, H]
        return loss_sum, grad_norm.detach(), state, x.numel()

    def _micro_batch(self, x: torch.Tensor, y: torch.Tensor, rows: slice, last: bool, finals: list) -> torch.Tensor:
        """Forward and backward of one micro-batch (rows of this rank's streams); its loss, detached."""
        train = self.cfg.train
        k = train.gradient_accumulation_steps
        top = {} if train.ar or train.tar else None
        with self.net.gradient_sync(last), autocast(self.device, train.precision):
            logits, state = self.net(x[rows], tuple(s[:, rows] for s in self.state), top=top)  # [b, T, V]
            loss = self.loss(logits, y[rows])
        # The reported loss is the cross-entropy alone; the penalties only shape the gradient.
        objective = loss + activation_penalties(top, train.ar, train.tar) if top is not None else loss
        self.scaler.scale(objective / k).backward()
        loss = loss / k
        del logits  # [b, T, V] can be large (6,000 symbols): not kept into the next micro-batch
        finals.append(self.model.detach_state(state))
        return loss.detach().float()

    def update_generator(self, purpose: str) -> torch.Generator:
        """A generator seeded by train.seed, the step and `purpose` alone: every rank and every
        micro-batch of an update draws the same numbers from it, and so does a resumed run."""
        digest = hashlib.sha256(f"{self.cfg.train.seed}:{self.pos.step}:{purpose}".encode()).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits [B, T, V]. CharLM's logits are a transposed view of a
        time-major tensor: flattening them time-major avoids copying all B*T*V of them."""
        flat = logits.transpose(0, 1).reshape(-1, logits.shape[-1])  # [T*B, V]
        return F.cross_entropy(flat.float(), targets.t().reshape(-1))

    def apply_update(self, state: tuple) -> None:
        lr = learning_rate(self.cfg.train, self.pos.step, self.budget.fraction(self.pos.step, self.elapsed()))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.pos.lr_scale
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        self.state = state  # carry the state (detached: the graph is cut here)

    def advance(self) -> None:
        self.pos.step += 1
        self.pos.window += 1
        if self.pos.window == self.batches.windows_per_epoch:
            self.pos.epoch, self.pos.window = self.pos.epoch + 1, 0

    # --- the loop -----------------------------------------------------------------------

    def stop_now(self, stop: StopRequests) -> bool:
        """Budget spent or a signal received, on any rank: then on every rank, at the same step."""
        local = stop.signal is not None or self.budget.reached(self.pos.step, self.elapsed())
        return distributed.any_rank(local, self.world, self.device)

    def run(self, metrics: MetricsLog) -> TrainOutcome:
        self.net.train()
        interval = IntervalStats(self.device)
        reason = "budget"
        with StopRequests() as stop:
            while not self.stop_now(stop):
                if self.train_step(metrics, interval):
                    reason = "early_stop"
                    break
            # The signal itself, not just whether there was one: a rank that received none reports it too.
            signum = distributed.max_over_ranks(stop.signal or 0, self.world, self.device) or None
            if signum is not None and reason == "budget":
                reason = "interrupted"
            final_eval = reason == "budget" and self.last_eval_step != self.pos.step
            if reason == "interrupted" or (final_eval and self.saved_at[0] != self.pos.step):
                self.save()  # before a final evaluation too: a signal may cut that one short
        if final_eval:
            self.final_evaluation(metrics, stop.signal)
        self._end(metrics, reason)
        return TrainOutcome(self.run_dir, self.pos.step, self.pos.epoch, self.elapsed(), reason,
                            self.pos.best_val_loss, self.pos.best_step, self.last_val, signum, self.world.main)

    def train_step(self, metrics: MetricsLog, interval: IntervalStats) -> bool:
        """One update (skipped if any rank's loss or gradient is not finite) and what follows it:
        the log line, an evaluation or a checkpoint, the display. True: out of patience, stop early."""
        cfg = self.cfg.train
        loss, grad_norm, state, chars = self.forward_backward()
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))  # on the device
        # The step's one wait for the device (README, Scaling out: what syncs remain): whether to
        # step, carry the state or skip and maybe roll back must be known before the next step.
        if distributed.any_rank_flag(nonfinite, self.world):
            self.advance()
            skip_bad_step(self, metrics, float(loss), float(grad_norm))
            return False
        self.bad_streak = 0
        self.apply_update(state)
        self.advance()
        interval.add(loss, grad_norm, chars * self.world.size)
        if self.pos.step % cfg.log_interval == 0:
            self._log(metrics, *interval.flush())
        if self.pos.step % cfg.eval_interval == 0:
            started = time.perf_counter()
            evaluate_and_save(self, metrics)
            interval.exclude(time.perf_counter() - started)  # eval time is not training throughput
            if out_of_patience(self):
                return True
        elif self.checkpoint_due():
            self.save()
        self.display.update(self.budget.fraction(self.pos.step, self.elapsed()), self.pos.step, cfg.max_steps)
        return False

    def final_evaluation(self, metrics: MetricsLog, pending: Optional[int]) -> None:
        """The evaluation at the end of the budget, with last.pt already written. It runs outside
        StopRequests: a signal ends it at once (Interrupted) instead of after the whole val split."""
        try:
            if pending is not None:  # it came during the save just before
                raise Interrupted(pending)
            evaluate_and_save(self, metrics)
        except Interrupted:
            self._end(metrics, "interrupted")
            raise

    def _end(self, metrics: MetricsLog, reason: str) -> None:
        metrics.write("end", step=self.pos.step, epoch=self.pos.epoch, elapsed=self.elapsed(), reason=reason,
                      best_val_loss=self.pos.best_val_loss, best_step=self.pos.best_step,
                      skipped_steps=self.pos.skipped_steps, rollbacks=self.pos.rollbacks)

    def _log(self, metrics: MetricsLog, loss: float, grad_norm: float, rate: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        metrics.write("train", step=self.pos.step, epoch=self.pos.epoch, loss=loss, lr=lr,
                      grad_norm=grad_norm, chars_per_sec=rate, elapsed=self.elapsed())
        self.display.on_log(self.pos.step, self.pos.epoch, loss, lr, grad_norm, rate)
