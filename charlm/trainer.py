"""The training loop: optimise, clip, carry and detach state, evaluate, checkpoint, recover.

The trainer only uses the model's forward, init_state and detach_state: it does not know
which recurrent model it trains.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from charlm.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, save_checkpoint
from charlm.config import Config
from charlm.corpus import Corpus, load_corpus
from charlm.data import TBPTTBatches
from charlm.errors import UserError
from charlm.evaluate import EvalResult, evaluate_ids
from charlm.model import build_model, count_parameters
from charlm.optim import Budget, build_optimizer, learning_rate
from charlm.progress import TrainingDisplay
from charlm.rundir import MetricsLog, RunLock, prepare_run_dir, write_config
from charlm.runtime import describe_device, resolve_device, rng_state, seed_everything, set_rng_state


class TrainingDiverged(UserError):
    """Non-finite losses that rolling back with a lower learning rate did not cure."""


class StopRequests:
    """Turns SIGINT / SIGTERM into a flag the loop checks between steps, so a step is never cut in half."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __enter__(self) -> "StopRequests":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _IntervalStats:
    """Loss, largest pre-clip gradient norm and throughput since the last log line.

    Sums stay on the device: reading them every step would make a GPU wait."""

    def __init__(self, device: torch.device):
        self._zero = torch.zeros((), device=device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.norm_max, self.chars, self.steps = self._zero, self._zero, 0, 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, chars: int) -> None:
        self.loss_sum, self.norm_max = self.loss_sum + loss, torch.maximum(self.norm_max, grad_norm)
        self.chars, self.steps = self.chars + chars, self.steps + 1

    def exclude(self, seconds: float) -> None:
        self.started += seconds

    def flush(self) -> tuple[float, float, float]:
        """(mean loss, max grad norm, chars per second) of the interval, then start a new one."""
        stats = (float(self.loss_sum) / max(self.steps, 1), float(self.norm_max),
                 self.chars / max(time.perf_counter() - self.started, 1e-9))
        self._reset()
        return stats


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
    def __init__(self, cfg: Config, run_dir: Path, corpus: Corpus, device: torch.device, display: TrainingDisplay):
        self.cfg, self.run_dir, self.corpus, self.device, self.display = cfg, run_dir, corpus, device, display
        seed_everything(cfg.train.seed)
        self.model = build_model(cfg.model, len(corpus.vocab)).to(device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.batches = TBPTTBatches(corpus.train_ids, cfg.train.batch_size, cfg.train.seq_len)
        self.budget = Budget(cfg.train)
        self.pos = _Progress()
        self.state = self.model.init_state(cfg.train.batch_size)
        self.last_val: Optional[EvalResult] = None
        self.last_eval_step, self.bad_streak = -1, 0
        self._t0 = time.perf_counter()
        self._saved_at = (0, 0.0)  # (step, elapsed) of the last checkpoint

    # --- checkpoints --------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.pos.elapsed + (time.perf_counter() - self._t0)

    def payload(self) -> dict:
        return {
            "config": self.cfg.to_dict(), "vocab": self.corpus.vocab.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "progress": {**asdict(self.pos), "elapsed": self.elapsed()},
            "step": self.pos.step, "epoch": self.pos.epoch, "elapsed": self.elapsed(),
            "best_val_loss": self.pos.best_val_loss, "best_step": self.pos.best_step,
            "train_state": [s.detach().cpu() for s in self.state], "rng": rng_state(),
            "val_loss": self.last_val.loss_nats if self.last_val else None,
            "device": describe_device(self.device), "data_fingerprint": self.corpus.fingerprint,
            "num_parameters": count_parameters(self.model),
        }

    def restore(self, payload: dict) -> None:
        """Continue exactly where the checkpoint left off."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = tuple(s.to(self.device) for s in payload["train_state"])
        set_rng_state(payload["rng"])
        self.pos = _Progress(**payload["progress"])
        self._t0 = time.perf_counter()
        self.last_eval_step, self.bad_streak = self.pos.step, 0
        self._saved_at = (self.pos.step, self.pos.elapsed)

    def save(self, best: bool = False) -> None:
        payload = self.payload()
        save_checkpoint(payload, self.run_dir / LAST)
        if best:
            save_checkpoint(payload, self.run_dir / BEST)
        self._saved_at = (self.pos.step, self.elapsed())

    def checkpoint_due(self) -> bool:
        cfg = self.cfg.train
        step, when = self._saved_at
        if cfg.checkpoint_steps is not None and self.pos.step - step >= cfg.checkpoint_steps:
            return True
        return cfg.checkpoint_seconds is not None and self.elapsed() - when >= cfg.checkpoint_seconds

    # --- one step -----------------------------------------------------------------------

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor, tuple, int]:
        """Loss and gradients of the next TBPTT window, from the carried state."""
        if self.pos.window == 0:
            self.state = self.model.init_state(self.cfg.train.batch_size)  # a new epoch starts from scratch
        x, y = self.batches.window(self.pos.window)  # [B, T] each
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        logits, state = self.model(x, self.state)  # [B, T, V]
        loss = self.loss(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.cfg.train.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # norm before clipping
        return loss.detach(), grad_norm.detach(), self.model.detach_state(state), x.numel()

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits [B, T, V]. CharLM's logits are a transposed view of a
        time-major tensor: flattening them time-major avoids copying all B*T*V of them."""
        flat = logits.transpose(0, 1).reshape(-1, logits.shape[-1])  # [T*B, V]
        return F.cross_entropy(flat, targets.t().reshape(-1))

    def apply_update(self, state: tuple) -> None:
        lr = learning_rate(self.cfg.train, self.pos.step, self.budget.fraction(self.pos.step, self.elapsed()))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.pos.lr_scale
        self.optimizer.step()
        self.state = state  # carry the state (detached: the graph is cut here)

    def advance(self) -> None:
        self.pos.step += 1
        self.pos.window += 1
        if self.pos.window == self.batches.windows_per_epoch:
            self.pos.epoch, self.pos.window = self.pos.epoch + 1, 0

    # --- recovering from non-finite steps -------------------------------------------------

    def skip_bad_step(self, metrics: MetricsLog, loss: float, grad_norm: float) -> None:
        """No update; the carried state, possibly poisoned, restarts from zero."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state = self.model.init_state(self.cfg.train.batch_size)
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
        self.restore(load_checkpoint(self.run_dir / LAST))
        # Steps and weights go back; wall time and the count of skipped steps do not.
        self.pos.rollbacks, self.pos.lr_scale, self.pos.skipped_steps = rollbacks, lr_scale, skipped
        self.pos.elapsed = elapsed
        metrics.write("rollback", step=self.pos.step, lr_scale=lr_scale, rollbacks=rollbacks)
        self.display.message(f"rolled back to step {self.pos.step} ({LAST}) with the learning rate cut to "
                             f"x{lr_scale:g} (rollback {rollbacks} of at most {cfg.max_rollbacks})")

    # --- evaluation ---------------------------------------------------------------------

    def evaluate_and_save(self, metrics: MetricsLog) -> None:
        started = time.perf_counter()
        result = evaluate_ids(self.model, self.corpus.val_ids, self.cfg.train.eval_batch_size)
        best = self.pos.best_val_loss is None or result.loss_nats < self.pos.best_val_loss
        if best:
            self.pos.best_val_loss, self.pos.best_step, self.pos.evals_since_best = result.loss_nats, self.pos.step, 0
        else:
            self.pos.evals_since_best += 1
        self.last_val, self.last_eval_step = result, self.pos.step
        seconds = time.perf_counter() - started
        metrics.write("eval", step=self.pos.step, epoch=self.pos.epoch, val_loss=result.loss_nats,
                      val_bpc=result.bpc, best_val_loss=self.pos.best_val_loss, elapsed=self.elapsed(),
                      eval_seconds=seconds)
        self.display.on_eval(self.pos.step, result.loss_nats, result.bpc, best, seconds)
        self.save(best)

    def out_of_patience(self) -> bool:
        patience = self.cfg.train.patience
        return patience is not None and self.pos.evals_since_best >= patience

    # --- the loop -----------------------------------------------------------------------

    def run(self, metrics: MetricsLog) -> TrainOutcome:
        cfg = self.cfg.train
        self.model.train()
        interval = _IntervalStats(self.device)
        reason = "budget"
        with StopRequests() as stop:
            while not self.budget.reached(self.pos.step, self.elapsed()):
                if stop.signal is not None:
                    reason = "interrupted"
                    break
                loss, grad_norm, state, chars = self.forward_backward()
                if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
                    self.advance()
                    self.skip_bad_step(metrics, float(loss), float(grad_norm))
                    continue
                self.bad_streak = 0
                self.apply_update(state)
                self.advance()
                interval.add(loss, grad_norm, chars)
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
            if reason == "interrupted":
                self.save()
            elif self.last_eval_step != self.pos.step:
                self.evaluate_and_save(metrics)
        metrics.write("end", step=self.pos.step, epoch=self.pos.epoch, elapsed=self.elapsed(), reason=reason,
                      best_val_loss=self.pos.best_val_loss, best_step=self.pos.best_step,
                      skipped_steps=self.pos.skipped_steps, rollbacks=self.pos.rollbacks)
        return TrainOutcome(self.run_dir, self.pos.step, self.pos.epoch, self.elapsed(), reason,
                            self.pos.best_val_loss, self.pos.best_step, self.last_val, stop.signal)

    def _log(self, metrics: MetricsLog, loss: float, grad_norm: float, rate: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        metrics.write("train", step=self.pos.step, epoch=self.pos.epoch, loss=loss, lr=lr,
                      grad_norm=grad_norm, chars_per_sec=rate, elapsed=self.elapsed())
        self.display.on_log(self.pos.step, self.pos.epoch, loss, lr, grad_norm, rate)


def check_resumable(payload: dict, cfg: Config, corpus: Corpus) -> None:
    """A checkpoint resumes only with the same model, data and batch layout (the backend may change)."""
    saved, now = payload["config"], cfg.to_dict()
    changed = [f"{section}.{key}" for section in ("model", "data") for key in now[section]
               if saved.get(section, {}).get(key) != now[section][key] and f"{section}.{key}" != "model.backend"]
    changed += [f"train.{key}" for key in ("batch_size", "seq_len")
                if saved.get("train", {}).get(key) != now["train"][key]]
    if changed:
        raise CheckpointError(f"cannot resume: {', '.join(changed)} differ from the checkpoint's config; "
                              "resume with the run's own config (omit --config) or start a new run")
    if payload.get("data_fingerprint") != corpus.fingerprint:
        raise CheckpointError("cannot resume: the training text has changed since the checkpoint was written")
    if "progress" not in payload or "optimizer" not in payload:
        raise CheckpointError("cannot resume: the checkpoint holds no training state (optimizer, progress)")


def train(cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False,
          display: Optional[TrainingDisplay] = None) -> TrainOutcome:
    """Train a model as `cfg` says, writing the run into `run_dir` (locked while training)."""
    display = display or TrainingDisplay()
    with RunLock(run_dir) as lock:
        for notice in lock.notices + prepare_run_dir(run_dir, resume, overwrite):
            display.message(notice)
        payload = load_checkpoint(run_dir / LAST) if resume else None
        with display.byte_progress("encoding the corpus") as progress:
            corpus = load_corpus(cfg.data, progress)
        for notice in corpus.notices:
            display.message(notice)
        device = resolve_device(cfg.train.device)
        trainer = Trainer(cfg, run_dir, corpus, device, display)
        if payload is not None:
            check_resumable(payload, cfg, corpus)
            trainer.restore(payload)
            if trainer.budget.reached(trainer.pos.step, trainer.pos.elapsed):
                raise UserError(f"the run in {run_dir} already reached its budget (step {trainer.pos.step}); "
                                "raise train.max_steps or train.max_time with --set to train further")
        if payload is None:
            trainer.save()  # from here on the run dir always holds a loadable last.pt
        write_config(run_dir, cfg.to_dict())
        _announce(display, trainer, corpus, device, payload is not None)
        metrics = MetricsLog(run_dir)
        metrics.write("start", step=trainer.pos.step, resumed=payload is not None, device=describe_device(device),
                      num_parameters=count_parameters(trainer.model), vocab_size=len(corpus.vocab),
                      train_chars=corpus.train_ids.numel(), val_chars=corpus.val_ids.numel())
        try:
            with display:
                return trainer.run(metrics)
        finally:
            metrics.close()


def _announce(display: TrainingDisplay, trainer: Trainer, corpus: Corpus, device: torch.device, resumed: bool) -> None:
    cfg = trainer.cfg
    display.message(f"device: {describe_device(device)}")
    display.message(f"data: {corpus.train_ids.numel():,} train / {corpus.val_ids.numel():,} val characters, "
                    f"vocabulary {len(corpus.vocab)}"
                    + (f" ({corpus.val_oov_chars:,} val characters not in it are skipped)" if corpus.val_oov_chars else ""))
    display.message(f"model: {cfg.model.type} {cfg.model.num_layers}x{cfg.model.hidden_size} ({cfg.model.backend} "
                    f"backend), {count_parameters(trainer.model):,} parameters; "
                    f"{trainer.batches.windows_per_epoch} steps per epoch")
    if resumed:
        display.message(f"resuming from step {trainer.pos.step} (epoch {trainer.pos.epoch})")
