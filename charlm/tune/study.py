"""The Optuna study a sweep's workers share: what a worker runs (Sweep), and the study, created on
first use and loaded by every later worker, with its sampler, pruner and storage. Optuna is loaded
only inside functions (import_optuna): it is the `tune` extra."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from charlm.config import Config
from charlm.errors import UserError
from charlm.tune.credentials import hide_password, redact_message
from charlm.tune.space import Space

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
