"""Storage URLs: SQLite by default, any SQLAlchemy URL (PostgreSQL for many machines).

RDB storages get a heartbeat so that a trial whose process died is noticed and retried.
Every user-fixable problem (bad URL, unwritable path, not a database, unreachable server)
becomes one `StorageError` line; nothing here ever writes to a store it could not open.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from study.config import DEFAULT_STORAGE, RUNS_DIR
from study.errors import StorageError

warnings.filterwarnings("ignore", category=ExperimentalWarning)

HEARTBEAT_SECONDS = int(os.environ.get("STUDY_HEARTBEAT_SECONDS", "30"))
"""Interval of the trial heartbeat; a RUNNING trial silent for 2x this long is stale.
($STUDY_HEARTBEAT_SECONDS overrides it, e.g. for crash tests.)"""
MAX_RETRIES = 3
"""How often a trial whose worker died is re-queued before it is left failed."""
SQLITE_HEADER = b"SQLite format 3\x00"


def default_out(name: str) -> Path:
    """The default directory of a study's report, export and certification files."""
    return RUNS_DIR / name


def artifact_store(url: str):
    """Optuna's artifact store that belongs to store `url`: a directory beside an SQLite file
    (`studies.db.artifacts/`); for a server, $STUDY_ARTIFACTS or results/runs/artifacts (a
    directory every machine can reach, for many machines)."""
    from optuna.artifacts import FileSystemArtifactStore

    path = sqlite_path(url)
    if path is not None:
        base = Path(f"{path}.artifacts")
    else:
        base = Path(os.environ.get("STUDY_ARTIFACTS", RUNS_DIR / "artifacts"))
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(base))


def redact(url: str) -> str:
    """`url` with its password replaced by ***: the only form a URL is ever shown in."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # not a URL we can parse: hide whatever sits between : and @
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL (None for other backends)."""
    if not url.startswith("sqlite:"):
        return None
    database = url.split(":///", 1)[1] if ":///" in url else ""
    return Path(database.split("?", 1)[0]) if database else Path("")


def _check_sqlite_path(path: Path, create: bool) -> None:
    if str(path) in ("", ".", ":memory:") or str(path).startswith("file::memory:"):
        raise StorageError(
            "storage: an in-memory SQLite database keeps nothing after the command ends; "
            "give a file, e.g. sqlite:///results/runs/studies.db"
        )
    if path.exists():
        if path.is_dir():
            raise StorageError(f"storage: {path} is a directory, not a database file")
        with path.open("rb") as handle:
            head = handle.read(16)
        if head and head != SQLITE_HEADER:
            raise StorageError(f"storage: {path} exists but is not an SQLite database")
        if create and not os.access(path, os.W_OK):
            raise StorageError(f"storage: {path} is not writable")
        return
    if not create:
        raise StorageError(f"storage: no store at {path} (run a study first, or check --storage)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise StorageError(
            f"storage: cannot create {path}: {parent} {what} (create the directory first)"
        )
    if not os.access(parent, os.W_OK):
        raise StorageError(f"storage: cannot create {path}: {parent} is not writable")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if needed) shared by every process of this machine."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_storage(
    url: str = DEFAULT_STORAGE, heartbeat: bool = True, create: bool = False
) -> RDBStorage:
    """An Optuna RDB storage for `url`, with heartbeat and retry of stale trials.

    Read-only commands open an existing store only; `create` (study run) may make a new SQLite
    file, never its directory. Two processes creating the same new store at once are serialised
    by a lock file beside it.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(
            f"storage: malformed URL {redact(url)!r}; expected e.g. {DEFAULT_STORAGE} or "
            "postgresql://user:password@host:5432/db"
        ) from None
    engine_kwargs: dict = {}
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite_path(path, create)
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
    creating = path is not None and not path.exists()
    lock = file_lock(Path(f"{path}.lock")) if creating else contextlib.nullcontext()
    try:
        with lock:
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ModuleNotFoundError as error:
        raise StorageError(
            f"storage: the driver for {parsed.get_backend_name()!r} is not installed "
            f"({error.name}); pip install it"
        ) from None
    except Exception as error:  # SQLAlchemy raises many types for one cause
        raise StorageError(f"storage: cannot open {redact(url)}: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    """The innermost cause of a storage error, as one line ("database or disk is full")."""
    while error.__cause__ is not None or getattr(error, "orig", None) is not None:
        error = getattr(error, "orig", None) or error.__cause__  # type: ignore[assignment]
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


WRITE_FAILURES = {
    "database or disk is full": "the disk is full",
    "disk i/o error": "SQLite could not write the store or its journal file beside it "
    "(a full disk, or a directory it cannot write in?)",
    "unable to open database file": "SQLite cannot create its journal file beside the store "
    "(is the directory writable?)",
    "attempt to write a readonly database": "the store is read-only",
}


def storage_failure(error: BaseException, url: str | None) -> StorageError | None:
    """A store that could not be written, said in one line with its real cause; None when
    `error` is not a storage failure (a bug keeps its traceback)."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    chain, cause = [], error
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not any(isinstance(e, StorageInternalError | OperationalError) for e in chain):
        return None
    reason = _reason(chain[-1] if len(chain) > 1 else error)
    for e in chain:
        text = str(getattr(e, "orig", None) or e).lower()
        for needle, said in WRITE_FAILURES.items():
            if needle in text:
                reason = said
    where = redact(url) if url else "the store"
    return StorageError(f"storage: cannot write to {where}: {reason}")


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
