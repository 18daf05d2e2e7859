"""Where a study lives, and how an interrupted trial is found and retried.

- default: SQLite, outputs/sweeps/<study>/study.db (one machine, a few local workers);
- `storage=postgresql://user@host:port/db` (any SQLAlchemy URL): workers on many machines;
- `storage=journal:/shared/disk/<study>.log`: optuna's JournalFileBackend on a shared disk.

A trial whose worker died stays RUNNING in the storage. It is recognised as dead when its
worker ran on this host and that process is gone (pid + start time), or when its heartbeat
is older than the grace period: optuna's own heartbeat for RDB storages, a heartbeat file per
trial for journal storages (optuna's JournalStorage has none). Dead trials are marked FAIL
and re-enqueued with the same parameters by optuna's RetryHeartbeatStaleTrialCallback, at most
max_retries times per original trial.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from experiments.config import ConfigError

HEARTBEAT_INTERVAL = 30  # seconds between heartbeats of a running trial
GRACE_PERIOD = 120  # a RUNNING trial whose last heartbeat is older than this is taken as dead


@dataclass
class StorageInfo:
    url: str  # what the user gave (or the default SQLite URL)
    kind: str  # sqlite | rdb | journal
    heartbeat_dir: Path | None  # journal only: <journal>.heartbeats/


def resolve(storage: str | None, study_dir: Path) -> StorageInfo:
    if not storage:
        return StorageInfo(f"sqlite:///{study_dir / 'study.db'}", "sqlite", None)
    if storage.startswith("journal:"):
        path = Path(storage.removeprefix("journal:")).expanduser()
        if not path.name or path.is_dir():
            raise ConfigError(f"storage={storage}: give the journal file, e.g. journal:/shared/sweeps/study.log")
        return StorageInfo(storage, "journal", path.with_name(path.name + ".heartbeats"))
    if storage.startswith("sqlite:///"):
        return StorageInfo(storage, "sqlite", None)
    if "://" in storage:
        return StorageInfo(storage, "rdb", None)
    raise ConfigError(f"storage={storage!r}: use postgresql://user@host:port/db (any SQLAlchemy URL), sqlite:///file.db or journal:/path/file.log")


def open_storage(info: StorageInfo, max_retries: int):
    """The optuna storage object; RDB storages get optuna's heartbeat and the retry callback for stale trials."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if info.kind == "journal":
        path = Path(info.url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        info.heartbeat_dir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if info.kind == "sqlite":
        Path(info.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if info.kind == "sqlite" else {"pool_pre_ping": True}
    try:
        warnings.filterwarnings("ignore", message=".*(heartbeat|RetryHeartbeat).*")  # optuna: experimental
        return RDBStorage(
            info.url,
            engine_kwargs=engine,
            heartbeat_interval=HEARTBEAT_INTERVAL,
            grace_period=GRACE_PERIOD,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retries),
        )
    except (ImportError, ModuleNotFoundError) as err:
        raise ConfigError(f"storage={info.url}: a driver is missing ({err}); for PostgreSQL: pip install psycopg[binary]") from None
    except optuna.exceptions.StorageInternalError as err:
        raise ConfigError(f"storage={info.url}: cannot connect ({err.__cause__ or err})") from None


class FileHeartbeat:
    """Journal storages: touch <heartbeats>/<trial number> every HEARTBEAT_INTERVAL seconds while a trial runs."""

    def __init__(self, directory: Path, number: int):
        self.path = directory / str(number)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.path.touch()
            if self._stop.wait(HEARTBEAT_INTERVAL):
                return

    def __enter__(self) -> FileHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def file_heartbeat_is_stale(directory: Path | None, trial) -> bool:
    if directory is None:
        return False
    beat = directory / str(trial.number)
    last = beat.stat().st_mtime if beat.exists() else (trial.datetime_start.timestamp() if trial.datetime_start else time.time())
    return time.time() - last > GRACE_PERIOD


def recover_interrupted(study, info: StorageInfo, max_retries: int) -> list[int]:
    """Mark RUNNING trials of dead workers FAIL, and re-enqueue every interrupted trial not yet retried.

    Returns the numbers of the trials it marked failed. Optuna's RDB heartbeat handles dead
    workers on other machines by itself when the next trial starts (fail_stale_trials).
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from sweeps.trial import worker_is_dead

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_is_dead(t.user_attrs.get("worker")) or file_heartbeat_is_stale(info.heartbeat_dir, t):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                failed.append(t.number)
    with warnings.catch_warnings():  # optuna marks the callback experimental
        warnings.simplefilter("ignore")
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    trials = study.get_trials(deepcopy=False)
    done = retried_numbers(trials)
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in done:
            retry(study, study._storage.get_trial(t._trial_id))
    return failed


def retried_numbers(trials) -> set[int]:
    """Trials that a later (enqueued) trial retries: they no longer count toward n_trials."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}
