"""The library the commands call, imported on first use (`lib.generate(...)` after `from charlm.cli import
library as lib`): most of it loads torch, so `charlm --help` and a mistyped option answer without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Each name twice: imported here for the type checker only (so every lib.name is checked against what it
# calls), and listed in LAZY, from which __getattr__ imports it when a command first reads it.
# tests/cli/test_structure.py checks that the two lists agree.
# ruff: noqa: F401 - the imports below are read by the type checker only (lib.name); LAZY imports them when used
if TYPE_CHECKING:
    from charlm.data.sources import read_text, read_text_file
    from charlm.data.text import TextSettings
    from charlm.data.vocab import EOS_TOKEN
    from charlm.export.extra import require
    from charlm.export.onnx_check import ATOL, RTOL, check_onnx
    from charlm.export.onnx_format import write_onnx
    from charlm.export.safetensors_format import load_safetensors, write_safetensors
    from charlm.inference.dynamic import DynamicSettings, evaluate_text_dynamic, read_dynamically
    from charlm.inference.evaluate import encode_for_scoring, evaluate_text
    from charlm.inference.probe import context_losses, doubling, gradient_norms
    from charlm.inference.sample import Decoding, Undrawable, generate, make_generator, prompt_ids
    from charlm.models.autotune import Workload
    from charlm.models.model import count_parameters
    from charlm.models.registry import lookup
    from charlm.report.page import render_page
    from charlm.report.plots import plot_context_probe, plot_gradient_probe, plot_runs
    from charlm.report.progress import TrainingDisplay
    from charlm.report.viz import inspect
    from charlm.serving.api import Limits
    from charlm.serving.app import Server, create_app
    from charlm.serving.connection import ConnectionLimits, guarded_protocol
    from charlm.serving.hosts import AllowedHosts
    from charlm.serving.loading import served_model
    from charlm.store.checkpoint import describe_model, load_checkpoint, model_from_checkpoint, resolve_checkpoint
    from charlm.store.metrics import find_runs, summarize
    from charlm.training.doctor import auto_choices, machine_facts
    from charlm.training.run import train
    from charlm.training.runtime import autocast, resolve_device, usable_precision, use_threads
    from charlm.tune.results import best_row, trial_rows, write_results
    from charlm.tune.space import load_space
    from charlm.tune.study import Sweep, import_optuna, open_study
    from charlm.tune.worker import work

# module -> the names read from it (the same as above, line for line)
LAZY: dict[str, tuple[str, ...]] = {
    "charlm.data.sources": ("read_text", "read_text_file"),
    "charlm.data.text": ("TextSettings",),
    "charlm.data.vocab": ("EOS_TOKEN",),
    "charlm.export.extra": ("require",),
    "charlm.export.onnx_check": ("ATOL", "RTOL", "check_onnx"),
    "charlm.export.onnx_format": ("write_onnx",),
    "charlm.export.safetensors_format": ("load_safetensors", "write_safetensors"),
    "charlm.inference.dynamic": ("DynamicSettings", "evaluate_text_dynamic", "read_dynamically"),
    "charlm.inference.evaluate": ("encode_for_scoring", "evaluate_text"),
    "charlm.inference.probe": ("context_losses", "doubling", "gradient_norms"),
    "charlm.inference.sample": ("Decoding", "Undrawable", "generate", "make_generator", "prompt_ids"),
    "charlm.models.autotune": ("Workload",),
    "charlm.models.model": ("count_parameters",),
    "charlm.models.registry": ("lookup",),
    "charlm.report.page": ("render_page",),
    "charlm.report.plots": ("plot_context_probe", "plot_gradient_probe", "plot_runs"),
    "charlm.report.progress": ("TrainingDisplay",),
    "charlm.report.viz": ("inspect",),
    "charlm.serving.api": ("Limits",),
    "charlm.serving.app": ("Server", "create_app"),
    "charlm.serving.connection": ("ConnectionLimits", "guarded_protocol"),
    "charlm.serving.hosts": ("AllowedHosts",),
    "charlm.serving.loading": ("served_model",),
    "charlm.store.checkpoint": ("describe_model", "load_checkpoint", "model_from_checkpoint", "resolve_checkpoint"),
    "charlm.store.metrics": ("find_runs", "summarize"),
    "charlm.training.doctor": ("auto_choices", "machine_facts"),
    "charlm.training.run": ("train",),
    "charlm.training.runtime": ("autocast", "resolve_device", "usable_precision", "use_threads"),
    "charlm.tune.results": ("best_row", "trial_rows", "write_results"),
    "charlm.tune.space": ("load_space",),
    "charlm.tune.study": ("Sweep", "import_optuna", "open_study"),
    "charlm.tune.worker": ("work",),
}
_MODULE_OF = {name: module for module, names in LAZY.items() for name in names}


def __getattr__(name: str) -> object:
    """`lib.name`: the library's own object, looked up at each use (not kept here), so that what a
    test patches in the library is what the command calls, as with an import inside the command."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (add it to LAZY)")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
