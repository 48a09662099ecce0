"""Timing callables against each other in interleaved blocks and rounds, robust to a noisy
neighbour: the figures behind `model.backend: auto` (autotune.measure)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

BLOCK_S = 0.2  # one backend's turn; a call longer than this is a block of one call
MAX_SAMPLES = 50  # timed calls per block at most (a tiny model's calls take microseconds)
MAX_ROUNDS = 16
DECISIVE = 0.15  # after two rounds, a lead this large ends the timing (single calls vary by ~10% here)


def time_in_blocks(
    runs: dict[str, Callable[[], object]], budget: float, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Each backend's typical call, in seconds: the median of its blocks' medians.

    Each backend runs in blocks of ~BLOCK_S, as it would in a run of its own (interleaved call by
    call, the native loops lost ~10% here to the other backend's turns and the slower backend was
    picked), in rounds A B, B A, A B, ... so a drift of the machine's speed weighs on all alike.
    A burst of noise from a neighbour spoils a block, not the answer: the median of the blocks
    skips it. One round always runs; the timing stops when another round would not fit in `budget`
    or, after two rounds, as soon as one backend leads clearly (_clear_lead). Near ties thus get the
    most rounds, where they are needed; clear cases end in under two seconds. Warm-up blocks come first, untimed,
    A B B A: a process's first second of work ran up to 2x slower here than the rest (for either
    backend, whichever ran first), besides oneDNN's primitives and packed weights."""
    started = clock()
    names = list(runs)
    blocks: dict[str, list[float]] = {b: [] for b in names}
    longest_call = 0.0
    for name in names + names[::-1]:
        _run_for(runs[name], BLOCK_S, clock)
    for round_no in range(MAX_ROUNDS):
        if round_no >= 2 and _clear_lead(blocks):
            break
        if round_no >= 1 and clock() - started + len(names) * max(BLOCK_S, longest_call) > budget:
            break
        for name in names if round_no % 2 == 0 else reversed(names):
            calls = _run_for(runs[name], BLOCK_S, clock)
            longest_call = max(longest_call, max(calls))
            blocks[name].append(statistics.median(calls))
    return {b: statistics.median(blocks[b]) for b in names}


def _run_for(run: Callable[[], object], seconds: float, clock: Callable[[], float]) -> list[float]:
    """Calls `run` until `seconds` would be exceeded (at least once, at most MAX_SAMPLES times);
    the seconds of each call."""
    calls: list[float] = []
    block = clock()
    while len(calls) < MAX_SAMPLES:
        begin = clock()
        run()
        calls.append(clock() - begin)
        if clock() - block + calls[-1] > seconds:
            break
    return calls


def _clear_lead(blocks: dict[str, list[float]]) -> bool:
    """Whether one backend's slowest block beat every other backend's fastest by more than DECISIVE:
    a lead that one noisy block cannot have made."""
    leader = min(blocks, key=lambda b: statistics.median(blocks[b]))
    return all(max(blocks[leader]) * (1 + DECISIVE) < min(blocks[b]) for b in blocks if b != leader)
