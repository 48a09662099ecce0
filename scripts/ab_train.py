#!/usr/bin/env python3
"""`charlm train` of two code trees side by side: does a change to the training loop cost speed?

Each round trains the same config for --steps steps once from each tree (each a `git worktree`
of a commit, run with PYTHONPATH pointing at it), alternating which goes first (A B, B A, ...),
so that a drift of a shared machine's speed weighs on both alike. A run's figure is the median
chars/s of its `train` log lines after the first (which includes the first steps' warm-up);
the medians over rounds and every round are printed, with after/before.

    git worktree add /tmp/before a1aad92
    python scripts/ab_train.py --before /tmp/before --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def train_rate(tree: Path, config: Path, steps: int, sets: list[str], folder: Path) -> float:
    """Median chars/s of one training run of `steps` steps from `tree`'s code."""
    run_dir = folder / "run"
    overrides = [
        f"train.max_steps={steps}",
        "train.max_time=null",
        f"train.eval_interval={steps * 10}",
        f"train.log_interval={max(steps // 10, 1)}",
        *sets,
    ]
    command = [
        sys.executable,
        "-m",
        "charlm",
        "train",
        "--config",
        str(config),
        "--out",
        str(run_dir),
        "--overwrite",
        "--quiet",
        *[part for item in overrides for part in ("--set", item)],
    ]
    env = {**os.environ, "PYTHONPATH": str(tree), "CHARLM_AUTO": "fixed"}
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training from {tree} failed:\n{result.stderr}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [e["chars_per_sec"] for e in events if e["event"] == "train"][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier code tree (a git worktree)")
    parser.add_argument("--after", default=str(HERE), help="the later code tree (default: this one)")
    parser.add_argument("--config", default=str(HERE / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=["model.backend=native"],
        help="config override for both (repeatable; default model.backend=native)",
    )
    args = parser.parse_args()
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    config = Path(args.config).resolve()
    rates: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="charlm-ab-train-") as tmp:
        for round_number in range(args.rounds):
            order = ["before", "after"] if round_number % 2 == 0 else ["after", "before"]
            for name in order:
                rates[name].append(train_rate(trees[name], config, args.steps, args.sets, Path(tmp) / name))
            print(f"round {round_number + 1}: " + "  ".join(f"{n} {rates[n][-1]:,.0f}" for n in order), flush=True)
    before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"median chars/s: before {before:,.0f}  after {after:,.0f}  after/before {after / before:.3f}")


if __name__ == "__main__":
    main()
