"""`charlm train`: a config in, a run dir out, and a report of how it ended."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import List, Optional

import typer

from charlm.cli.common import app, console
from charlm.config import load_config, with_absolute_paths
from charlm.errors import UserError
from charlm.store.rundir import BEST, CONFIG, LAST


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run dir (default: runs/<config file stem>)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a config key: --set train.lr=1e-3 (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (overrides train.device)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run dir from its last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in the run dir."),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Start a new run from a trained model's weights: a checkpoint file, or a run dir "
                                  "(its best.pt); fine-tuning (sets train.init_from)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain lines at each evaluation only: no bar, no samples."),
) -> None:
    """Train a model from a YAML config."""
    from charlm.report.progress import TrainingDisplay  # noqa: PLC0415
    from charlm.training.run import train as run_training  # noqa: PLC0415

    if resume and init_from is not None:
        raise UserError("--init-from starts a new run from a trained model and --resume continues a run; "
                        "give one of them")
    if config is None:
        if not (resume and out is not None):
            raise UserError("give --config FILE (or --resume --out RUN_DIR to continue a run with its own config)")
        config = out / CONFIG
    sets = list(overrides) + ([f"train.device={device}"] if device else [])
    sets += [f"train.init_from={json.dumps(str(init_from))}"] if init_from is not None else []  # quoted: any path
    cfg = with_absolute_paths(load_config(config, sets))
    run_dir = out if out is not None else Path("runs") / config.stem
    outcome = run_training(cfg, run_dir, resume=resume, overwrite=overwrite,
                           display=TrainingDisplay(quiet=quiet))
    if outcome.main:
        _report_training(outcome, run_dir)
    if outcome.signal is not None:
        raise typer.Exit(128 + outcome.signal)


def _report_training(outcome, run_dir: Path) -> None:
    out = console()
    if outcome.stop_reason == "interrupted":
        name = signal.Signals(outcome.signal).name
        out.print(f"{name}: stopped at step {outcome.step}; saved {run_dir / LAST}. "
                      f"Resume with: charlm train --resume --out {run_dir}")
        return
    minutes = outcome.elapsed / 60
    if outcome.stop_reason == "early_stop":
        out.print(f"stopped early at step {outcome.step}: the val loss has not improved for "
                      f"train.patience evaluations ({minutes:.1f} min)")
    else:
        out.print(f"done: {outcome.step} steps, {outcome.epoch} full epochs, {minutes:.1f} min")
    if outcome.best_val_loss is not None:
        bpc = outcome.best_val_loss / math.log(2)
        out.print(f"best val loss {outcome.best_val_loss:.4f} nats ({bpc:.4f} bpc) at step {outcome.best_step}: "
                      f"{run_dir / BEST} is the model to use")
    out.print(f"sample with: charlm sample --checkpoint {run_dir} --prompt \"...\"")

