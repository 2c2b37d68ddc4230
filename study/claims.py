"""Which trials are whose: exact totals, owners, heartbeats, and trials whose process died.

Every process that runs a study asks for new trials the same way: under a lock shared by every
process on the store (a lock file on this machine; on PostgreSQL also an advisory lock in the
database, so that machines share it), it counts the trials that are finished or running and asks
only for what is missing to the total. Each asked trial records its owner (host, process id,
process start time) and gets a heartbeat from a background thread. A RUNNING trial whose owner
is a process of this machine that no longer exists is failed at once; one of another machine
once its heartbeat is stale. Either way it is re-queued with the same parameters
(`RetryHeartbeatStaleTrialCallback`), and its `fail_reason` says why.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from study import interrupt
from study.storage import file_lock, sqlite_path

OWNER_ATTR = "study:owner"
"""Trial system attribute: {"host", "pid", "started"} of the process that runs the trial."""
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
DEAD_PROCESS = "its process ({owner}) ended before the trial finished"
STALE = "its heartbeat stopped: the process running it died or lost the store"


def heartbeat_interval(storage) -> int | None:
    """The storage's heartbeat interval in seconds (None: no heartbeat). Optuna wraps an
    RDBStorage in a cache that forwards the heartbeat methods; ask for them by name."""
    get = getattr(storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


def _started(pid: int) -> str | None:
    """When process `pid` started (Linux /proc; None elsewhere): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict[str, object]:
    """The owner record of this process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid())}


def owner_alive(owner: dict) -> bool | None:
    """True/False for an owner on this machine; None when it runs elsewhere (ask the heartbeat)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = owner.get("started")
    return started is None or _started(pid) in (None, started)


def describe_owner(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}"


def claim(study: optuna.Study, count: int) -> list[optuna.Trial]:
    """Ask `count` trials and record this process as their owner and a first heartbeat (a
    RUNNING trial without any heartbeat would never turn stale)."""
    storage = study._storage
    owner = this_process()
    trials = []
    with _quiet_heartbeat_warning():
        for _ in range(count):
            trial = study.ask()
            storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, owner)
            if heartbeat_interval(storage):
                storage.record_heartbeat(trial._trial_id)
            trials.append(trial)
    return trials


def claim_fixed(
    study: optuna.Study,
    params: list[dict[str, Any]],
    distributions: dict[str, BaseDistribution],
    user_attrs: list[dict[str, Any]],
) -> list[optuna.Trial]:
    """Create one RUNNING trial per entry of `params` (an evaluation fixed in advance, not
    sampled), with its owner in the same write, and a first heartbeat."""
    storage = study._storage
    owner = this_process()
    trials = []
    for values, attrs in zip(params, user_attrs, strict=True):
        template = FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.datetime.now(),
            datetime_complete=None,
            params=values,
            distributions={name: distributions[name] for name in values},
            user_attrs=attrs,
            system_attrs={OWNER_ATTR: owner},
            intermediate_values={},
            trial_id=-1,
        )
        trial_id = storage.create_new_trial(study._study_id, template_trial=template)
        if heartbeat_interval(storage):
            storage.record_heartbeat(trial_id)
        trials.append(optuna.Trial(study, trial_id))
    return trials


@contextlib.contextmanager
def _quiet_heartbeat_warning() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        # ask/tell with a heartbeat storage: the heartbeat is recorded here, by hand
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        yield


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trials: list[optuna.Trial]) -> Iterator[None]:
    """Beat the trials' heartbeats from a background thread while the block runs (however long
    an epoch takes); leaving the block stops it."""
    storage = study._storage
    interval = heartbeat_interval(storage)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for trial in trials:
                with contextlib.suppress(Exception):  # a lost connection: the trial goes stale
                    storage.record_heartbeat(trial._trial_id)

    thread = threading.Thread(target=beat, name="study-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail(study: optuna.Study, trial_id: int, reason: str, retry: bool = True) -> bool:
    """Fail a RUNNING trial with `reason` and (with `retry`) re-queue its parameters; False
    when another process changed its state first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    callback = (
        storage.get_heartbeat_stale_trial_callback() if heartbeat_interval(storage) else None
    )
    if retry and callback is not None:
        callback(study, copy.deepcopy(storage.get_trial(trial_id)))
    return True


def reap(study: optuna.Study, requeue: bool = True) -> int:
    """Fail the RUNNING trials whose process is gone (and, with `requeue`, re-queue their
    parameters): at once for a process of this machine, after the heartbeat grace for one
    elsewhere. Returns how many."""
    storage = study._storage
    reaped = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_ATTR)
        if owner is not None and owner_alive(owner) is False:
            reason = DEAD_PROCESS.format(owner=describe_owner(owner))
            reaped += fail(study, trial._trial_id, reason, retry=requeue)
    if heartbeat_interval(storage):
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            reaped += fail(study, trial_id, STALE, retry=requeue)
    return reaped


def abandon(
    study: optuna.Study,
    trials: list[optuna.Trial],
    error: BaseException,
    requeue: bool | None = None,
) -> None:
    """Fail the trials this process still runs, with the reason it stops (`interrupt.reason_of`).
    They are re-queued with their parameters when `requeue` says so (default: when the stop
    says so, as the time budget does); otherwise the next run samples anew."""
    if not trials:
        return
    with interrupt.shielded():
        reason = interrupt.reason_of(error)
        stop = interrupt.stop_of(error)
        retry = (stop is not None and stop.requeue) if requeue is None else requeue
        for trial in trials:
            with contextlib.suppress(Exception):  # already told, or the store is gone
                if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                    fail(study, trial._trial_id, reason, retry=retry)


def running_elsewhere(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials of this tool on other machines (alive, or dead until their heartbeat
    goes stale)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if OWNER_ATTR in t.system_attrs and owner_alive(t.system_attrs[OWNER_ATTR]) is None
    ]


def count(study: optuna.Study, states: tuple[TrialState, ...] = FINISHED) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def claimed(study: optuna.Study) -> int:
    """Finished trials and the RUNNING ones of this tool (which record an owner). A RUNNING
    trial without an owner was not started by this tool (plain Optuna, an old version) and
    carries no heartbeat we can watch: it is not counted, so that it cannot block a study."""
    trials = study.get_trials(deepcopy=False, states=CLAIMED)
    return sum(t.state != TrialState.RUNNING or OWNER_ATTR in t.system_attrs for t in trials)


@contextlib.contextmanager
def claim_lock(url: str, storage: optuna.storages.BaseStorage, study_name: str) -> Iterator[None]:
    """Held while counting and asking trials: a lock file for the processes of this machine,
    and on PostgreSQL a session advisory lock for every machine on the store."""
    path = sqlite_path(url)
    if path is not None:
        lock_path = Path(f"{path}.lock")
    else:
        digest = hashlib.sha1(f"{url}\n{study_name}".encode()).hexdigest()[:16]
        lock_path = Path(tempfile.gettempdir()) / f"study-{digest}.lock"
    with file_lock(lock_path), _database_lock(storage, study_name):
        yield


@contextlib.contextmanager
def _database_lock(storage: optuna.storages.BaseStorage, study_name: str) -> Iterator[None]:
    engine = getattr(storage, "engine", None)
    if engine is None or not engine.dialect.name.startswith("postgresql"):
        yield
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
