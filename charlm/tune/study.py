"""The Optuna study a sweep shares with its other workers, and one worker's loop: take a place
among the first `trials` trials, run it, tell the study how it ended; queue again a trial whose
worker died (heartbeat.py), and stay until the trials other workers run have ended. Optuna is
imported here only, inside functions: it is the `tune` extra."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from charlm.config import Config, ConfigError
from charlm.errors import UserError
from charlm.training.signals import StopRequests
from charlm.tune.credentials import hide_password, redact_message, without_credentials
from charlm.tune.heartbeat import ALIVE_UNTIL, Heartbeat, beat_interval, is_stale
from charlm.tune.space import Space, apply_params
from charlm.tune.trial import TrialRun, run_trial, train_command

INSTALL_HINT = "charlm tune needs the tune extra: pip install 'charlm[tune]'"
PRUNERS = ("median", "hyperband", "none")
STUDY_DB = "study.db"
DRIVERS = "PostgreSQL: pip install psycopg2-binary; MySQL: pip install PyMySQL and use mysql+pymysql://"


@dataclass(frozen=True)
class Sweep:
    """What a worker runs: the base config (--set applied), the space, and where the study and runs live."""

    base: Config
    space: Space
    out: Path  # trial_NNNN run dirs, best.yaml, trials.csv (and study.db by default)
    trials: int  # finished trials (complete, pruned or failed) the study stops at, all workers together
    study_name: str
    storage: str | None = None  # an Optuna storage URL; None: SQLite in `out`
    pruner: str = "median"
    startup_trials: int = 5  # trials sampled at random and never pruned
    seed: int | None = None
    stale_after: float = 60.0  # seconds without a heartbeat before a running trial's worker counts as gone

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / STUDY_DB).absolute()}"


def import_optuna():
    """optuna, quiet, or one line saying which extra to install."""
    try:
        import optuna  # noqa: PLC0415 - optuna is the optional tune extra, loaded only when a sweep runs
    except ImportError as err:
        if (err.name or "").split(".")[0] in ("optuna", "sqlalchemy", "alembic"):
            raise UserError(INSTALL_HINT) from None
        raise
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # charlm tune says what happens itself
    return optuna


def _trial_states():
    """optuna's TrialState enum (optuna is already loaded by open_study when a worker asks)."""
    from optuna.trial import TrialState  # noqa: PLC0415 - optuna is the optional tune extra, as in import_optuna

    return TrialState


def open_study(sweep: Sweep):
    """The sweep's study (created on first use, loaded by every later worker) and its storage."""
    optuna = import_optuna()
    if sweep.pruner not in PRUNERS:
        raise UserError(f"--pruner must be one of {', '.join(PRUNERS)} (got {sweep.pruner!r})")
    try:
        sweep.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {sweep.out}: {err.strerror or err}; choose another --out") from None
    url, pruner = sweep.storage_url, _pruner(optuna, sweep)
    sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=sweep.startup_trials)
    try:
        with _creation_lock(url):
            storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_options(url))
            study = optuna.create_study(
                storage=storage,
                study_name=sweep.study_name,
                direction="minimize",
                load_if_exists=True,
                pruner=pruner,
                sampler=sampler,
            )
    except ImportError:
        raise UserError(
            f"cannot open the study storage {hide_password(url)}: its database driver is not installed ({DRIVERS})"
        ) from None
    except Exception as err:
        first = redact_message((str(err).strip().splitlines() or [type(err).__name__])[0])
        raise UserError(f"cannot open the study storage {hide_password(url)}: {first}") from None
    _check_run_dirs(sweep, study)
    return study, storage


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


def _pruner(optuna, sweep: Sweep):
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials)
    if sweep.pruner == "hyperband":
        # Resources are training steps, reported at each evaluation.
        searched = "train.max_steps" in sweep.space.keys
        budget = sweep.base.train.max_steps
        return optuna.pruners.HyperbandPruner(
            min_resource=sweep.base.train.eval_interval, max_resource="auto" if searched or budget is None else budget
        )
    return optuna.pruners.NopPruner()


def _check_run_dirs(sweep: Sweep, study) -> None:
    """Refuse an --out that holds trial dirs this study did not make (another study's sweep)."""
    found = [p for p in sweep.out.glob("trial_*") if p.is_dir()]  # before the trials: a dir follows its trial
    count = len(study.get_trials(deepcopy=False))
    foreign = [p for p in found if not (p.name[6:].isdigit() and int(p.name[6:]) < count)]
    if foreign:
        raise UserError(
            f"{sorted(foreign)[0]} is not a trial of study '{sweep.study_name}' in "
            f"{hide_password(sweep.storage_url)}; use another --out (or the --storage and "
            "--study-name of the sweep that made it)"
        )


def _engine_options(url: str) -> dict:
    # Workers on one SQLite file take turns writing; wait for the lock rather than fail at once.
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


@contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """Workers started at once on a new SQLite file create its tables one at a time."""
    path = url.removeprefix("sqlite:///").split("?")[0]
    if not url.startswith("sqlite:///") or path in ("", ":memory:"):
        yield
        return
    import fcntl  # noqa: PLC0415 - POSIX only, and needed only for a SQLite study

    database = Path(path)
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(f".{database.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
