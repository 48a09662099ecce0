"""Where and how this process trains, resolved once at the start of a run (device, process group,
threads, precision) into one frozen RunContext that everything below takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from charlm import hardware
from charlm.config import Config
from charlm.models.autotune import mode as autotune_mode
from charlm.training import distributed
from charlm.training.distributed import World
from charlm.training.loggers import check_loggers
from charlm.training.runtime import (
    allow_tf32,
    check_precision,
    process_device_note,
    resolve_device,
    usable_precision,
    use_threads,
)


@dataclass(frozen=True)
class RunContext:
    """One run as this process trains it."""

    cfg: Config  # with the precision this device runs at speed: config.yaml records what ran
    run_dir: Path
    resume: bool
    overwrite: bool
    world: World  # this process's place under torchrun (one process of one otherwise)
    device: torch.device
    notices: tuple[str, ...] = ()  # what the run says once its run dir is locked (device, precision)

    def with_config(self, cfg: Config) -> RunContext:
        return RunContext(cfg, self.run_dir, self.resume, self.overwrite, self.world, self.device, self.notices)


def resolve_context(cfg: Config, run_dir: Path, resume: bool, overwrite: bool) -> RunContext:
    """Check what can be checked before anything is written, then settle the device, threads and
    precision and join the process group (under torchrun)."""
    check_loggers(cfg.train)  # a missing library of the track extra: say so before anything is written
    hardware.isa_cap(), autotune_mode()  # and a CHARLM_MAX_ISA / CHARLM_AUTO it does not know
    world = distributed.world_from_env()
    device = resolve_device(cfg.train.device, world.local_rank if world.enabled else None)
    use_threads(cfg.train.threads, world)
    check_precision(device, cfg.train.precision)
    precision, precision_note = usable_precision(device, cfg.train.precision)
    if precision_note is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})
    allow_tf32(device, cfg.train.precision)
    distributed.start(world, device)
    device_note = process_device_note(cfg.train.device, device) if world.enabled else None
    note = "; ".join(n for n in (device_note, precision_note) if n)
    return RunContext(cfg, run_dir, resume, overwrite, world, device, (note,) if note else ())
