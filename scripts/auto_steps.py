"""Steps made in the same time with `model.backend: auto` and with each explicit backend.

    python scripts/auto_steps.py                       # configs/shakespeare_lstm.yaml, 45 s each, 2 rounds
    python scripts/auto_steps.py --seconds 600 --rounds 1 --eval   # the 10-minute runs, then charlm eval

Each run is the real `charlm train` in a fresh process (`--set train.max_time=...`), one after the
other, the order rotated each round. auto's own measurement (under 3 s, on a fresh cache, as a
first run on a machine would do) happens before the clock of train.max_time starts, and is
reported. The C++ loops are built once, before any run, and each run's fresh cache gets a copy,
so that no run spends its budget compiling them. Prints the steps of each run, auto's pick and auto's steps over the faster explicit
backend's; `--json` adds one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BACKENDS = ("auto", "native", "fused")


def train(config: Path, data: Path, backend: str, seconds: float, out: Path, cache: Path) -> dict:
    """One `charlm train` run; its steps, best val loss and auto's line."""
    env = {**os.environ, "CHARLM_AUTO": "measure", "CHARLM_CACHE_DIR": str(cache)}
    command = [
        sys.executable,
        "-m",
        "charlm",
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
        "--quiet",
        "--set",
        f"data.path={data}",
        "--set",
        f"train.max_time={seconds:g}s",
        "--set",
        f"model.backend={backend}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{backend} run failed:\n{done.stderr[-2000:]}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    end = next(e for e in reversed(events) if e["event"] == "end")
    start = next(e for e in events if e["event"] == "start")
    line = next((out_line for out_line in done.stdout.splitlines() if out_line.startswith("backend auto -> ")), "")
    return {
        "steps": end["step"],
        "best_val_loss": end.get("best_val_loss"),
        "ran_on": start["backend"],
        "auto_line": line,
    }


def build_loops(cache: Path) -> list[Path]:
    """Build (or load) the C++ step loops into `cache`; the files to copy into each run's cache."""
    subprocess.run(
        [sys.executable, "-c", "from charlm.models.native import cpp_loops; cpp_loops()"],
        check=True,
        env={**os.environ, "CHARLM_CACHE_DIR": str(cache)},
        cwd=ROOT,
    )
    return sorted(cache.glob("recurrent-*"))


def evaluate(run: Path, text: Path) -> float:
    """charlm eval of the run's best.pt on the last 10% of the text (its validation part)."""
    data = text.read_text(encoding="utf-8")
    held = run / "held_out.txt"
    held.write_text(data[int(len(data) * 0.9) :], encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "charlm",
            "eval",
            "--checkpoint",
            str(run),
            "--text",
            str(held),
            "--json",
            "--backend",
            "native",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(done.stdout)["loss_nats"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shakespeare_lstm.yaml")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval", action="store_true", help="charlm eval each run's best.pt on the held-out 10%%")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        help="run these backends only (the ratio needs auto and both others)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"no corpus at {args.data}: pass --data")
    folder = Path(tempfile.mkdtemp(prefix="charlm-auto-steps-"))
    built = build_loops(folder / "build")
    chosen = tuple(b for b in BACKENDS if b in args.only)
    runs: dict[str, list[dict]] = {b: [] for b in chosen}
    for r in range(args.rounds):
        order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
        for backend in order:
            cache = folder / f"cache-{r}-{backend}"  # auto measures afresh each round, as a first run would
            cache.mkdir()
            for path in built:
                shutil.copy2(path, cache / path.name)
            out = folder / f"{backend}-{r}"
            result = train(args.config, args.data, backend, args.seconds, out, cache)
            if args.eval:
                result["eval_loss"] = evaluate(out, args.data)
            runs[backend].append(result)
            shown = f", eval {result['eval_loss']:.4f}" if "eval_loss" in result else ""
            print(
                f"round {r + 1} {backend:6}: {result['steps']:>5} steps on {result['ran_on']}, best val "
                f"{result['best_val_loss']:.4f}{shown}  {result['auto_line']}",
                flush=True,
            )
    steps = {b: statistics.mean(run["steps"] for run in runs[b]) for b in chosen}
    if len(chosen) < 3:
        print("mean steps: " + ", ".join(f"{b} {steps[b]:.0f}" for b in chosen))
        if args.json:
            print(json.dumps({"seconds": args.seconds, "runs": runs, "mean_steps": steps}))
        return
    faster = max(steps["native"], steps["fused"])
    ratio = steps["auto"] / faster
    print(
        f"mean steps in {args.seconds:g} s: auto {steps['auto']:.0f}, native {steps['native']:.0f}, "
        f"fused {steps['fused']:.0f}; auto / faster explicit = {ratio:.2f}"
    )
    if args.json:
        print(json.dumps({"seconds": args.seconds, "runs": runs, "mean_steps": steps, "auto_vs_faster": ratio}))


if __name__ == "__main__":
    main()
