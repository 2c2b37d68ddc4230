"""Storage URLs: SQLite by default, any SQLAlchemy URL (PostgreSQL for many machines).

RDB storages get a heartbeat so that a trial whose process died is noticed and retried.
Every user-fixable problem (bad URL, unwritable path, not a database, unreachable server)
becomes one `StorageError` line; nothing here ever writes to a store it could not open.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from study.config import DEFAULT_STORAGE, RUNS_DIR, is_study_name
from study.errors import StorageError

warnings.filterwarnings("ignore", category=ExperimentalWarning)

HEARTBEAT_SECONDS = int(os.environ.get("STUDY_HEARTBEAT_SECONDS", "30"))
"""Interval of the trial heartbeat; a RUNNING trial silent for 2x this long is stale.
($STUDY_HEARTBEAT_SECONDS overrides it, e.g. for crash tests.)"""
MAX_RETRIES = 3
"""How often a trial whose worker died is re-queued before it is left failed."""
SQLITE_HEADER = b"SQLite format 3\x00"
OPTUNA_TABLES = {"studies", "version_info", "alembic_version"}
"""Tables that mark an Optuna RDB store (the first ones Optuna creates): an SQLite file with
tables but none of these is another application's database, and is left untouched."""


def default_out(name: str) -> Path:
    """The default directory of a study's report, export and certification files: one
    directory in RUNS_DIR, whatever the name. A name a new study may take is used as it is;
    any other (a stored study made elsewhere: '../x', '/abs', '.', a newline, 300 characters)
    becomes its safe characters and a digest of the whole name, so that it never leaves
    RUNS_DIR and two names never share a directory."""
    if is_study_name(name):
        return RUNS_DIR / name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("._-")[:40] or "study"
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return RUNS_DIR / f"{safe}-{digest}"


def artifact_store(url: str, create: bool = True):
    """Optuna's artifact store that belongs to store `url`: a directory beside an SQLite file
    (`studies.db.artifacts/`); for a server, $STUDY_ARTIFACTS or results/runs/artifacts (a
    directory every machine can reach, for many machines). Without `create` (commands that
    only read) a store with no artifacts yet gives None and nothing is made."""
    from optuna.artifacts import FileSystemArtifactStore

    path = sqlite_path(url)
    if path is not None:
        base = Path(f"{path}.artifacts")
    else:
        base = Path(os.environ.get("STUDY_ARTIFACTS", RUNS_DIR / "artifacts"))
    if not create and not base.is_dir():
        return None
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(base))


def redact(url: str) -> str:
    """`url` with its password replaced by ***: the only form a URL is ever shown in. Read as
    text, not parsed: a password may hold '@', ':' or '/' unescaped, or sit in the query."""
    scheme, sep, rest = url.partition("://")
    if sep:
        at = rest.rfind("@")
        user, colon, _ = rest[:at].partition(":") if at >= 0 else ("", "", "")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    shown = f"{scheme}{sep}{rest}"
    return re.sub(r"([?&](?:password|passwd|pwd)=)[^&]*", r"\1***", shown, flags=re.IGNORECASE)


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
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would hang, a device be written
            raise StorageError(f"storage: {path} is not a regular file (a pipe or a device?)")
        with path.open("rb") as handle:
            head = handle.read(16)
        if head and head != SQLITE_HEADER:
            raise StorageError(f"storage: {path} exists but is not an SQLite database")
        tables = _sqlite_tables(path) if head else set()
        if tables and not OPTUNA_TABLES & tables:
            raise StorageError(
                f"storage: {path} is an SQLite database of another application (no Optuna "
                "tables); give a new file or an Optuna store"
            )
        if not tables and not create:  # an empty file: only a command that writes fills it
            raise StorageError(f"storage: {path} is empty, not a store (run a study first)")
        if create and not os.access(path, os.W_OK):
            raise StorageError(f"storage: {path} is not writable")
        return
    if not create:
        raise StorageError(f"storage: no store at {path} (run a study first, or check --storage)")
    parent = path.parent if str(path.parent) else Path(".")
    if path == sqlite_path(DEFAULT_STORAGE) and not parent.exists():
        # the default store is made wherever the user stands (a given path's directory never)
        with contextlib.suppress(OSError):  # cannot: said below
            parent.mkdir(parents=True)
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise StorageError(
            f"storage: cannot create {path}: {parent} {what} (create the directory first)"
        )
    if not os.access(parent, os.W_OK):
        raise StorageError(f"storage: cannot create {path}: {parent} is not writable")


