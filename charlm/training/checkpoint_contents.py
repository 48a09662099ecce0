"""What a training checkpoint holds (weights and their average, optimiser, loss scaler, progress,
carried state, each rank's RNG), writing it from a trainer and loading a trainer back from it.
checkpoint.py is the file format and the resume check; this module is what goes inside."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import torch

from charlm.models.model import count_parameters
from charlm.training import distributed
from charlm.store.checkpoint import save_checkpoint
from charlm.training.distributed import World
from charlm.store.rundir import BEST, LAST
from charlm.training.runtime import describe_device, rng_state, set_rng_state

if TYPE_CHECKING:
    from charlm.training.trainer import Trainer


@dataclass
class Progress:
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


def payload_of(trainer: Trainer, state: tuple) -> dict:
    """The checkpoint of `trainer`, with `state` the carried state of all ranks [L, B, H]."""
    model, ema, pos = trainer.model, trainer.ema, trainer.pos
    # "model" is what sample and eval load; with an average, the optimiser's own weights
    # go to "raw_model" so that a resume continues from them.
    weights = {"model": ema.state_dict(model), "raw_model": model.state_dict(),
               "ema_updates": ema.updates} if ema else {"model": model.state_dict()}
    return {
        "config": trainer.cfg.to_dict(), "vocab": trainer.corpus.vocab.to_dict(),
        **weights, "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "progress": {**asdict(pos), "elapsed": trainer.elapsed()},
        "step": pos.step, "epoch": pos.epoch, "elapsed": trainer.elapsed(),
        "best_val_loss": pos.best_val_loss, "best_step": pos.best_step,
        "train_state": [s.detach().cpu() for s in state], "rng": rng_state(),
        "val_loss": trainer.last_val.loss_nats if trainer.last_val else None,
        "device": describe_device(trainer.device), "data_fingerprint": trainer.corpus.fingerprint,
        "num_parameters": count_parameters(model), "world_size": trainer.world.size,
        "backend": model.backend,  # the one it ran on: config.model.backend may say auto
    }


def save(trainer: Trainer, best: bool = False) -> None:
    """Every rank calls this together: the global state is gathered; rank 0 writes."""
    world = trainer.world
    state = distributed.gather_rows(trainer.state, world)
    rngs = distributed.gather_objects(rng_state(), world)  # each rank draws its own dropout masks
    if world.main:
        payload = {**payload_of(trainer, state), "rng_ranks": rngs}
        save_checkpoint(payload, trainer.run_dir / LAST)
        if best:
            save_checkpoint(payload, trainer.run_dir / BEST)
    distributed.barrier(world)  # nobody reads last.pt (a rollback) before it is written


def load_into(trainer: Trainer, payload: dict) -> None:
    """Put back everything `payload` holds: weights, average, optimiser, loss scale, this rank's
    streams of the carried state, its RNG and the progress."""
    model, ema = trainer.model, trainer.ema
    model.load_state_dict(payload.get("raw_model", payload["model"]))
    if ema is not None:  # an average switched on at this resume starts from the weights
        averaged = "raw_model" in payload
        ema.load(payload["model"] if averaged else model.state_dict(),
                 payload.get("ema_updates", 0) if averaged else 0)
    trainer.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        trainer.scaler.load_state_dict(payload["scaler"])
    trainer.state = carried_state(payload["train_state"], trainer)
    _restore_rng(payload, trainer.world, trainer.cfg.train.seed)
    trainer.pos = Progress(**payload["progress"])


def carried_state(saved: list, trainer: Trainer) -> tuple:
    """This rank's streams of the saved state [L, B, H], on the device and in the dtype of the model's
    own fresh state: a bf16/fp16 run may have saved it in half precision, and a float32 kernel
    refuses a state of another dtype. Contiguous, as cuDNN wants it."""
    fresh = trainer.model.init_state(1)
    return tuple(s[:, trainer.rows].to(device=trainer.device, dtype=f.dtype).contiguous()
                 for s, f in zip(saved, fresh))


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
