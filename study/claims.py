"""Which trials are whose: exact totals, owners, heartbeats, and trials whose process died.

Every process that runs a study asks for new trials the same way: under a lock shared by every
process on the store (a lock file on this machine; on PostgreSQL also an advisory lock in the
database, so that machines share it), it counts the trials that are finished or running and asks
only for what is missing to the total. Each asked trial is created RUNNING with its owner (host,
process id, process start time) and a first heartbeat in the same write, and then beats from a
background thread. A RUNNING trial whose owner is a process of this machine that no longer
exists is failed at once; one of another machine once its heartbeat is stale. Either way it is
re-queued with the same parameters (`RetryHeartbeatStaleTrialCallback`), and its `fail_reason`
says why.

Optuna's RDB storage writes one call per transaction; asking or failing thousands of trials
that way takes minutes. Here they go `CHUNK` per transaction, through the storage's own
session and models (`_claim_chunk`, `_fail_chunk`, through `study/rdb.py`, the one module
that touches Optuna's internals), with Optuna's calls one by one as the
fallback for a storage that is not a database (`study bench claims` measures both).
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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from study import interrupt, rdb
from study.storage import advisory_lock, file_lock, sqlite_path
from study.studies import FINISHED

OWNER_ATTR = "study:owner"
"""Trial system attribute: {"host", "pid", "started"} of the process that runs the trial."""
CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
DEAD_PROCESS = "its process ({owner}) ended before the trial finished"
STALE = "its heartbeat stopped: the process running it died or lost the store"


CHUNK = 256
"""Most trials asked or failed in one transaction: a signal waits for one chunk at most, and a
kill leaves each chunk wholly written or not at all."""


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
    if pid <= 0:  # not a process (and os.kill would signal a whole group)
        return False
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


def claim(
    study: optuna.Study,
    count: int,
    into: list[optuna.Trial] | None = None,
    owner: dict | None = None,
    batched: bool = True,
) -> list[optuna.Trial]:
    """Ask `count` trials (enqueued ones first, as `Study.ask` does), each RUNNING with this
    process as its owner and a first heartbeat in the same write (a RUNNING trial without an
    owner or a heartbeat could never be reaped). Asked `CHUNK` at a time, one transaction
    each: a signal waits for one chunk at most and stops the claim between chunks (the trials
    asked so far are in `into`, for the caller to fail), and a kill leaves each chunk wholly
    written or not at all. `owner` defaults to this process; `batched=False` makes one
    Optuna call per trial, as on a storage that is not a database."""
    trials = [] if into is None else into
    owner = owner or this_process()
    backend = rdb.backend(rdb.storage_of(study)) if batched else None
    ids: list[int] = []
    try:
        while count > 0:
            size = min(count, CHUNK)
            with interrupt.held():
                if backend is not None:
                    ids += _claim_chunk(study, backend, size, owner)
                else:
                    ids += [_claim_one(study, owner) for _ in range(size)]
            count -= size
            if count > 0:
                interrupt.check()
        # what `Study.ask` does before making a `Trial`, once for the whole claim: each chunk
        # doing it re-read every RUNNING trial, and a stop waited for that too
        rdb.forget_cached_trials(study)
        for trial_id in ids:
            trials.append(optuna.Trial(study, trial_id))
    except BaseException as error:  # a stop between chunks: what this call claimed is failed
        abandon_ids(study, ids, error)
        raise
    return trials


def _claim_one(study: optuna.Study, owner: dict) -> int:
    """One trial through Optuna's own calls (a storage that is not a database)."""
    storage = rdb.storage_of(study)
    with _quiet_heartbeat_warning():
        trial = study.ask()
    storage.set_trial_system_attr(rdb.trial_id(trial), OWNER_ATTR, owner)
    if heartbeat_interval(storage):
        storage.record_heartbeat(rdb.trial_id(trial))
    return rdb.trial_id(trial)


