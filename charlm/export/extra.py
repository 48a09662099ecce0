"""The optional libraries of the `export` extra, imported on first use; missing, they are one line."""

from __future__ import annotations

import importlib
from types import ModuleType

from charlm.errors import UserError

INSTALL = "pip install 'charlm[export]'"


def require(module: str, command: str = "charlm export") -> ModuleType:
    """Import `module` (safetensors.torch, onnx, onnxruntime, onnxscript), or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = err.name or module.split(".")[0]  # the library itself, or one it needs
        raise UserError(f"{command} needs the export extra ({missing} is not installed): {INSTALL}") from None
