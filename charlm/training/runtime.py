"""Process runtime: devices, seeding, RNG state and precision; the only module that asks torch about hardware."""

from __future__ import annotations

import warnings

import torch

from charlm import hardware
from charlm.errors import UserError


def use_threads(threads: int | None, world=None) -> int:
    """Set the threads torch's CPU kernels (and the native loops) use: `threads`, or by default the
    machine's physical cores; returns the count. Under torchrun the default is left to it (it gives
    each process OMP_NUM_THREADS, 1 unless set, so processes on one node do not oversubscribe it)."""
    if threads is None:
        if world is not None and world.enabled:
            return torch.get_num_threads()
        threads = hardware.physical_cores()
    torch.set_num_threads(threads)
    return threads


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit device must exist.

    Under torchrun (`local_rank` given) 'auto', 'cuda' and 'cuda:N' mean this process's own GPU."""
    if local_rank is not None:
        spec = process_device(spec, local_rank)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available here; use --device cpu or auto")
        index, count = int(spec.split(":")[1]) if ":" in spec else 0, torch.cuda.device_count()
        if index >= count and local_rank is not None:
            raise UserError(
                f"this torchrun process (LOCAL_RANK {local_rank}) has no GPU of its own: this machine "
                f"has {count}; start at most {count} processes per node (--nproc_per_node)"
            )
        if index >= count:
            raise UserError(f"device {spec!r} requested but only {count} CUDA device(s) exist")
    if spec == "mps" and not mps_available():
        raise UserError("device 'mps' requested but Apple MPS is not available here; use --device cpu or auto")
    if spec not in ("cpu", "mps") and not spec.startswith("cuda"):
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(spec)


def mps_available() -> bool:
    """Apple's GPU through torch's MPS backend (macOS on Apple Silicon)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def process_device(spec: str, local_rank: int) -> str:
    """The device a torchrun process takes for `spec`: GPU LOCAL_RANK for auto, cuda and cuda:N (one
    GPU per process; a fixed N would put every process of the node on the same GPU)."""
    if spec.startswith("cuda") or spec == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
    return spec


def process_device_note(spec: str, device: torch.device) -> str | None:
    """One line when torchrun replaced the user's explicit cuda:N by this process's own GPU."""
    if spec.startswith("cuda:") and device.type == "cuda" and spec != str(device):
        return (
            f"train.device {spec} is not used under torchrun: each process takes its own GPU, "
            f"cuda:LOCAL_RANK (this one {device})"
        )
    return None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def batch_to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device` without waiting for it: from ordinary (pageable) memory a CUDA copy may
    first wait for all queued GPU work, so on CUDA it goes through pinned memory."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds every CUDA device too; charlm draws from no other RNG


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The RNG states a training step draws from (dropout), as tensors: the CPU's, and one per CUDA device."""
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_precision(device: torch.device, precision: str) -> None:
    """bf16/fp16 only where this device can run them; a clear error otherwise."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"train.precision bf16 needs a GPU with bfloat16 support; {describe_device(device)} has none "
            "(use fp16 or fp32)"
        )


def allow_tf32(device: torch.device, precision: str) -> bool:
    """With bf16 on CUDA, let float32 matmuls and cuDNN use TF32 tensor cores; True if set.

    There the fused recurrence runs in float32, outside autocast (charlm.models.fused): TF32 keeps
    10 mantissa bits, more than bf16's 7, so it costs a bf16 run no precision it asked to keep.
    fp32 and fp16 runs keep torch's defaults (cuDNN may use TF32, float32 matmuls may not)."""
    if device.type != "cuda" or precision != "bf16":
        return False
    with warnings.catch_warnings():  # torch versions that prefer the fp32_precision switches say so
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True  # sets conv and rnn alike, so no mix of the two APIs
    return True


def autocast(device: torch.device, precision: str):
    """The autocast context for a training step (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its small range underflows gradients); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as oneDNN checks before
    it picks its bf16 kernels. Without them bf16 is emulated, several times slower than fp32."""
    if not hardware.bf16_units_allowed():  # CHARLM_MAX_ISA below avx512_bf16: act as such a CPU would
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def usable_precision(device: torch.device, precision: str) -> tuple[str, str | None]:
    """The precision to run with here, and a one-line notice when it is not the one asked for:
    bf16 on a CPU without bf16 units runs in fp32 instead of several times slower."""
    if precision != "fp32" and device.type == "mps":
        return "fp32", (
            f"{precision} is not supported on Apple MPS here (autocast there is unmeasured and the "
            "recurrent loops would run it in fp32 anyway): running in fp32 instead"
        )
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_units():
        return "fp32", (
            "this CPU has no bf16 units (AVX512-BF16 or AMX), where bf16 would run several times "
            "slower than fp32: running in fp32 instead"
        )
    return precision, None