def _claim_chunk(study: optuna.Study, backend, size: int, owner: dict) -> list[int]:
    """`size` trials in one transaction: WAITING ones set RUNNING, then new ones created."""
    models = rdb.models()
    beat = heartbeat_interval(rdb.storage_of(study)) is not None
    ids = []
    with rdb.transaction(backend) as session:
        models.StudyModel.find_or_raise_by_id(rdb.study_id(study), session, for_update=True)
        waiting = (
            session.query(models.TrialModel)
            .filter(models.TrialModel.study_id == rdb.study_id(study))
            .filter(models.TrialModel.state == TrialState.WAITING)
            .order_by(models.TrialModel.trial_id)
            .limit(size)
            .with_for_update()
            .all()
        )
        for trial in waiting:
            trial.state = TrialState.RUNNING
            trial.datetime_start = datetime.datetime.now()
            rdb.set_attr(
                backend,
                session,
                models.TrialSystemAttributeModel,
                trial.trial_id,
                OWNER_ATTR,
                owner,
            )
            ids.append(trial.trial_id)
        for _ in range(size - len(waiting)):
            template = _running_template({}, {}, {}, owner)
            row = rdb.new_trial(backend, study, template, session)
            ids.append(row.trial_id)
        session.flush()
        if beat:
            for trial_id in ids:
                rdb.first_heartbeat(session, trial_id)
    return ids


def claim_fixed(
    study: optuna.Study,
    params: list[dict[str, Any]],
    distributions: dict[str, BaseDistribution],
    user_attrs: list[dict[str, Any]],
) -> list[optuna.Trial]:
    """Create one RUNNING trial per entry of `params` (an evaluation fixed in advance, not
    sampled), with its owner in the same write, and a first heartbeat."""
    storage = rdb.storage_of(study)
    owner = this_process()
    trials = []
    for values, attrs in zip(params, user_attrs, strict=True):
        template = _running_template(
            values, {name: distributions[name] for name in values}, attrs, owner
        )
        trial_id = storage.create_new_trial(rdb.study_id(study), template_trial=template)
        if heartbeat_interval(storage):
            storage.record_heartbeat(trial_id)
        trials.append(optuna.Trial(study, trial_id))
    return trials


def _running_template(
    params: dict[str, Any],
    distributions: dict[str, BaseDistribution],
    user_attrs: dict[str, Any],
    owner: dict,
) -> FrozenTrial:
    """A new RUNNING trial owned by `owner` (Optuna's template for `create_new_trial`)."""
    return FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now(),
        datetime_complete=None,
        params=params,
        distributions=distributions,
        user_attrs=user_attrs,
        system_attrs={OWNER_ATTR: owner},
        intermediate_values={},
        trial_id=-1,
    )


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
    storage = rdb.storage_of(study)
    interval = heartbeat_interval(storage)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for trial in trials:
                with contextlib.suppress(Exception):  # a lost connection: the trial goes stale
                    storage.record_heartbeat(rdb.trial_id(trial))

    thread = threading.Thread(target=beat, name="study-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def train_claimed(
    study: optuna.Study,
    trials: list[optuna.Trial],
    train: Callable[..., Any],
    *args: Any,
    requeue: bool | None = None,
) -> Any:
    """`train(*args)` for trials this process claimed, their heartbeats beating meanwhile; on any
    error (a stop included) the trials are failed with its reason (`abandon`: re-queued as
    `requeue` or the stop says) and the error goes on. Every claim-and-train loop trains
    through here."""
    try:
        with heartbeat(study, trials):
            return train(*args)
    except BaseException as error:
        abandon(study, trials, error, requeue=requeue)
        raise


