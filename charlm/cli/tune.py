"""`charlm tune`: a hyperparameter sweep with Optuna, each trial a `charlm train` of its own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer

from charlm.cli.common import app, console
from charlm.config import load_config, with_absolute_paths
from charlm.errors import Interrupted, UserError


@app.command()
def tune(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config: everything the space does not search."),
    space: Path = typer.Option(..., "--space", help="YAML search space: config keys -> a list of choices or "
                                                      "{low, high, log, step}."),
    trials: int = typer.Option(..., "--trials", "-n", min=1,
                               help="Finished trials the study stops at, all workers on it together."),
    overrides: List[str] = typer.Option([], "--set", help="Override a config key for every trial: "
                                                          "--set train.max_time=1m (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder of the trial run dirs and results "
                                                                 "(default: runs/<config stem>-tune)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL shared by workers, e.g. "
                                          "postgresql://user@host/db (default: sqlite:///<out>/study.db)."),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="Study name (default: the config file stem)."),
    pruner: str = typer.Option("median", "--pruner", help="median, hyperband or none."),
    startup_trials: int = typer.Option(5, "--startup-trials", min=0,
                                       help="Trials sampled at random, before the sampler and the median pruner "
                                            "learn from the results."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Sampler seed (give each worker its own)."),
    stale_after: float = typer.Option(60.0, "--stale-after", min=2.0,
                                      help="Seconds without a heartbeat after which a running trial's worker counts "
                                           "as gone (killed, its machine lost) and another worker resumes the "
                                           "trial; this worker sends one every quarter of it."),
) -> None:
    """Search hyperparameters: train trials with values drawn from a space file, stop hopeless ones
    early, and write the best trial's config. Run it on several processes or machines with one
    --storage to share the work."""
    from charlm.tune.results import best_row, trial_rows, write_results  # noqa: PLC0415
    from charlm.tune.space import load_space  # noqa: PLC0415
    from charlm.tune.study import Sweep, import_optuna, open_study, work  # noqa: PLC0415

    import_optuna()  # without the extra: one line saying which to install
    base = with_absolute_paths(load_config(config, overrides))
    searched = load_space(space, base, fixed=tuple(a.partition("=")[0].strip() for a in overrides))
    sweep = Sweep(base, searched, out if out is not None else Path("runs") / f"{config.stem}-tune", trials,
                  study_name or config.stem, storage, pruner, startup_trials, seed, stale_after)
    study, store = open_study(sweep)
    shown = console()
    shown.print(f"study '{sweep.study_name}': {trials} trials of {', '.join(searched.keys)}; "
                f"run dirs in {sweep.out}/", markup=False)
    signum = work(study, store, sweep, lambda line: shown.print(line, markup=False))

    rows = trial_rows(study)
    best_path = write_results(sweep.out, sweep.study_name, rows, searched.keys, base.to_dict())
    _print_table(rows, searched.keys, sweep.study_name)
    best = best_row(rows)
    if best is not None and best_path is not None:
        shown.print(f"best: trial {best.number}, val loss {best.best_val:.4f} nats "
                    f"({best.best_val / math.log(2):.4f} bpc); its config: {best_path}", markup=False)
        shown.print(f"train it: charlm train --config {best_path}", markup=False)
    shown.print(f"all trials: {sweep.out / 'trials.csv'}", markup=False)
    if signum is not None:
        raise Interrupted(signum, "during the sweep; the study is saved and a stopped trial resumes from its "
                                  "checkpoint when you run the same command again")
    if best is None and not any(r.state in ("running", "queued") for r in rows):
        raise UserError(f"none of the {len(rows)} trials completed; their messages are in "
                        f"{sweep.out / 'trials.csv'}")


def _print_table(rows, keys: list[str], study_name: str) -> None:
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    table = Table(title=f"trials of study '{study_name}'")
    for column in ("trial", "state", *keys, "best val (nats)", "steps", "time"):
        table.add_column(column, justify="left" if column == "state" else "right",
                         min_width=len(column) if column in keys else None)
    for r in rows:
        values = [_value(r.params[k]) if k in r.params else "-" for k in keys]
        cells = [str(r.number), r.state, *values, "-" if r.best_val is None else f"{r.best_val:.4f}",
                 "-" if r.steps is None else f"{r.steps:,}", "-" if r.seconds is None else f"{r.seconds:.0f} s"]
        table.add_row(*(Text(cell) for cell in cells))  # Text: a value is never read as markup
    shown = console()
    shown.print(table)
    for r in rows:
        if r.message:
            shown.print(f"trial {r.number} {r.state}: {r.message}", markup=False)


def _value(value) -> str:
    if value is None:
        return "null"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
