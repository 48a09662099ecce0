"""Process runtime: devices, seeding, RNG state and precision; the only module that asks torch about hardware."""

from __future__ import annotations

from typing import Optional

import torch

from charlm.errors import UserError


def resolve_device(spec: str, local_rank: Optional[int] = None) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit device must exist.

    Under torchrun (`local_rank` given) 'auto' and 'cuda' mean this process's own GPU."""
    if local_rank is not None and spec in ("auto", "cuda") and torch.cuda.is_available():
        spec = f"cuda:{local_rank}"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available here; use --device cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device 'mps' requested but Apple MPS is not available here; use --device cpu or auto")
    if spec not in ("cpu", "mps") and not spec.startswith("cuda"):
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(spec)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds every CUDA device too; charlm draws from no other RNG


def rng_state() -> dict:
    """The RNG states a training step draws from (dropout), as tensors."""
    state = {"torch": torch.get_rng_state()}
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
        raise UserError(f"train.precision bf16 needs a GPU with bfloat16 support; {describe_device(device)} has none "
                        "(use fp16 or fp32)")
    if precision != "fp32" and device.type == "mps":
        raise UserError("train.precision bf16/fp16 is not supported on mps here; use fp32")


def autocast(device: torch.device, precision: str):
    """The autocast context for a training step (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its small range underflows gradients); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