def fail_many(
    study: optuna.Study,
    reasons: Mapping[int, str],
    retry: bool = True,
    between: Callable[[], None] | None = None,
    batched: bool = True,
) -> int:
    """Fail the trials of `reasons` (trial id -> reason) that are still RUNNING, storing the
    reason, and (with `retry`) re-queue the parameters of those that had any, as the store's
    `RetryHeartbeatStaleTrialCallback` does. `CHUNK` trials per transaction on a database (a
    thousand in about a second, where one call per trial took a minute); `between` runs
    between chunks (a stop check); `batched=False` makes one Optuna call per trial. Returns
    how many this call failed."""
    storage = rdb.storage_of(study)
    callback = None
    if retry and heartbeat_interval(storage):
        callback = storage.get_heartbeat_stale_trial_callback()
    backend = rdb.backend(storage) if batched else None
    items = list(reasons.items())
    failed = 0
    for start in range(0, len(items), CHUNK):
        if start and between is not None:
            between()
        chunk = items[start : start + CHUNK]
        with interrupt.held():
            if backend is not None:
                failed += _fail_chunk(study, backend, chunk, callback)
            else:
                failed += sum(_fail_one(study, i, reason, callback) for i, reason in chunk)
    return failed


ENQUEUED_ATTRS = ("baseline", "rung", "promoted_from", "checkpoint")
"""User attributes that say what a trial runs (the space's baseline; a planned study's rung and
the trial it was promoted from; the checkpoint a trial stopped by the time budget goes on
from, `study.checkpoints`): a re-queued copy keeps these and nothing else of the failed
attempt."""


def _retries(callback, trial: FrozenTrial) -> list[FrozenTrial]:
    """The WAITING copies `callback` makes of the failed `trial`: none without a callback, or
    for a trial that never had parameters (claimed, never sampled: the next run samples anew).
    A copy starts clean: its parameters and `ENQUEUED_ATTRS` only; the failed attempt keeps its
    history and its reason where they are (Optuna links the two: `failed_trial`)."""
    if callback is None or not (trial.params or "fixed_params" in trial.system_attrs):
        return []
    failed = copy.deepcopy(trial)
    failed.state = TrialState.FAIL
    collected: list[FrozenTrial] = []
    callback(_Collect(collected), failed)
    for retry in collected:
        retry.user_attrs = {k: v for k, v in retry.user_attrs.items() if k in ENQUEUED_ATTRS}
        retry.intermediate_values = {}
    return collected


class _Collect:
    """Stands in for the study given to Optuna's retry callback: keeps the trial it adds."""

    def __init__(self, into: list[FrozenTrial]) -> None:
        self.into = into

    def add_trial(self, trial: FrozenTrial) -> None:
        self.into.append(trial)


def _fail_one(study: optuna.Study, trial_id: int, reason: str, callback) -> int:
    storage = rdb.storage_of(study)
    try:
        if storage.get_trial(trial_id).state != TrialState.RUNNING:
            return 0
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return 0
    except optuna.exceptions.UpdateFinishedTrialError:
        return 0
    trial = storage.get_trial(trial_id)
    for retry in _retries(callback, trial):
        storage.create_new_trial(rdb.study_id(study), template_trial=retry)
    return 1


def _fail_chunk(study: optuna.Study, backend, chunk: list[tuple[int, str]], callback) -> int:
    models = rdb.models()
    failed = 0
    with rdb.transaction(backend) as session:
        models.StudyModel.find_or_raise_by_id(rdb.study_id(study), session, for_update=True)
        if callback is None:  # nothing to re-queue: three statements for the whole chunk
            return _fail_rows(session, models, dict(chunk))
        for trial_id, reason in chunk:
            row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            if row.state != TrialState.RUNNING:
                continue  # told or failed by its owner or another reaper meanwhile
            trial = rdb.frozen(backend, row)
            rdb.set_attr(
                backend, session, models.TrialUserAttributeModel, trial_id, "fail_reason", reason
            )
            row.state = TrialState.FAIL
            row.datetime_complete = datetime.datetime.now()
            failed += 1
            for retry in _retries(callback, trial):
                rdb.new_trial(backend, study, retry, session)
    return failed


