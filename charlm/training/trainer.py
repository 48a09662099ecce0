"""The training step: one update per train_step (learning rate, micro-batches, clip, step, carried state, then
log / evaluate / checkpoint; the run around the steps is loop.py's). Handed its model, it does not know which cell
it trains; under torchrun it trains this rank's slice of the streams (see distributed.py)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import replace
from enum import Enum
from pathlib import Path

import torch

from charlm.config import Config
from charlm.data.batches import TBPTTBatches
from charlm.data.corpus import Corpus
from charlm.inference.evaluate import EvalResult
from charlm.models.cells import State
from charlm.models.model import CharLM
from charlm.store.checkpoint import load_checkpoint
from charlm.store.events import Display, Event, RunMetrics, Value
from charlm.store.metrics import NoMetrics
from charlm.store.rundir import LAST
from charlm.training import checkpoint_contents, distributed, recovery
from charlm.training.checkpoint_contents import Progress, TrainingParts, TrainingState
from charlm.training.distributed import World
from charlm.training.metrics import IntervalStats, gradient_norms
from charlm.training.objective import activation_penalties, cross_entropy
from charlm.training.optim import Budget, WeightAverage, build_optimizer, learning_rate
from charlm.training.recovery import AfterBadStep
from charlm.training.runtime import autocast, batch_to_device, grad_scaler
from charlm.training.validation import is_new_best, preview, validate
from charlm.training.wrapping import WrappedModel


class StepEnd(Enum):  # how a train_step ended
    UPDATED = "updated"
    SKIPPED = "skipped"  # a non-finite loss or gradient: no update (maybe a rollback)
    OUT_OF_PATIENCE = "out of patience"  # train.patience evaluations without a new best: stop early


class Trainer:
    """Trains the model it is handed on `corpus` as `cfg.train` says; checkpoints go to `run_dir`."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        corpus: Corpus,
        model: CharLM,
        device: torch.device,
        display: Display,
        world: World = World(),
    ):
        self.cfg, self.run_dir, self.corpus, self.device, self.display, self.world = (
            cfg,
            run_dir,
            corpus,
            device,
            display,
            world,
        )
        train = cfg.train
        distributed.check_batch(world, train.batch_size, train.gradient_accumulation_steps)
        self.model = model.to(device)  # on CUDA, fused: also into cuDNN's flat buffer, before these take the weights
        self.optimizer = build_optimizer(self.model, train)
        self.ema = WeightAverage(self.model, train.ema_decay) if train.ema_decay else None
        if world.rank:
            torch.manual_seed(train.seed + 7919 * world.rank)  # same weights on every rank, its own dropout
        self.net = WrappedModel(self.model, world, device, train.compile, display.message)
        self.scaler = grad_scaler(device, train.precision)
        self.parts = TrainingParts(cfg, corpus, self.model, self.ema, self.optimizer, self.scaler, world, device)
        self.batches = TBPTTBatches(corpus.train_ids, train.batch_size, train.seq_len, train.random_offsets, train.seed)
        self.rows = world.rows(train.batch_size)  # this rank's streams
        self.local_batch = train.batch_size // world.size
        self.budget = Budget(train)
        self.pos = Progress()
        self.state = self.model.init_state(self.local_batch)  # carried from window to window
        self.last_val: EvalResult | None = None
        self.last_eval_step, self.bad_streak = -1, 0
        self._t0 = time.perf_counter()
        self.saved_at = (0, 0.0)  # (step, elapsed) of the last checkpoint
        self.metrics: RunMetrics = NoMetrics()  # the run's record, handed to begin()
        self.interval = IntervalStats(device)

    def begin(self, metrics: RunMetrics) -> None:
        """Before the first step of the run (loop.run): events go to `metrics` from here on; the model trains."""
        self.metrics = metrics
        self.net.train()
        self.interval.start()

    # --- one step -----------------------------------------------------------------------

    def train_step(self) -> StepEnd:
        """One update, in nanoGPT's order, and what its step calls for: a log line, an evaluation or a checkpoint."""
        cfg, pos = self.cfg.train, self.pos
        # The learning rate: the schedule at this step, cut by each rollback so far.
        lr = learning_rate(cfg, pos.step, self.budget.fraction(pos.step, self.elapsed())) * pos.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Forward and backward over the next TBPTT window, from the carried state (an epoch starts from zeros).
        carried = self.state if pos.window else self.model.init_state(self.local_batch)
        x, y = self.batches.window(pos.window, self.rows, pos.epoch)  # [B/W, T] each
        self.optimizer.zero_grad(set_to_none=True)
        loss, carried = self.forward_backward(batch_to_device(x, self.device), batch_to_device(y, self.device), carried)
        # Unscale (fp16) and clip; the norm reported is the one before clipping.
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf")).detach()
        # The step's one wait for the device (README, Scaling out: what syncs remain): whether to
        # step, carry the state or skip and maybe roll back must be known before the next step.
        finite = not distributed.any_rank_flag(~(torch.isfinite(loss) & torch.isfinite(grad_norm)), self.world)
        pos.advance(self.batches.windows_per_epoch)  # a skipped step counts too
        if not finite:
            return self.skip_update(float(loss), float(grad_norm))
        # The update, the weight average, and the state carried into the next window (its graph cut).
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        self.state, self.bad_streak = carried, 0
        # Log, evaluate and checkpoint at their intervals.
        self.interval.add(loss, grad_norm, x.numel() * self.world.size)
        if pos.step % cfg.log_interval == 0:
            figures = self.interval.flush()  # the interval's figures; a new figure is one more entry below
            self.emit(
                "train",
                {
                    "epoch": pos.epoch,
                    "loss": figures.loss,
                    "lr": lr,
                    "grad_norm": figures.grad_norm,
                    "chars_per_sec": figures.chars_per_sec,
                    "elapsed": self.elapsed(),
                    **gradient_norms(self.model),
                },
            )
        if pos.step % cfg.eval_interval == 0:
            with self.interval.paused():  # evaluation time is not training throughput
                self.evaluate()
            if recovery.out_of_patience(cfg.patience, pos.evals_since_best):
                return StepEnd.OUT_OF_PATIENCE
        elif self.checkpoint_due():
            self.save()
        self.display.update(self.budget.fraction(pos.step, self.elapsed()), pos.step, cfg.max_steps)
        return StepEnd.UPDATED

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, carried: State) -> tuple[torch.Tensor, State]:
        """Loss (detached) and gradients of the window x, y [B/W, T] from `carried`, and the state after, in k
        micro-batches (train.gradient_accumulation_steps, each loss / k) with one set of weight-dropout masks."""
        k = self.cfg.train.gradient_accumulation_steps
        micro = self.local_batch // k
        loss, finals = torch.zeros((), device=self.device), list[State]()
        with self.model.shared_weight_masks(self.update_generator("weight_dropout")):
            for j in range(k):
                rows = slice(j * micro, (j + 1) * micro)
                part, final = self.micro_batch(x[rows], y[rows], tuple(s[:, rows] for s in carried), j == k - 1)
                loss, finals = loss + part, [*finals, final]
        return loss, tuple(torch.cat(parts, dim=1) for parts in zip(*finals))  # [L, B/W, H]

    def micro_batch(self, x: torch.Tensor, y: torch.Tensor, carried: State, last: bool) -> tuple[torch.Tensor, State]:
        """Forward and backward of one micro-batch [b, T]; its loss over k (detached) and its state after."""
        train = self.cfg.train
        with self.net.gradient_sync(last), autocast(self.device, train.precision):
            logits, state, trace = self.net(x, carried, trace="top" if train.ar or train.tar else None)  # [b, T, V]
            loss = self.loss(logits, y)
        # The reported loss is the cross-entropy alone; the penalties only shape the gradient.
        objective = loss + activation_penalties(trace, train.ar, train.tar) if trace is not None else loss
        self.scaler.scale(objective / train.gradient_accumulation_steps).backward()
        del logits  # [b, T, V] can be large (6,000 symbols): not kept into the next micro-batch
        return (loss / train.gradient_accumulation_steps).detach().float(), self.model.detach_state(state)

    def update_generator(self, purpose: str) -> torch.Generator:
        """A generator seeded by train.seed, the step and `purpose` alone: every rank and every
        micro-batch of an update draws the same numbers from it, and so does a resumed run."""
        digest = hashlib.sha256(f"{self.cfg.train.seed}:{self.pos.step}:{purpose}".encode()).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    loss = staticmethod(cross_entropy)  # what the loop computes the loss with (tests put a non-finite one here)

    def skip_update(self, loss: float, grad_norm: float) -> StepEnd:
        """No update; the carried state, possibly poisoned, restarts from zero. With fp16 the loss
        scaler still ends its step: update() sees the inf that unscale_() found and shrinks the scale,
        as it must for the next steps to come out finite. Then recovery decides what else to do."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.state = self.model.init_state(self.local_batch)
        self.bad_streak += 1
        self.pos.skipped_steps += 1
        self.emit("skip", {"loss": loss, "grad_norm": grad_norm, "streak": self.bad_streak})
        self.display.message(recovery.skipped(self.pos.step, loss, grad_norm, self.bad_streak))
        decision = recovery.after_bad_step(self.bad_streak, self.pos.rollbacks, self.cfg.train)
        if decision is AfterBadStep.GIVE_UP:
            raise recovery.diverged(self.cfg.train, self.pos, self.run_dir)
        if decision is AfterBadStep.ROLL_BACK:
            self.roll_back()
        return StepEnd.SKIPPED

    def roll_back(self) -> None:
        """Back to last.pt with the learning rate cut. The fp16 loss scale stays as the skipped steps
        shrank it (the saved one overflowed)."""
        before, elapsed, scale = self.pos, self.elapsed(), self.scaler.state_dict()
        self.restore(load_checkpoint(self.run_dir / LAST))
        self.pos = recovery.rolled_back(self.pos, before, elapsed, self.cfg.train)
        if scale:
            self.scaler.load_state_dict(scale)
        self.emit("rollback", {"lr_scale": self.pos.lr_scale, "rollbacks": self.pos.rollbacks})
        self.display.message(recovery.rolled_back_message(self.pos, self.cfg.train))

    def evaluate(self) -> None:
        """Validate, log and show the result (with a preview sample where the display or a tracker shows
        one), then checkpoint: best.pt too on a new best."""
        started, pos = time.perf_counter(), self.pos
        with self.evaluated_weights():
            result = validate(self.model, self.corpus.val_ids, self.cfg.train.eval_batch_size, self.world, self.device)
        best = is_new_best(result, pos.best_val_loss)
        pos.record_evaluation(result.loss_nats, best)
        self.last_val, self.last_eval_step = result, pos.step
        seconds = time.perf_counter() - started
        self.emit(
            "eval",
            {
                "epoch": pos.epoch,
                "val_loss": result.loss_nats,
                "val_bpc": result.bpc,
                "best_val_loss": pos.best_val_loss,
                "elapsed": self.elapsed(),
                "eval_seconds": seconds,
                "new_best": best,
            },
        )
        if self.world.main and (self.display.wants_samples or self.metrics.wants_samples):
            with self.evaluated_weights():  # one sample for both: the same text on screen and in the logs
                text = preview(self.model, self.cfg, self.corpus.vocab, pos.step, self.device)
            self.emit("sample", {"text": text})
        self.save(best)

    def evaluated_weights(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """A context in which the model holds the weights that are validated, saved as "model"
        and sampled from: the average with train.ema_decay, else the weights themselves."""
        return self.ema.applied(self.model) if self.ema else contextlib.nullcontext(self.model)

    def save(self, best: bool = False) -> None:
        """last.pt (and best.pt), on every rank together; then the events held for it reach the trackers."""
        state = TrainingState(
            replace(self.pos, elapsed=self.elapsed()), self.state, self.last_val.loss_nats if self.last_val else None
        )
        checkpoint_contents.save(self.parts, state, self.run_dir, best)
        self.saved_at = (self.pos.step, self.elapsed())
        self.metrics.checkpoint_written()

    def restore(self, payload: dict) -> None:
        """Continue exactly where the checkpoint left off (this rank's streams of its state)."""
        state = checkpoint_contents.load(self.parts, payload)
        self.pos, self.state = state.pos, state.carried
        self._t0 = time.perf_counter()
        self.last_eval_step, self.bad_streak = self.pos.step, 0
        self.saved_at = (self.pos.step, self.pos.elapsed)

    def checkpoint_due(self) -> bool:
        cfg, (step, when) = self.cfg.train, self.saved_at
        if cfg.checkpoint_steps is not None and self.pos.step - step >= cfg.checkpoint_steps:
            return True
        return cfg.checkpoint_seconds is not None and distributed.any_rank(
            self.elapsed() - when >= cfg.checkpoint_seconds, self.world, self.device
        )

    def elapsed(self) -> float:
        return self.pos.elapsed + (time.perf_counter() - self._t0)

    def emit(self, name: str, values: dict[str, Value]) -> None:
        """An event at the current step, to the run's record and to the display."""
        event = Event(name, self.pos.step, values)
        self.metrics.log(event)
        self.display.log(event)
