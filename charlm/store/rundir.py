"""A run directory: its files' names, its lock, and the guard against overwriting another run
(metrics.py reads and writes its metrics.jsonl)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from charlm.atomic import replace, write_text_atomic
from charlm.config import config_yaml
from charlm.errors import UserError

LAST, BEST = "last.pt", "best.pt"  # the latest checkpoint, and the one with the lowest val loss
CONFIG, METRICS = "config.yaml", "metrics.jsonl"
# what train.loggers writes besides metrics.jsonl (charlm.training.loggers)
TENSORBOARD_DIR, MLFLOW_DB, MLFLOW_ARTIFACTS, MLFLOW_RUN = "tensorboard", "mlflow.db", "mlartifacts", "mlflow-run.json"
RUN_FILES = (LAST, BEST, CONFIG, METRICS, TENSORBOARD_DIR, MLFLOW_DB, MLFLOW_ARTIFACTS, MLFLOW_RUN)


class RunDirError(UserError):
    """A run dir that cannot be used as asked (would overwrite a run, cannot be written, ...)."""


LOCK = ".lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """`run_dir/.lock` holds the pid of the one process training into the dir.

    A second process refuses; a lock left by a process that no longer runs (kill -9, power
    loss) is taken over, with a notice."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, run_dir / LOCK
        self.notices: list[str] = []

    def __enter__(self) -> RunLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run dir {self.run_dir} exists and is not a directory; choose another --out")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as err:
            raise RunDirError(
                f"cannot write to run dir {self.run_dir}: {err.strerror or err}; choose another --out"
            ) from None
        return self

    def _acquire(self) -> None:
        for _ in range(3):  # a lock that its owner removes while we look is tried again
            if self._create():
                return
            with _one_takeover_at_a_time(self.run_dir):
                if not self.path.exists():
                    continue
                owner = self._owner()
                if owner is not None and owner != os.getpid() and pid_alive(owner):
                    raise RunDirError(
                        f"run dir {self.run_dir} is in use by another charlm train (pid {owner}); "
                        "wait for it to finish or choose another --out"
                    )
                self.notices.append(
                    f"taking over the lock of {self.run_dir} left by pid {owner}, which is no longer running"
                )
                write_text_atomic(self.path, str(os.getpid()))
                return
        raise RunDirError(
            f"run dir {self.run_dir} is being locked and released by other processes; try again or choose another --out"
        )

    def _create(self) -> bool:
        """The lock file, created with our pid already in it (a hard link fails if it exists): nobody
        can read a lock that is there but empty. False if there is one."""
        tmp = self.run_dir / f".lock.tmp-{os.getpid()}"
        tmp.write_text(str(os.getpid()))
        try:
            os.link(tmp, self.path)
            return True
        except (FileExistsError, FileNotFoundError):  # not found: the holder cleared our temp file away
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)


@contextmanager
def _one_takeover_at_a_time(run_dir: Path) -> Iterator[None]:
    """An exclusive flock on the run dir itself while a stale lock is checked and replaced: two
    starters cannot both see it stale and both take it. The kernel drops the flock when its holder
    dies, and nothing is left in the folder."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Make sure training may write into `run_dir` (already created and locked), or refuse.

    Returns notices for the user: what was moved aside or cleaned up."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; choose one")
    notices = _remove_unfinished_writes(run_dir)
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not (run_dir / LAST).is_file():
            raise RunDirError(f"nothing to resume: {run_dir / LAST} does not exist; train without --resume")
        return notices
    if existing and not overwrite:
        raise RunDirError(
            f"run dir {run_dir} already holds a run ({', '.join(existing)}); "
            "add --resume to continue it, --overwrite to replace it, or --out to use another dir"
        )
    try:
        if existing:
            notices.append(_move_aside(run_dir, existing))
        probe = run_dir / ".charlm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write to run dir {run_dir}: {err.strerror or err}; choose another --out") from None
    return notices


def _move_aside(run_dir: Path, names: list[str]) -> str:
    """--overwrite keeps the replaced run: its files move into a dated subfolder."""
    folder = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    suffix = 1
    while folder.exists():
        folder = run_dir / f"{folder.name.split('.')[0]}.{suffix}"
        suffix += 1
    folder.mkdir()
    for name in names:
        replace(run_dir / name, folder / name)
    return (
        f"--overwrite: moved the earlier run's {', '.join(names)} to {folder}/ "
        "(delete that folder when you no longer need it)"
    )


def _remove_unfinished_writes(run_dir: Path) -> list[str]:
    """Temp files of writes cut short by a crash (checkpoints, config.yaml): incomplete by construction."""
    leftovers = [p for p in run_dir.glob(".*.tmp-*") if p.is_file()]
    for path in leftovers:
        path.unlink()
    return [f"removed {len(leftovers)} unfinished checkpoint write(s) left by an interrupted run"] if leftovers else []


def write_config(run_dir: Path, config: dict) -> None:
    """The resolved config, atomically (see charlm.atomic)."""
    write_text_atomic(run_dir / CONFIG, config_yaml(config))