def _fail_rows(session, models, reasons: dict[int, str]) -> int:
    """Fail the trials of `reasons` that are still RUNNING, each with its `fail_reason`, in
    the caller's transaction: one select, one batched update and one insert for them all (a
    signal's stop fails thousands of claimed trials in well under a second)."""
    import json

    trials = models.TrialModel
    rows = (
        session.query(trials)
        .filter(trials.trial_id.in_(list(reasons)), trials.state == TrialState.RUNNING)
        .with_for_update()
        .all()
    )
    if not rows:
        return 0
    now = datetime.datetime.now()
    for row in rows:  # flushed as one executemany
        row.state = TrialState.FAIL
        row.datetime_complete = now
    running = [row.trial_id for row in rows]
    attrs = models.TrialUserAttributeModel
    session.query(attrs).filter(attrs.trial_id.in_(running), attrs.key == "fail_reason").delete(
        synchronize_session=False
    )
    session.bulk_insert_mappings(
        attrs,
        [{"trial_id": i, "key": "fail_reason", "value_json": json.dumps(reasons[i])}
         for i in running],
    )  # fmt: skip
    return len(running)


def reap(study: optuna.Study, requeue: bool = True, batched: bool = True) -> int:
    """Fail the RUNNING trials whose process is gone (and, with `requeue`, re-queue their
    parameters): at once for a process of this machine, after the heartbeat grace for one
    elsewhere. Returns how many. Thousands take seconds (`fail_many`), and a stop is honoured
    between chunks."""
    storage = rdb.storage_of(study)
    reasons: dict[int, str] = {}
    alive: dict[tuple, bool | None] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_ATTR)
        if owner is None:
            continue
        key = (owner.get("host"), owner.get("pid"), owner.get("started"))
        if key not in alive:
            alive[key] = owner_alive(owner)
        if alive[key] is False:
            reasons[rdb.trial_id(trial)] = DEAD_PROCESS.format(owner=describe_owner(owner))
    if heartbeat_interval(storage):
        for trial_id in rdb.stale_trial_ids(study):
            reasons.setdefault(trial_id, STALE)
    return fail_many(study, reasons, retry=requeue, between=interrupt.check, batched=batched)


def abandon(
    study: optuna.Study,
    trials: list[optuna.Trial],
    error: BaseException,
    requeue: bool | None = None,
) -> None:
    """Fail the trials this process still runs, with the reason it stops (`interrupt.reason_of`).
    They are re-queued with their parameters when `requeue` says so (default: when the stop
    says so, as the time budget does); otherwise the next run samples anew."""
    abandon_ids(study, [rdb.trial_id(trial) for trial in trials], error, requeue)


def abandon_ids(
    study: optuna.Study, ids: list[int], error: BaseException, requeue: bool | None = None
) -> None:
    """`abandon` by storage ids (trials claimed but not yet handed out)."""
    if not ids:
        return
    with interrupt.shielded():
        reason = interrupt.reason_of(error)
        stop = interrupt.stop_of(error)
        retry = (stop is not None and stop.requeue) if requeue is None else requeue
        with contextlib.suppress(Exception):  # the store is gone: the next run reaps them
            fail_many(study, dict.fromkeys(ids, reason), retry=retry)


def running_elsewhere(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials of this tool on other machines (alive, or dead until their heartbeat
    goes stale)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if OWNER_ATTR in t.system_attrs and owner_alive(t.system_attrs[OWNER_ATTR]) is None
    ]


def count(study: optuna.Study, states: tuple[TrialState, ...] = FINISHED) -> int:
    """How many trials of `study` are in `states`: one COUNT on a database (a stop says it
    without reading thousands of trials), else from the trials."""
    counted = rdb.count_trials(study, states)
    if counted is None:
        return len(study.get_trials(deepcopy=False, states=states))
    return counted


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
    key = int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as connection, advisory_lock(connection, key):
        yield
