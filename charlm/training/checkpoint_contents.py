"""What a training checkpoint holds (weights and their average, optimiser, loss scaler, progress,
carried state, each rank's RNG): the payload made from a trainer's parts and state, and put back
into them. charlm.store.checkpoint is the file format and the resume check; this is what goes inside."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from charlm.config import Config
from charlm.data.corpus import Corpus
from charlm.models.cells import State
from charlm.models.model import CharLM, count_parameters
from charlm.store.checkpoint import save_checkpoint
from charlm.store.rundir import BEST, LAST
from charlm.training import distributed
from charlm.training.distributed import World
from charlm.training.optim import WeightAverage
from charlm.training.runtime import describe_device, rng_state, set_rng_state


@dataclass
class Progress:
    """Everything about where a run is that a checkpoint must carry, besides tensors."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    elapsed: float = 0.0  # training seconds of earlier sessions of this run (at the last restore)
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    lr_scale: float = 1.0  # cut by train.rollback_lr_factor at each rollback
    rollbacks: int = 0
    skipped_steps: int = 0

    def advance(self, windows_per_epoch: int) -> None:
        """On to the next window (and epoch): a step is counted whether it updated or was skipped."""
        self.step += 1
        self.window += 1
        if self.window == windows_per_epoch:
            self.epoch, self.window = self.epoch + 1, 0

    def record_evaluation(self, loss: float, best: bool) -> None:
        if best:
            self.best_val_loss, self.best_step, self.evals_since_best = loss, self.step, 0
        else:
            self.evals_since_best += 1


@dataclass(frozen=True)
class TrainingParts:
    """The objects of a trainer whose state a checkpoint saves and loads back in place, with what the
    payload records beside them (the config, the corpus's vocabulary and fingerprint, the device)."""

    cfg: Config
    corpus: Corpus
    model: CharLM
    ema: WeightAverage | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    world: World
    device: torch.device


@dataclass(frozen=True)
class TrainingState:
    """Where a run is: its progress (elapsed: all its training seconds so far), this rank's carried
    state [L, B/W, H] and the loss of its last validation, if any."""

    pos: Progress
    carried: State
    val_loss: float | None


def payload_of(parts: TrainingParts, state: TrainingState, carried: State) -> dict:
    """The checkpoint of a run, with `carried` the carried state of all ranks [L, B, H]."""
    model, ema, pos = parts.model, parts.ema, state.pos
    # "model" is what sample and eval load; with an average, the optimiser's own weights
    # go to "raw_model" so that a resume continues from them.
    weights = (
        {"model": ema.state_dict(model), "raw_model": model.state_dict(), "ema_updates": ema.updates}
        if ema
        else {"model": model.state_dict()}
    )
    return {
        "config": parts.cfg.to_dict(),
        "vocab": parts.corpus.vocab.to_dict(),
        **weights,
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "progress": asdict(pos),
        "step": pos.step,
        "epoch": pos.epoch,
        "elapsed": pos.elapsed,
        "best_val_loss": pos.best_val_loss,
        "best_step": pos.best_step,
        "train_state": [s.detach().cpu() for s in carried],
        "rng": rng_state(),
        "val_loss": state.val_loss,
        "device": describe_device(parts.device),
        "data_fingerprint": parts.corpus.fingerprint,
        "num_parameters": count_parameters(model),
        "world_size": parts.world.size,
        "backend": model.backend,  # the one it ran on: config.model.backend may say auto
    }


def save(parts: TrainingParts, state: TrainingState, run_dir: Path, best: bool = False) -> None:
    """last.pt (and best.pt). Every rank calls this together: the global state is gathered; rank 0 writes."""
    world = parts.world
    carried = distributed.gather_rows(state.carried, world)
    rngs = distributed.gather_objects(rng_state(), world)  # each rank draws its own dropout masks
    if world.main:
        payload = {**payload_of(parts, state, carried), "rng_ranks": rngs}
        save_checkpoint(payload, run_dir / LAST)
        if best:
            save_checkpoint(payload, run_dir / BEST)
    distributed.barrier(world)  # nobody reads last.pt (a rollback) before it is written


def load(parts: TrainingParts, payload: dict) -> TrainingState:
    """Put back what `payload` holds into `parts` (weights, average, optimiser, loss scale, this rank's
    RNG) and return where the run was (this rank's streams of the carried state)."""
    model, ema = parts.model, parts.ema
    model.load_state_dict(payload.get("raw_model", payload["model"]))
    if ema is not None:  # an average switched on at this resume starts from the weights
        averaged = "raw_model" in payload
        ema.load(payload["model"] if averaged else model.state_dict(), payload.get("ema_updates", 0) if averaged else 0)
    parts.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        parts.scaler.load_state_dict(payload["scaler"])
    _restore_rng(payload, parts.world, parts.cfg.train.seed)
    return TrainingState(
        Progress(**payload["progress"]), carried_state(payload["train_state"], parts), payload.get("val_loss")
    )


def carried_state(saved: list, parts: TrainingParts) -> State:
    """This rank's streams of the saved state [L, B, H], on the device and in the dtype of the model's
    own fresh state: a bf16/fp16 run may have saved it in half precision, and a float32 kernel
    refuses a state of another dtype. Contiguous, as cuDNN wants it."""
    fresh = parts.model.init_state(1)
    rows = parts.world.rows(parts.cfg.train.batch_size)
    return tuple(s[:, rows].to(device=parts.device, dtype=f.dtype).contiguous() for s, f in zip(saved, fresh))


def _restore_rng(payload: dict, world: World, seed: int) -> None:
    """Each rank continues its own dropout stream. Resumed with another number of processes,
    the streams cannot continue (the batch is split differently): ranks above 0 start new
    ones from the seed, their rank and the step, so such a resume is not bit-exact."""
    ranks = payload.get("rng_ranks")
    if ranks is not None and len(ranks) == world.size:
        set_rng_state(ranks[world.rank])
        return
    set_rng_state(payload["rng"])
    if world.rank:
        torch.manual_seed(seed + 7919 * world.rank + payload["step"])