def _sqlite_tables(path: Path) -> set[str]:
    """The tables of an SQLite file, read without writing it (a read-only connection).

    A process killed inside a write transaction (kill -9, power loss, the out-of-memory killer)
    leaves a hot rollback journal beside the file, which a read-only connection cannot roll
    back: the file is then opened once for writing, as any SQLite reader with write access
    does, which restores the last committed state (the killed transaction never happened)."""
    import sqlite3
    from urllib.parse import quote

    def tables(mode: str) -> set[str]:
        with contextlib.closing(
            sqlite3.connect(
                f"file:{quote(str(path.resolve()))}?mode={mode}", uri=True, timeout=120
            )
        ) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {name for (name,) in rows}

    try:
        return tables("ro")
    except sqlite3.DatabaseError as error:
        journal = Path(f"{path}-journal")
        if "readonly" in str(error) and journal.is_file() and os.access(path, os.W_OK):
            try:
                return tables("rw")  # rolls the hot journal back
            except sqlite3.DatabaseError as again:
                error = again
        raise StorageError(f"storage: cannot read {path}: {error}") from None


LOCK_SAY_SECONDS = 5.0
"""A lock not had within this long is waited for with one line saying so."""
LOCK_WAIT_SECONDS = 600.0
"""A lock still held elsewhere after this long ends the command with one line
(`$STUDY_LOCK_SECONDS` sets another limit)."""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if needed) shared by every process of this machine
    (`filelock`: an OS lock, released when its process ends however it ends). A lock path that
    is not a regular file is refused; a lock held elsewhere is waited for, saying so after
    `LOCK_SAY_SECONDS`, and given up after `LOCK_WAIT_SECONDS`, each in one line."""
    import sys

    from filelock import FileLock, Timeout

    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise StorageError(
            f"lock: {path} is not a regular file (a pipe, a directory or a link?); remove it "
            "and run again"
        )
    try:
        limit = float(os.environ.get("STUDY_LOCK_SECONDS", LOCK_WAIT_SECONDS))
    except ValueError:
        raise StorageError("$STUDY_LOCK_SECONDS: must be a number of seconds") from None
    lock = FileLock(path)
    try:
        lock.acquire(timeout=min(LOCK_SAY_SECONDS, limit))
    except Timeout:
        print(
            f"study: waiting for the lock {path}: another process of this machine holds it "
            f"(giving up after {limit:g} s)",
            file=sys.stderr,
            flush=True,
        )
        try:
            lock.acquire(timeout=max(0.0, limit - LOCK_SAY_SECONDS))
        except Timeout:
            raise StorageError(
                f"lock: {path} is still held by another process after {limit:g} s; run again "
                "once it ends (or set $STUDY_LOCK_SECONDS)"
            ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def advisory_lock(connection, key: int) -> Iterator[None]:
    """A PostgreSQL session advisory lock on `key`, held while the block runs (every machine
    on the database shares it)."""
    from sqlalchemy import text

    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
    try:
        yield
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})


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
    except (ArgumentError, ValueError):  # ValueError: a port that is empty or not a number
        raise StorageError(
            f"storage: malformed URL {redact(url)!r}; expected e.g. {DEFAULT_STORAGE} or "
            "postgresql://user:password@host:5432/db"
        ) from None
    if parsed.host and "@" in parsed.host:  # the tail of such a password would pose as host
        raise StorageError(
            f"storage: malformed URL {redact(url)!r}: write an '@' in the password as %40"
        )
    engine_kwargs: dict = {}
    path = sqlite_path(url)
    if path is not None:
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
    if path is not None:
        _check_sqlite_path(path, create)  # before any lock file is made beside it
    # processes that may create the store's tables go one at a time: the check and the
    # creation under one lock beside the file, so that none sees another's half-made store
    creating = path is not None and create
    lock = contextlib.nullcontext()
    if creating:
        lock_path = Path(f"{path}.lock")
        try:
            lock_path.touch()
        except OSError as error:
            raise StorageError(
                f"storage: cannot write beside {path} ({error.strerror}); SQLite writes its "
                "journal there too"
            ) from None
        lock = file_lock(lock_path)
    elif parsed.get_backend_name().startswith("postgresql"):
        lock = _advisory_lock(url, engine_kwargs, create)
    try:
        with lock:
            if creating:
                _check_sqlite_path(path, create)
            return _rdb_storage(url, engine_kwargs, kwargs)
    except StorageError:
        raise
    except ModuleNotFoundError as error:
        raise StorageError(
            f"storage: the driver for {parsed.get_backend_name()!r} is not installed "
            f"({error.name}); pip install it"
        ) from None
    except Exception as error:  # SQLAlchemy raises many types for one cause
        raise StorageError(f"storage: cannot open {redact(url)}: {_reason(error)}") from None


CREATION_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key")
"""What SQLite and PostgreSQL say when another process created Optuna's tables (or its schema
version row) between this process's check and its CREATE: an Optuna loader that is not this
tool (`optuna.load_study`, `optuna studies`, optuna-dashboard, a notebook) opening a new store
while a run creates it. The tool's own processes take the lock; those cannot be made to."""


