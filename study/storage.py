"""Storage URLs: SQLite by default, any SQLAlchemy URL (PostgreSQL for many machines).

RDB storages get a heartbeat so that a trial whose process died is noticed and retried.
Every user-fixable problem (bad URL, unwritable path, not a database, unreachable server)
becomes one `StorageError` line; nothing here ever writes to a store it could not open.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from study.errors import StorageError

warnings.filterwarnings("ignore", category=ExperimentalWarning)

DEFAULT_STORAGE = "sqlite:///results/studies.db"
HEARTBEAT_SECONDS = int(os.environ.get("STUDY_HEARTBEAT_SECONDS", "30"))
"""Interval of the trial heartbeat; a RUNNING trial silent for 2x this long is stale.
($STUDY_HEARTBEAT_SECONDS overrides it, e.g. for crash tests.)"""
MAX_RETRIES = 3
"""How often a trial whose worker died is re-queued before it is left failed."""


def _check_sqlite_path(url: str) -> None:
    database = url.split(":///", 1)[1] if ":///" in url else ""
    database = database.split("?", 1)[0]
    if not database or database == ":memory:":
        return
    path = Path(database)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists():
        if path.is_dir():
            raise StorageError(f"storage: {path} is a directory, not a database file")
        with path.open("rb") as handle:
            head = handle.read(16)
        if head and head != b"SQLite format 3\x00":
            raise StorageError(f"storage: {path} exists but is not an SQLite database")
        if not os.access(path, os.W_OK):
            raise StorageError(f"storage: {path} is not writable")
        return
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"storage: cannot create {parent} ({error.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise StorageError(f"storage: cannot create {path}: {parent} is not writable")


def open_storage(url: str = DEFAULT_STORAGE, heartbeat: bool = True) -> RDBStorage:
    """An Optuna RDB storage for `url`, with heartbeat and retry of stale trials."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(
            f"storage: malformed URL {url!r}; expected e.g. sqlite:///results/studies.db or "
            "postgresql://user:password@host:5432/db"
        ) from None
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(url)
        # several worker processes share one file: wait for the lock instead of failing
        engine_kwargs["connect_args"] = {"timeout": 120}
    elif parsed.get_backend_name().startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": HEARTBEAT_SECONDS,
            "grace_period": 2 * HEARTBEAT_SECONDS,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRIES
            ),
        }
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ModuleNotFoundError as error:
        raise StorageError(
            f"storage: the driver for {parsed.get_backend_name()!r} is not installed "
            f"({error.name}); pip install it"
        ) from None
    except Exception as error:  # SQLAlchemy raises many types for one cause
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise StorageError(f"storage: cannot open {_redact(parsed)}: {reason}") from None


def _redact(parsed) -> str:
    return parsed.render_as_string(hide_password=True)


def study_names(storage: RDBStorage) -> list[str]:
    """Names of the studies in a storage."""
    return [
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    ]


def load_study(name: str, storage: RDBStorage) -> optuna.Study:
    """An existing study, or one clear error naming the studies that do exist."""
    names = study_names(storage)
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise StorageError(f"study {name!r} not found in the storage (studies there: {known})")
    return optuna.load_study(study_name=name, storage=storage)
