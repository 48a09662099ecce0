"""`charlm tune`: a hyperparameter sweep with Optuna, each trial a `charlm train` of its own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from charlm.cli import library as lib
from charlm.cli.common import console
from charlm.config import load_config, with_absolute_paths
from charlm.errors import Interrupted, UserError

if TYPE_CHECKING:
    from charlm.tune.results import TrialRow


def tune(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config: everything the space does not search.")],
    space: Annotated[
        Path,
        typer.Option("--space", help="YAML search space: config keys -> a list of choices or {low, high, log, step}."),
    ],
    trials: Annotated[
        int,
        typer.Option("--trials", "-n", min=1, help="Finished trials the study stops at, all workers on it together."),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key for every trial: --set train.max_time=1m (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder of the trial run dirs and results (default: runs/<config stem>-tune)."
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Optuna storage URL shared by workers, e.g. postgresql://user@host/db "
            "(default: sqlite:///<out>/study.db).",
        ),
    ] = None,
    study_name: Annotated[
        str | None, typer.Option("--study-name", help="Study name (default: the config file stem).")
    ] = None,
    pruner: Annotated[str, typer.Option("--pruner", help="median, hyperband or none.")] = "median",
    startup_trials: Annotated[
        int,
        typer.Option(
            "--startup-trials",
            min=0,
            help="Trials sampled at random, before the sampler and the median pruner learn from the results.",
        ),
    ] = 5,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Sampler seed (give each worker its own).")] = None,
    stale_after: Annotated[
        float,
        typer.Option(
            "--stale-after",
            min=2.0,
            help="Seconds without a heartbeat after which a running trial's worker counts as "
            "gone (killed, its machine lost) and another worker resumes the trial; this "
            "worker sends one every quarter of it.",
        ),
    ] = 60.0,
) -> None:
    """Search hyperparameters: train trials with values drawn from a space file, stop hopeless ones
    early, and write the best trial's config. Run it on several processes or machines with one
    --storage to share the work."""
    sets = overrides or []
    lib.import_optuna()  # without the extra: one line saying which to install
    base = with_absolute_paths(load_config(config, sets))
    searched = lib.load_space(space, base, fixed=tuple(a.partition("=")[0].strip() for a in sets))
    sweep = lib.Sweep(
        base,
        searched,
        out if out is not None else Path("runs") / f"{config.stem}-tune",
        trials,
        study_name or config.stem,
        storage,
        pruner,
        startup_trials,
        seed,
        stale_after,
    )
    study, store = lib.open_study(sweep)
    shown = console()
    shown.print(
        f"study '{sweep.study_name}': {trials} trials of {', '.join(searched.keys)}; run dirs in {sweep.out}/",
        markup=False,
    )
    signum = lib.work(study, store, sweep, lambda line: shown.print(line, markup=False))

    rows = lib.trial_rows(study)
    best_path = lib.write_results(sweep.out, sweep.study_name, rows, searched.keys, base.to_dict())
    _print_table(rows, searched.keys, sweep.study_name)
    best = lib.best_row(rows)
    if best is not None and best.best_val is not None and best_path is not None:
        shown.print(
            f"best: trial {best.number}, val loss {best.best_val:.4f} nats "
            f"({best.best_val / math.log(2):.4f} bpc); its config: {best_path}",
            markup=False,
        )
        shown.print(f"train it: charlm train --config {best_path}", markup=False)
    shown.print(f"all trials: {sweep.out / 'trials.csv'}", markup=False)
    if signum is not None:
        raise Interrupted(
            signum,
            "during the sweep; the study is saved and a stopped trial resumes from its "
            "checkpoint when you run the same command again",
        )
    if best is None and not any(r.state in ("running", "queued") for r in rows):
        raise UserError(f"none of the {len(rows)} trials completed; their messages are in {sweep.out / 'trials.csv'}")


def _print_table(rows: list[TrialRow], keys: list[str], study_name: str) -> None:
    table = Table(title=f"trials of study '{study_name}'")
    for column in ("trial", "state", *keys, "best val (nats)", "steps", "time"):
        table.add_column(
            column, justify="left" if column == "state" else "right", min_width=len(column) if column in keys else None
        )
    for r in rows:
        values = [_value(r.params[k]) if k in r.params else "-" for k in keys]
        cells = [
            str(r.number),
            r.state,
            *values,
            "-" if r.best_val is None else f"{r.best_val:.4f}",
            "-" if r.steps is None else f"{r.steps:,}",
            "-" if r.seconds is None else f"{r.seconds:.0f} s",
        ]
        table.add_row(*(Text(cell) for cell in cells))  # Text: a value is never read as markup
    shown = console()
    shown.print(table)
    for r in rows:
        if r.message:
            shown.print(f"trial {r.number} {r.state}: {r.message}", markup=False)


def _value(value: object) -> str:
    if value is None:
        return "null"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
