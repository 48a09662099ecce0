"""A worker's heartbeat on the trial it runs, and which running trials have lost their worker.

Optuna has a heartbeat of its own (RDBStorage's heartbeat_interval and grace_period, with a
stale-trial callback such as RetryFailedTrialCallback), but it does not fit a sweep: it is made for
Study.optimize (with ask and tell, which a sweep uses, Optuna warns on every ask that it will not
work), and it ends a stale trial as FAIL and retries it under a new number: the sweep would count
a failure for a worker that died, and the retry would start over in a new run dir. Here a stale
trial goes back to WAITING with its number, its values and its run dir's checkpoint, as a trial
stopped with Ctrl-C does, so the sweep still ends with --trials finished trials.

The heartbeat is a user attribute: the wall-clock time until which the worker vouches for the
trial (now + its own --stale-after), written every quarter of that. Each worker's grace is its
own, so workers started with different --stale-after judge each other right; their clocks must
agree to well within it (NTP does).
"""

from __future__ import annotations

import time

ALIVE_UNTIL = "alive_until"  # the trial's user attribute


def beat_interval(stale_after: float) -> float:
    return max(0.5, stale_after / 4)


class Heartbeat:
    """Called at each look at the trainer; writes the trial's heartbeat when one is due."""

    def __init__(self, storage, trial_id: int, stale_after: float):
        self.storage, self.trial_id, self.stale_after = storage, trial_id, stale_after
        self.interval = beat_interval(stale_after)
        self.last: float | None = None  # monotonic time of the last beat; None: none yet

    def __call__(self) -> None:
        now = time.monotonic()
        if self.last is None or now - self.last >= self.interval:
            self.storage.set_trial_user_attr(self.trial_id, ALIVE_UNTIL, time.time() + self.stale_after)
            self.last = now


def is_stale(trial, stale_after: float, now: float) -> bool:
    """Whether a running trial's worker stopped vouching for it. A trial with no heartbeat (just
    taken, or run by a charlm before heartbeats) gets `stale_after` from its start."""
    until = trial.user_attrs.get(ALIVE_UNTIL)
    if until is None:
        if trial.datetime_start is None:
            return False
        until = trial.datetime_start.timestamp() + stale_after
    return now > until
