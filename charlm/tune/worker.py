"""One worker's loop over the sweep's study (study.py): take a place among the first `trials` trials,
run it, tell the study how it ended; queue again a trial whose worker died (heartbeat.py), and stay
until the trials other workers run have ended."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import replace

from charlm.config import ConfigError
from charlm.training.signals import StopRequests
from charlm.tune.credentials import redact_message, without_credentials
from charlm.tune.heartbeat import ALIVE_UNTIL, Heartbeat, beat_interval, is_stale
from charlm.tune.space import apply_params
from charlm.tune.study import Sweep
from charlm.tune.trial import TrialRun, run_trial, train_command


def _trial_states():
    """optuna's TrialState enum (optuna is already loaded by open_study when a worker asks)."""
    from optuna.trial import TrialState  # noqa: PLC0415 - optuna is the optional tune extra, as in import_optuna

    return TrialState


class SweepStops(StopRequests):
    """SIGINT and SIGTERM as for training, and SIGHUP too: a worker whose terminal goes away stops
    its trainer (which has a session of its own and gets no hangup) and queues its trial."""

    def __enter__(self):
        super().__enter__()
        self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._handle)
        return self


def work(study, storage, sweep: Sweep, say: Callable[[str], None]) -> int | None:
    """Run trials until the study has `sweep.trials` finished ones (or a signal stops this worker:
    the trial it runs stops at a checkpoint and goes back in the queue). While other workers run
    the last trials, wait: a trial whose worker dies is queued again and run here. Returns the
    signal, if any."""
    with SweepStops() as stop:
        waiting_said = False
        while stop.signal is None:
            _requeue_stale(study, storage, sweep, say)
            if _room_left(study, sweep.trials):
                trial = study.ask()  # a queued (interrupted) trial first, else a new one
                if trial.number >= sweep.trials or stop.signal is not None:
                    _requeue(study, storage, trial)  # another worker took the last place meanwhile
                    continue
                _run(study, storage, trial, sweep, stop, say)
                continue
            running = _running(study, sweep.trials)
            if not running:
                break
            if not waiting_said:
                say(
                    f"waiting for {_trial_list(running)}, run by other workers (a trial whose worker is gone "
                    f"is queued again after {sweep.stale_after:g} s without its heartbeat, and run here)"
                )
                waiting_said = True
            _sleep(beat_interval(sweep.stale_after), stop)
        return stop.signal


def _run(study, storage, trial, sweep: Sweep, stop: StopRequests, say: Callable[[str], None]) -> None:
    trial_id = _trial_id(study, storage, trial)
    beat = Heartbeat(storage, trial_id, sweep.stale_after)
    beat()  # at once: until then the trial's last heartbeat is its previous worker's, long past
    try:
        params = {p.key: p.suggest(trial) for p in sweep.space.params}
        say(f"trial {trial.number}: {format_params(params)}")
        try:
            cfg = apply_params(sweep.base, params, "these values together")
        except ConfigError as err:  # values that are each fine but not together
            result = TrialRun("failed", None, 0, 0.0, "; ".join(str(err).splitlines()))
        else:
            run_dir = sweep.out / f"trial_{trial.number:04d}"
            trial.set_user_attr("run_dir", str(run_dir.absolute()))
            trial.set_user_attr("config", without_credentials(cfg.to_dict()))  # the trainer gets them in trial.yaml
            seen = set(storage.get_trial(trial_id).intermediate_values)
            result = run_trial(train_command(run_dir, cfg), run_dir, _reporter(trial, seen), lambda: stop.signal, beat)
    except BaseException as err:
        _tell(
            study,
            storage,
            trial,
            TrialRun("failed", None, 0, 0.0, redact_message(f"charlm tune stopped with an error: {err!r}")),
        )
        raise
    if result.message:  # a trainer's error line may quote a URI with its credentials
        result = replace(result, message=redact_message(result.message))
    _tell(study, storage, trial, result)
    say(_ending(trial.number, result))


def _reporter(trial, seen: set[int]) -> Callable[[int, float], bool]:
    """Reports each evaluation once (a resumed run's log repeats the earlier ones) and asks the pruner."""

    def report(step: int, val_loss: float) -> bool:
        if step in seen:
            return False
        seen.add(step)
        trial.report(val_loss, step)
        return trial.should_prune()

    return report


def _tell(study, storage, trial, result: TrialRun) -> None:
    TrialState = _trial_states()
    trial.set_user_attr("steps", result.steps)
    trial.set_user_attr("seconds", round(result.seconds, 1))
    if result.message:
        trial.set_user_attr("message", result.message)
    if result.outcome == "interrupted":
        _requeue(study, storage, trial)
    elif result.outcome == "complete":
        study.tell(trial, result.best_val)
    else:
        study.tell(trial, state=TrialState.PRUNED if result.outcome == "pruned" else TrialState.FAIL)


def _requeue(study, storage, trial) -> None:
    """Back to WAITING: the next worker to ask takes it, with its values (and its run dir's last.pt)."""
    TrialState = _trial_states()
    trial_id = _trial_id(study, storage, trial)
    storage.set_trial_user_attr(trial_id, ALIVE_UNTIL, None)  # its next worker vouches anew
    storage.set_trial_state_values(trial_id, TrialState.WAITING)


def _requeue_stale(study, storage, sweep: Sweep, say: Callable[[str], None]) -> None:
    """Back to WAITING: each running trial whose worker stopped sending heartbeats (killed, lost)."""
    TrialState = _trial_states()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, sweep.stale_after, time.time()):
            continue
        # Read again just before writing: another worker may have queued it and a third taken it since.
        fresh = storage.get_trial(_trial_id(study, storage, trial))
        if fresh.state != TrialState.RUNNING or not is_stale(fresh, sweep.stale_after, time.time()):
            continue
        _requeue(study, storage, fresh)
        say(f"trial {trial.number}: its worker is gone (no heartbeat); queued again, it resumes from its checkpoint")


def _running(study, trials: int) -> list[int]:
    """The numbers of the first `trials` trials that other workers run now."""
    TrialState = _trial_states()
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number < trials]


def _sleep(seconds: float, stop: StopRequests) -> None:
    deadline = time.monotonic() + seconds
    while stop.signal is None and time.monotonic() < deadline:
        time.sleep(min(0.1, seconds))


def _trial_list(numbers: list[int]) -> str:
    return ("trial " if len(numbers) == 1 else "trials ") + ", ".join(str(n) for n in numbers)


def _trial_id(study, storage, trial) -> int:
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), trial.number
    )


def _room_left(study, trials: int) -> bool:
    """Whether one of the first `trials` places is free: not yet taken, or queued again after a stop."""
    TrialState = _trial_states()
    taken = study.get_trials(deepcopy=False)
    return len(taken) < trials or any(t.state == TrialState.WAITING and t.number < trials for t in taken)


def _ending(number: int, result: TrialRun) -> str:
    best = "" if result.best_val is None else f", best val loss {result.best_val:.4f}"
    if result.outcome == "complete":
        return f"trial {number}: complete at step {result.steps}{best} ({result.seconds:.0f} s)"
    if result.outcome == "pruned":
        return f"trial {number}: pruned at step {result.steps}{best}"
    if result.outcome == "interrupted":
        return (
            f"trial {number}: stopped at step {result.steps} and queued again; it resumes from its "
            "checkpoint when charlm tune runs on this study again"
        )
    return f"trial {number}: failed: {result.message}"


def format_params(params: dict) -> str:
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items()
    )
