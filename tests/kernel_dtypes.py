"""What dtype reaches a kernel: shared by the CPU fused-backend tests and the GPU tests."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class KernelDtypes(TorchDispatchMode):
    """Records (op name, dtype of its first argument) for every call of the named aten ops: what
    reaches the kernel, after autocast has cast the arguments."""

    def __init__(self, *names: str):
        super().__init__()
        self.names, self.seen = names, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.names:
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))