def _rdb_storage(url: str, engine_kwargs: dict, kwargs: dict) -> RDBStorage:
    """`RDBStorage(url)`, again after a short wait when another process's table creation
    raced this one (`CREATION_RACE`): the tables are then there, and the next try finds them."""
    for attempt in range(6):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as error:  # SQLAlchemy's OperationalError, IntegrityError, ...
            if attempt == 5 or not any(text in str(error) for text in CREATION_RACE):
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


class NoStoreYet(StorageError):
    """A database server's database without Optuna's tables, opened by a command that reads."""


CREATE_LOCK_KEY = 0x5354_5544_5900  # "STUDY": the advisory lock key of creating the tables
"""PostgreSQL advisory lock held while a process creates or checks the store's tables."""


@contextlib.contextmanager
def _advisory_lock(url: str, engine_kwargs: dict, create: bool) -> Iterator[None]:
    """The PostgreSQL form of the lock file: processes that open one new database at once
    create Optuna's tables one at a time (concurrent CREATE TABLEs collide in pg_type).
    Without `create`, a database with no Optuna tables is refused (a read makes no store)."""
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url, **engine_kwargs)
    try:
        with engine.connect() as connection, advisory_lock(connection, CREATE_LOCK_KEY):
            if not create and not OPTUNA_TABLES & set(inspect(connection).get_table_names()):
                raise NoStoreYet(
                    f"storage: {redact(url)} holds no Optuna store yet (run a study first)"
                )
            yield
    finally:
        engine.dispose()


def existing_store(url: str, heartbeat: bool = True) -> RDBStorage | None:
    """The Optuna store `url` already holds, opened once, else None (a new run asks before it
    writes): an SQLite file with Optuna's tables, a database server with them. Creates
    nothing."""
    path = sqlite_path(url)
    if path is not None:
        exists = path.is_file() and path.stat().st_size > 0
        return open_storage(url, heartbeat=heartbeat) if exists else None
    try:
        return open_storage(url, heartbeat=heartbeat)
    except NoStoreYet:
        return None


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
    """Names of the studies in a storage (their attributes only: `get_all_study_summaries`
    would load every trial of every study)."""
    return [s.study_name for s in storage.get_all_studies()]


def load_study(name: str, storage: RDBStorage) -> optuna.Study:
    """An existing study, or one clear error naming the studies that do exist."""
    names = study_names(storage)
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise StorageError(f"study {name!r} not found in the storage (studies there: {known})")
    return optuna.load_study(study_name=name, storage=storage)
