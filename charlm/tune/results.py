"""What a sweep leaves: a row per trial, trials.csv, and best.yaml (the best trial's full config,
ready for `charlm train --config`)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from charlm.atomic import write_text_atomic
from charlm.config import config_yaml
from charlm.tune.credentials import with_credentials

BEST_CONFIG, TRIALS_CSV = "best.yaml", "trials.csv"
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "queued"}


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str  # complete | pruned | failed | running | queued
    params: dict
    best_val: float | None  # the objective; for a pruned trial, its best evaluation before it stopped
    steps: int | None
    seconds: float | None
    run_dir: str
    message: str
    config: dict | None  # the full config it trained with, less the credentials of its URIs


def trial_rows(study) -> list[TrialRow]:
    """The study's trials, in number order. A place taken past --trials and put back (no values
    drawn yet) is no trial of this sweep and is left out."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = STATES.get(t.state.name, t.state.name.lower())
        if state == "queued" and not t.params:
            continue
        evaluations = [v for v in t.intermediate_values.values() if math.isfinite(v)]
        best = t.value if state == "complete" else min(evaluations, default=None)
        attrs = t.user_attrs
        rows.append(
            TrialRow(
                t.number,
                state,
                dict(t.params),
                best,
                attrs.get("steps"),
                attrs.get("seconds"),
                attrs.get("run_dir", ""),
                attrs.get("message", ""),
                attrs.get("config"),
            )
        )
    return rows


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    scored = [(r, r.best_val) for r in rows if r.state == "complete" and r.best_val is not None]
    return min(scored, key=lambda pair: pair[1])[0] if scored else None


def write_results(
    out: Path, study_name: str, rows: list[TrialRow], keys: list[str], base: dict | None = None
) -> Path | None:
    """trials.csv, and best.yaml when a trial completed (returned), with the credentials that the
    study does not store taken from `base`, this worker's config. Atomic: workers may write at once."""
    write_text_atomic(out / TRIALS_CSV, trials_csv(rows, keys))
    best = best_row(rows)
    if best is None or best.config is None:
        return None
    path = out / BEST_CONFIG
    config = best.config if base is None else with_credentials(best.config, base)
    write_text_atomic(path, best_yaml(best, study_name, len(rows), path, config))
    return path


def trials_csv(rows: list[TrialRow], keys: list[str]) -> str:
    keys = keys + sorted({k for r in rows for k in r.params} - set(keys))  # keys an earlier space had
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["number", "state", *keys, "best_val", "steps", "seconds", "run_dir", "message"])
    for r in rows:
        writer.writerow(
            [
                r.number,
                r.state,
                *(r.params.get(k, "") for k in keys),
                "" if r.best_val is None else f"{r.best_val:.6f}",
                _blank(r.steps),
                _blank(r.seconds),
                r.run_dir,
                r.message,
            ]
        )
    return text.getvalue()


def best_yaml(best: TrialRow, study_name: str, count: int, path: Path, config: dict) -> str:
    val = best.best_val
    assert val is not None, "the best trial is a complete one, with a val loss"
    lines = [
        f"# Best of {count} trials of study '{study_name}': trial {best.number}, val loss "
        f"{val:.4f} nats ({val / math.log(2):.4f} bpc) in {best.steps} steps.",
        *(f"#   {key}: {value}" for key, value in best.params.items()),
        f"# Train it: charlm train --config {path} (raise train.max_steps or train.max_time for a longer run)",
    ]
    return "\n".join(lines) + "\n" + config_yaml(config)


def _blank(value) -> str:
    return "" if value is None else str(value)
