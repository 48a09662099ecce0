"""The training loop: optimise, clip, carry and detach state, evaluate, checkpoint, recover.

The trainer only uses the model's forward, init_state and detach_state: it does not know
which recurrent model it trains. Under torchrun it trains this rank's slice of the streams
(see distributed.py); one process is the same loop with a world of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from charlm.training import distributed
from charlm.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from charlm.training.rundir import BEST, LAST
from charlm.config import Config, ConfigError, validate_config
from charlm.data.corpus import Corpus
from charlm.data.batches import TBPTTBatches
from charlm.training.distributed import World
from charlm.errors import Interrupted, UserError
from charlm.inference.evaluate import EvalResult, evaluate_totals, result_of
from charlm.models.model import build_model, count_parameters
from charlm.training.optim import Budget, WeightAverage, build_optimizer, learning_rate
from charlm.report.progress import IntervalStats, TrainingDisplay
from charlm.training.rundir import MetricsLog
from charlm.inference.sample import Decoding, generate, prompt_ids
from charlm.data.text import TextSettings
from charlm.training.runtime import (autocast, describe_device, grad_scaler, rng_state, seed_everything,
                            set_rng_state)
from charlm.training.signals import StopRequests


class TrainingDiverged(UserError):
    """Non-finite losses that rolling back with a lower learning rate did not cure."""


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


@dataclass
class _Progress:
    """Everything about where a run is that a checkpoint must carry, besides tensors."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    elapsed: float = 0.0  # training seconds of earlier sessions of this run (at the last restore)
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0
    lr_scale: float = 1.0  # cut by train.rollback_lr_factor at each rollback
    rollbacks: int = 0
    skipped_steps: int = 0


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, corpus: Corpus, device: torch.device, display: TrainingDisplay,
                 world: World = World()):
        self.cfg, self.run_dir, self.corpus, self.device, self.display = cfg, run_dir, corpus, device, display
        self.world = world
        train = cfg.train
        distributed.check_batch(world, train.batch_size, train.gradient_accumulation_steps)
        seed_everything(train.seed)
        self.model = build_model(cfg.model, len(corpus.vocab)).to(device)
        self.optimizer = build_optimizer(self.model, train)
        self.ema = WeightAverage(self.model, train.ema_decay) if train.ema_decay else None
        if world.rank:
            torch.manual_seed(train.seed + 7919 * world.rank)  # same weights on every rank, its own dropout
        self.net = self._wrap(self.model)
        self.scaler = grad_scaler(device, train.precision)
        self.batches = TBPTTBatches(corpus.train_ids, train.batch_size, train.seq_len, train.random_offsets, train.seed)
        self.rows = world.rows(train.batch_size)  # this rank's streams
        self.local_batch = train.batch_size // world.size
        self.budget = Budget(train)
        self.pos = _Progress()
        self.state = self.model.init_state(self.local_batch)
        self.last_val: Optional[EvalResult] = None
        self.last_eval_step, self.bad_streak = -1, 0
        self._t0 = time.perf_counter()
        self._saved_at = (0, 0.0)  # (step, elapsed) of the last checkpoint

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun; torch.compile when asked (the plain model is kept for saving)."""
        self.ddp = None
        net = model
        if self.world.enabled:
            self.ddp = net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.train.compile:
            try:
                net = torch.compile(net)
            except Exception as err:  # noqa: BLE001 - any failure: train eagerly
                self._compile_failed(err)
        return net

    def _compile_failed(self, err: Exception) -> None:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        self.display.message(f"warning: torch.compile is unavailable here ({reason}); training without it")
        self.net = self.ddp or self.model

    def forward(self, x: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """The wrapped model's forward; a compiled model that fails on first use falls back to eager."""
        try:
            return self.net(x, state)
        except Exception as err:  # noqa: BLE001 - only compile failures are retried
            if not self.cfg.train.compile or self.net is (self.ddp or self.model):
                raise
            self._compile_failed(err)
            return self.net(x, state)

    # --- checkpoints --------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.pos.elapsed + (time.perf_counter() - self._t0)

    def evaluated_weights(self):
        """A context in which the model holds the weights that are validated, saved as "model"
        and sampled from: the average with train.ema_decay, else the weights themselves."""
        return self.ema.applied(self.model) if self.ema else contextlib.nullcontext(self.model)

    def payload(self, state: tuple) -> dict:
        # "model" is what sample and eval load; with an average, the optimiser's own weights
        # go to "raw_model" so that a resume continues from them.
        weights = {"model": self.ema.state_dict(self.model), "raw_model": self.model.state_dict(),
                   "ema_updates": self.ema.updates} if self.ema else {"model": self.model.state_dict()}
        return {
            "config": self.cfg.to_dict(), "vocab": self.corpus.vocab.to_dict(),
            **weights, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {**asdict(self.pos), "elapsed": self.elapsed()},
            "step": self.pos.step, "epoch": self.pos.epoch, "elapsed": self.elapsed(),
            "best_val_loss": self.pos.best_val_loss, "best_step": self.pos.best_step,
            "train_state": [s.detach().cpu() for s in state], "rng": rng_state(),
            "val_loss": self.last_val.loss_nats if self.last_val else None,
            "device": describe_device(self.device), "data_fingerprint": self.corpus.fingerprint,
            "num_parameters": count_parameters(self.model), "world_size": self.world.size,
        }

    def restore(self, payload: dict) -> None:
        """Continue exactly where the checkpoint left off (this rank's streams of its state)."""
        self.model.load_state_dict(payload.get("raw_model", payload["model"]))
        if self.ema is not None:  # an average switched on at this resume starts from the weights
            averaged = "raw_model" in payload
            self.ema.load(payload["model"] if averaged else self.model.state_dict(),
                          payload.get("ema_updates", 0) if averaged else 0)
        self.optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.state = tuple(s[:, self.rows].to(self.device) for s in payload["train_state"])
        self._restore_rng(payload)
        self.pos = _Progress(**payload["progress"])
        self._t0 = time.perf_counter()
        self.last_eval_step, self.bad_streak = self.pos.step, 0
        self._saved_at = (self.pos.step, self.pos.elapsed)

    def _restore_rng(self, payload: dict) -> None:
        """Each rank continues its own dropout stream. Resumed with another number of processes,
        the streams cannot continue (the batch is split differently): ranks above 0 start new
        ones from the seed, their rank and the step, so such a resume is not bit-exact."""
        ranks = payload.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world.size:
            set_rng_state(ranks[self.world.rank])
            return
        set_rng_state(payload["rng"])
        if self.world.rank:
            torch.manual_seed(self.cfg.train.seed + 7919 * self.world.rank + payload["step"])

    def save(self, best: bool = False) -> None:
        """Every rank calls this together: the global state is gathered; rank 0 writes."""
        state = distributed.gather_rows(self.state, self.world)
        rngs = distributed.gather_objects(rng_state(), self.world)  # each rank draws its own dropout masks
        if self.world.main:
            payload = {**self.payload(state), "rng_ranks": rngs}
            save_checkpoint(payload, self.run_dir / LAST)
            if best:
                save_checkpoint(payload, self.run_dir / BEST)
        distributed.barrier(self.world)  # nobody reads last.pt (a rollback) before it is written
        self._saved_at = (self.pos.step, self.elapsed())

    def checkpoint_due(self) -> bool:
        cfg = self.cfg.train
        step, when = self._saved_at
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
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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
        k = self.cfg.train.gradient_accumulation_steps
        sync = last or not self.world.enabled  # DDP averages gradients once, after the last
        with (contextlib.nullcontext() if sync else self.ddp.no_sync()), autocast(self.device, self.cfg.train.precision):
            logits, state = self.forward(x[rows], tuple(s[:, rows] for s in self.state))  # [b, T, V]
            loss = self.loss(logits, y[rows]) / k
        self.scaler.scale(loss).backward()
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

    # --- recovering from non-finite steps -------------------------------------------------

    def skip_bad_step(self, metrics: MetricsLog, loss: float, grad_norm: float) -> None:
        """No update; the carried state, possibly poisoned, restarts from zero.

        With fp16 the loss scaler still ends its step: update() sees the inf that unscale_()
        found and shrinks the scale, as it must for the next steps to come out finite."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.state = self.model.init_state(self.local_batch)
        self.bad_streak += 1
        self.pos.skipped_steps += 1
        metrics.write("skip", step=self.pos.step, loss=loss, grad_norm=grad_norm, streak=self.bad_streak)
        self.display.message(f"step {self.pos.step}: non-finite loss or gradient (loss {loss}, grad norm "
                             f"{grad_norm}); update skipped ({self.bad_streak} in a row)")
        if self.bad_streak >= self.cfg.train.max_bad_steps:
            self.roll_back(metrics)

    def roll_back(self, metrics: MetricsLog) -> None:
        """Back to the last checkpoint with the learning rate cut, or give up."""
        cfg = self.cfg.train
        if self.pos.rollbacks >= cfg.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged: {cfg.max_bad_steps} non-finite steps in a row after {self.pos.rollbacks} "
                f"rollback(s) (learning rate now x{self.pos.lr_scale:g}); lower train.lr or train.grad_clip and "
                f"resume from {self.run_dir / LAST} with --resume")
        rollbacks, lr_scale = self.pos.rollbacks + 1, self.pos.lr_scale * cfg.rollback_lr_factor
        elapsed, skipped = self.elapsed(), self.pos.skipped_steps
        scale = self.scaler.state_dict()
        self.restore(load_checkpoint(self.run_dir / LAST))
        # Steps and weights go back; wall time, the count of skipped steps and the fp16 loss
        # scale (shrunk by the skipped steps; the saved one overflowed) do not.
        self.pos.rollbacks, self.pos.lr_scale, self.pos.skipped_steps = rollbacks, lr_scale, skipped
        if scale:
            self.scaler.load_state_dict(scale)
        self.pos.elapsed = elapsed
        metrics.write("rollback", step=self.pos.step, lr_scale=lr_scale, rollbacks=rollbacks)
        self.display.message(f"rolled back to step {self.pos.step} ({LAST}) with the learning rate cut to "
                             f"x{lr_scale:g} (rollback {rollbacks} of at most {cfg.max_rollbacks})")

    # --- evaluation ---------------------------------------------------------------------

    def validate(self) -> EvalResult:
        """The whole val split; under torchrun each rank scores its share and the sums are reduced."""
        with self.evaluated_weights():
            total, count = evaluate_totals(self.model, self.corpus.val_ids, self.cfg.train.eval_batch_size,
                                           part=(self.world.rank, self.world.size))
        total, count = distributed.sum_over_ranks([total, float(count)], self.world, self.device)
        return result_of(total, int(count))

    def evaluate_and_save(self, metrics: MetricsLog) -> None:
        started = time.perf_counter()
        result = self.validate()
        best = math.isfinite(result.loss_nats) and (self.pos.best_val_loss is None
                                                    or result.loss_nats < self.pos.best_val_loss)
        if best:
            self.pos.best_val_loss, self.pos.best_step, self.pos.evals_since_best = result.loss_nats, self.pos.step, 0
        else:
            self.pos.evals_since_best += 1
        self.last_val, self.last_eval_step = result, self.pos.step
        seconds = time.perf_counter() - started
        metrics.write("eval", step=self.pos.step, epoch=self.pos.epoch, val_loss=result.loss_nats,
                      val_bpc=result.bpc, best_val_loss=self.pos.best_val_loss, elapsed=self.elapsed(),
                      eval_seconds=seconds)
        self.display.on_eval(self.pos.step, result.loss_nats, result.bpc, best, seconds, self.pos.best_val_loss)
        if self.world.main and self.display.wants_samples:
            self.display.on_sample(self.pos.step, self.preview())
        self.save(best)

    def preview(self, length: int = 120) -> str:
        """A short sample from the sample section's prompt. Its own generator: the training
        RNG (dropout) is untouched, so a run with previews equals one without."""
        cfg = self.cfg
        generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed + self.pos.step)
        context, _ = prompt_ids(self.corpus.vocab, cfg.sample.prompt, TextSettings.from_config(cfg.data))
        with self.evaluated_weights():
            out = generate(self.model, context, length, 1, Decoding.of(cfg.sample), generator)
        return self.corpus.vocab.decode(out[0])

    def out_of_patience(self) -> bool:
        patience = self.cfg.train.patience
        return patience is not None and self.pos.evals_since_best >= patience

    # --- the loop -----------------------------------------------------------------------

    def stop_now(self, stop: StopRequests) -> bool:
        """Budget spent or a signal received, on any rank: then on every rank, at the same step."""
        local = stop.signal is not None or self.budget.reached(self.pos.step, self.elapsed())
        return distributed.any_rank(local, self.world, self.device)

    def run(self, metrics: MetricsLog) -> TrainOutcome:
        cfg = self.cfg.train
        self.net.train()
        interval = IntervalStats(self.device)
        reason = "budget"
        with StopRequests() as stop:
            while not self.stop_now(stop):
                loss, grad_norm, state, chars = self.forward_backward()
                bad = not bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
                if distributed.any_rank(bad, self.world, self.device):
                    self.advance()
                    self.skip_bad_step(metrics, float(loss), float(grad_norm))
                    continue
                self.bad_streak = 0
                self.apply_update(state)
                self.advance()
                interval.add(loss, grad_norm, chars * self.world.size)
                if self.pos.step % cfg.log_interval == 0:
                    self._log(metrics, *interval.flush())
                if self.pos.step % cfg.eval_interval == 0:
                    started = time.perf_counter()
                    self.evaluate_and_save(metrics)
                    interval.exclude(time.perf_counter() - started)  # eval time is not training throughput
                    if self.out_of_patience():
                        reason = "early_stop"
                        break
                elif self.checkpoint_due():
                    self.save()
                self.display.update(self.budget.fraction(self.pos.step, self.elapsed()), self.pos.step, cfg.max_steps)
            # The signal itself, not just whether there was one: a rank that received none reports it too.
            signum = distributed.max_over_ranks(stop.signal or 0, self.world, self.device) or None
            if signum is not None and reason == "budget":
                reason = "interrupted"
            final_eval = reason == "budget" and self.last_eval_step != self.pos.step
            if reason == "interrupted" or (final_eval and self._saved_at[0] != self.pos.step):
                self.save()  # before a final evaluation too: a signal may cut that one short
        if final_eval:
            self.final_evaluation(metrics, stop.signal)
        self._end(metrics, reason)
        return TrainOutcome(self.run_dir, self.pos.step, self.pos.epoch, self.elapsed(), reason,
                            self.pos.best_val_loss, self.pos.best_step, self.last_val, signum, self.world.main)

    def final_evaluation(self, metrics: MetricsLog, pending: Optional[int]) -> None:
        """The evaluation at the end of the budget, with last.pt already written. It runs outside
        StopRequests: a signal ends it at once (Interrupted) instead of after the whole val split."""
        try:
            if pending is not None:  # it came during the save just before
                raise Interrupted(pending)
            self.evaluate_and_save(metrics)
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


def _with_defaults(saved: dict) -> dict:
    """A checkpoint's config with the keys added since it was written at their defaults
    (which reproduce what it did), so they do not read as changed."""
    try:
        return validate_config(saved, "checkpoint config").to_dict()
    except ConfigError:
        return saved


def check_resumable(payload: dict, cfg: Config, corpus: Corpus) -> None:
    """A checkpoint resumes only with the same model, data and batch layout (the backend may change)."""
    saved, now = _with_defaults(payload["config"]), cfg.to_dict()
    changed = [f"{section}.{key}" for section in ("model", "data") for key in now[section]
               if saved.get(section, {}).get(key) != now[section][key] and f"{section}.{key}" != "model.backend"]
    changed += [f"train.{key}" for key in ("batch_size", "seq_len", "random_offsets")
                if saved.get("train", {}).get(key) != now["train"][key]]
    if changed:
        raise CheckpointError(f"cannot resume: {', '.join(changed)} differ from the checkpoint's config; "
                              "resume with the run's own config (omit --config) or start a new run")
    if payload.get("data_fingerprint") != corpus.fingerprint:
        raise CheckpointError("cannot resume: the training text has changed since the checkpoint was written")
    if "progress" not in payload or "optimizer" not in payload:
        raise CheckpointError("cannot resume: the checkpoint holds no training state (optimizer, progress)")
