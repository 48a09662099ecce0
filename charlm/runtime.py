"""Device resolution, seeding and RNG state: the only module that asks torch about hardware."""

from __future__ import annotations

import torch

from charlm.errors import UserError


def resolve_device(spec: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit device must exist."""
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
