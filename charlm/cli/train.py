"""`charlm train`: a config in, a run dir out, and a report of how it ended."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from charlm.cli import library as lib
from charlm.cli.common import console
from charlm.config import load_config, with_absolute_paths
from charlm.errors import Interrupted, UserError
from charlm.store.rundir import BEST, CONFIG, LAST

if TYPE_CHECKING:
    from charlm.training.loop import TrainOutcome

# What a signal cut short while the library loads, before the run (and its own stages) began.
LOADING = "while loading torch; nothing was written"


def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run dir (default: runs/<config file stem>).")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: --set train.lr=1e-3 (repeatable).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (overrides train.device).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the run dir from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in the run dir.")] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start a new run from a trained model's weights: a checkpoint file, or a run dir "
            "(its best.pt); fine-tuning (sets train.init_from).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Plain lines at each evaluation only: no bar, no samples.")
    ] = False,
) -> None:
    """Train a model from a YAML config."""
    if resume and init_from is not None:
        raise UserError(
            "--init-from starts a new run from a trained model and --resume continues a run; give one of them"
        )
    if config is None:
        if not (resume and out is not None):
            raise UserError("give --config FILE (or --resume --out RUN_DIR to continue a run with its own config)")
        config = out / CONFIG
    sets = list(overrides or []) + ([f"train.device={device}"] if device else [])
    sets += [f"train.init_from={json.dumps(str(init_from))}"] if init_from is not None else []  # quoted: any path
    cfg = with_absolute_paths(load_config(config, sets))
    run_dir = out if out is not None else Path("runs") / config.stem
    try:
        start_run, display = lib.train, lib.TrainingDisplay(quiet=quiet)  # imports torch: seconds on a cold start
    except Interrupted as stop:
        raise Interrupted(stop.signum, LOADING) from None
    outcome = start_run(cfg, run_dir, resume=resume, overwrite=overwrite, display=display)
    if outcome.main:
        _report_training(outcome, run_dir)
    if outcome.signal is not None:
        raise typer.Exit(128 + outcome.signal)


def _report_training(outcome: TrainOutcome, run_dir: Path) -> None:
    out = console()
    if outcome.stop_reason == "interrupted":
        assert outcome.signal is not None, "an interrupted run names the signal that stopped it"
        name = signal.Signals(outcome.signal).name
        out.print(
            f"{name}: stopped at step {outcome.step}; saved {run_dir / LAST}. "
            f"Resume with: charlm train --resume --out {run_dir}"
        )
        return
    minutes = outcome.elapsed / 60
    if outcome.stop_reason == "early_stop":
        out.print(
            f"stopped early at step {outcome.step}: the val loss has not improved for "
            f"train.patience evaluations ({minutes:.1f} min)"
        )
    else:
        out.print(f"done: {outcome.step} steps, {outcome.epoch} full epochs, {minutes:.1f} min")
    if outcome.best_val_loss is not None:
        bpc = outcome.best_val_loss / math.log(2)
        out.print(
            f"best val loss {outcome.best_val_loss:.4f} nats ({bpc:.4f} bpc) at step {outcome.best_step}: "
            f"{run_dir / BEST} is the model to use"
        )
    out.print(f'sample with: charlm sample --checkpoint {run_dir} --prompt "..."')
