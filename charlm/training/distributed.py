"""Data-parallel training across processes (torchrun): who this process is, and the collectives.

With WORLD_SIZE > 1 (set by torchrun) the process group starts with nccl on CUDA and gloo
on the CPU. The global batch is `train.batch_size` streams: rank r trains on its own
contiguous slice of them, and DistributedDataParallel averages the gradients, so K steps on
W processes equal K steps of one process on the same global batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from charlm.errors import UserError

_joined = False  # this process joined a process group (then it leaves through leave_process())


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's streams out of the global batch."""
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def world_from_env() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: torch.device) -> None:
    """Join the process group (no-op for a single process)."""
    if not world.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    global _joined
    _joined = True


def stop(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def joined() -> bool:
    return _joined


def leave_process(code: int) -> None:
    """End this process now, skipping the interpreter's teardown.

    DistributedDataParallel's reducer keeps the gloo group alive past destroy_process_group,
    so its threads still run when the interpreter shuts down, and tearing them down then
    aborts the process now and then (SIGABRT, "terminate called without an active
    exception") after the run has finished and saved: torchrun then reports a failed run.
    Every file is closed by now; only the output streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_batch(world: World, batch_size: int, accumulation: int) -> None:
    parts = world.size * accumulation
    if batch_size % parts:
        raise UserError(
            f"train.batch_size ({batch_size}) must divide evenly into {world.size} process(es) x "
            f"{accumulation} accumulation step(s); use a multiple of {parts}"
        )


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if it is True on any: ranks decide together, so none hangs in a collective."""
    if not world.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def any_rank_flag(flag: torch.Tensor, world: World) -> bool:
    """`flag`, a one-element bool tensor on this rank's device, is True on any rank. Reduced on the
    device and read once: the host waits for the device once, not for a local read and again for
    the agreement."""
    if world.enabled:
        flag = flag.to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def max_over_ranks(value: int, world: World, device: torch.device) -> int:
    """The largest of the ranks' values (a signal number one of them received), on every rank."""
    if not world.enabled:
        return value
    tensor = torch.tensor([float(value)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def sum_over_ranks(values: list[float], world: World, device: torch.device) -> list[float]:
    if not world.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(state: tuple, world: World) -> tuple:
    """Each rank's carried state [L, B/W, H] -> the global state [L, B, H] (same on all ranks)."""
    if not world.enabled:
        return state
    gathered = []
    for part in state:
        pieces = [torch.empty_like(part) for _ in range(world.size)]
        dist.all_gather(pieces, part.contiguous())
        gathered.append(torch.cat(pieces, dim=1))
    return tuple(gathered)


@contextmanager
def peers_may_stop(world: World) -> Iterator[None]:
    """A collective that fails because another process of the run went away (a signal, an error
    of its own, kill -9) ends this one with one line too, not a traceback."""
    try:
        yield
    except RuntimeError as err:
        if not (world.enabled and _lost_peer(err)):
            raise
        raise UserError(
            "another process of this torchrun run stopped (its own output says why); this one stops too"
        ) from None


def _lost_peer(err: RuntimeError) -> bool:
    text = str(err)  # gloo raises a plain RuntimeError: "Connection closed by peer [addr]:port"
    return isinstance(err, dist.DistError) or any(
        words in text for words in ("closed by peer", "reset by peer", "Broken pipe", "NCCL communicator was aborted")
    )


def gather_objects(value, world: World) -> list:
    """Every rank's `value` (plain data and CPU tensors), in rank order, on every rank."""
    if not world.enabled:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()
