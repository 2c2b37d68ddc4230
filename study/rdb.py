"""Every private name of Optuna this project uses, behind one door.

Optuna's public API writes one call per transaction and offers no handle on a trial's or a
study's storage id; the claims (thousands of trials asked or failed in seconds, `claims.py`)
and the frontier's one-time migration of old cells (`frontier.align_with_optuna`) need more.
Each name below says why it is needed and what the public fallback is. `missing()` lists the
internals the installed Optuna lacks, and a test fails in one line naming them, so that an
Optuna upgrade that moves one breaks here and nowhere else.

- `Study._storage`, `Study._study_id`: the storage and id a study reads and writes
  (fallback: `optuna.load_study` again; none for the id);
- `Trial._trial_id`, `FrozenTrial._trial_id`: a trial's id in the storage, for heartbeats and
  fails (none);
- `optuna.storages._rdb.models`, `RDBStorage.scoped_session` and
  `optuna.storages._rdb.storage._create_scoped_session`: many trials' rows in one committed
  transaction (fallback: one `Study.ask` or storage call per trial, `batched=False`);
- `RDBStorage._get_prepared_new_trial`, `_set_trial_attr_without_commit`,
  `_build_frozen_trial_from_trial_model`: a new trial, an attribute, the trial a retry
  callback copies, inside that transaction (`create_new_trial`, `set_trial_system_attr`,
  `get_trial`);
- `_CachedStorage._backend`: the `RDBStorage` under Optuna's cache (none: one call per trial);
- `Study._thread_local.cached_all_trials`: the study's trial list, stale after a raw write
  (`load_study` again);
- `RDBStorage._get_stale_trial_ids`: the trials whose heartbeat stopped
  (`Study.fail_stale_trials`, which fails them without the reason this project stores);
- `optuna.study._constrained_optimization._CONSTRAINTS_KEY`: the prefix of the key
  `Trial.set_constraint` writes, for the frontier's migration of old cells (none: the key is
  Optuna's own), and `_get_constraints_from_system_attrs`, which reads both of its formats;
- the models again for `drop_study_user_attrs`: the tool's large study attributes of older
  stores move to system attributes, and the user attributes they leave must go (none: Optuna
  cannot delete an attribute; they would stay in `optuna studies` rows);
- the models again for `trial_digest`: `study list` counts every study's trials by state in a
  few queries, where Optuna's `get_all_study_summaries` loads every trial of every study
  (fallback: `Study.get_trials` per study, as `overview` does for a storage without them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import optuna


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage `study` reads and writes (Optuna's cache around an RDBStorage)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: optuna.trial.BaseTrial) -> int:
    """The storage's id of a `Trial` or `FrozenTrial` (not its number in the study)."""
    return trial._trial_id


def models() -> Any:
    """Optuna's SQLAlchemy models of the RDB storage."""
    from optuna.storages._rdb import models

    return models


NEEDED = (
    "_get_prepared_new_trial",
    "_set_trial_attr_without_commit",
    "_build_frozen_trial_from_trial_model",
    "scoped_session",
)


def backend(storage) -> optuna.storages.RDBStorage | None:
    """The `RDBStorage` under Optuna's cache, or None for a storage without one (in memory, or
    an Optuna without the internals): then every trial goes through Optuna's own calls."""
    found = getattr(storage, "_backend", storage)
    if isinstance(found, optuna.storages.RDBStorage) and all(hasattr(found, n) for n in NEEDED):
        return found
    return None


@contextlib.contextmanager
def transaction(rdb: optuna.storages.RDBStorage) -> Iterator[Any]:
    """One session of `rdb`, committed when the block ends (rolled back on an error)."""
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        yield session


def new_trial(rdb, study: optuna.Study, template: optuna.trial.FrozenTrial, session) -> Any:
    """A new trial row made from `template` in the caller's transaction."""
    return rdb._get_prepared_new_trial(study_id(study), template, session)


def set_attr(rdb, session, model, trial: int, key: str, value: Any) -> None:
    """A trial attribute (`model`: `models().TrialUserAttributeModel` or
    `TrialSystemAttributeModel`) in the caller's transaction."""
    rdb._set_trial_attr_without_commit(session, model, trial, key, value)


def frozen(rdb, row) -> optuna.trial.FrozenTrial:
    """The `FrozenTrial` of a trial row."""
    return rdb._build_frozen_trial_from_trial_model(row)


def first_heartbeat(session, trial: int) -> None:
    """A trial's first heartbeat (now, the database's clock), in the caller's transaction."""
    heartbeats = models().TrialHeartbeatModel
    if heartbeats.where_trial_id(trial, session) is None:
        session.add(heartbeats(trial_id=trial))


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """The RUNNING trials whose heartbeat is stale (a storage with a heartbeat)."""
    return storage_of(study)._get_stale_trial_ids(study_id(study))


def forget_cached_trials(study: optuna.Study) -> None:
    """What `Study.ask` does before making a `Trial`: the study's cached trial list is stale;
    and Optuna's storage cache learns the trials written past it (it writes a trial's
    parameters only for trials it knows)."""
    local = getattr(study, "_thread_local", None)
    if local is not None and hasattr(local, "cached_all_trials"):
        local.cached_all_trials = None
    storage = storage_of(study)
    if getattr(storage, "_backend", None) is not None:
        storage.get_all_trials(study_id(study), deepcopy=False, states=())


def drop_study_user_attrs(study: optuna.Study, keys: list[str]) -> bool:
    """Delete these user attributes of `study` (Optuna has no call that deletes one; the tool
    moves its large attributes to system attributes, `studies.tidy_attrs`). False on a storage
    without Optuna's models: the attributes stay."""
    rdb = backend(storage_of(study))
    if rdb is None:
        return False
    table = models().StudyUserAttributeModel
    with transaction(rdb) as session:
        session.query(table).filter(table.study_id == study_id(study), table.key.in_(keys)).delete(
            synchronize_session=False
        )
    return True


def count_trials(study: optuna.Study, states: tuple) -> int | None:
    """How many trials of `study` are in `states`, by one COUNT query; None on a storage
    without Optuna's models (count the trials instead)."""
    from sqlalchemy import func

    rdb = backend(storage_of(study))
    if rdb is None:
        return None
    table = models().TrialModel
    with transaction(rdb) as session:
        return (
            session.query(func.count(table.trial_id))
            .filter(table.study_id == study_id(study), table.state.in_(list(states)))
            .scalar()
        )


def constraint_key(name: str) -> str:
    """The system attribute `Trial.set_constraint(name, ...)` writes."""
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    return f"{_CONSTRAINTS_KEY}:{name}"


def trial_digest(rdb: optuna.storages.RDBStorage) -> dict[str, dict[str, Any]]:
    """Per study name: `states` (TrialState name -> count), `last` (the latest completion or
    start, None without trials) and `values` (each complete trial's first objective value with
    whether it is feasible, i.e. all its `Trial.set_constraint` values at most 0).

    Four queries over the whole store; reads no parameter, intermediate value or attribute
    but the constraints."""
    import datetime
    import json

    import sqlalchemy
    from optuna.study._constrained_optimization import (
        _CONSTRAINTS_KEY,
        _get_constraints_from_system_attrs,
    )

    m = models()
    trial, value, attr = m.TrialModel, m.TrialValueModel, m.TrialSystemAttributeModel
    digest: dict[int, dict[str, Any]] = {}
    with transaction(rdb) as session:
        names = dict(session.query(m.StudyModel.study_id, m.StudyModel.study_name))
        # Optuna 5 keeps UTC in `_datetime_*_utc` and shows local time; earlier ones local only
        utc = hasattr(trial, "_datetime_start_utc")
        when = sqlalchemy.func.coalesce(
            *(
                getattr(trial, f"_{n}_utc" if utc else n)
                for n in ("datetime_complete", "datetime_start")
            )
        )
        for study, state, count, last in session.query(
            trial.study_id, trial.state, sqlalchemy.func.count(), sqlalchemy.func.max(when)
        ).group_by(trial.study_id, trial.state):
            entry = digest.setdefault(study, {"states": {}, "last": None, "values": []})
            entry["states"][state.name] = count
            if last is not None and utc:
                last = last.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)
            if last is not None and (entry["last"] is None or last > entry["last"]):
                entry["last"] = last
        complete = optuna.trial.TrialState.COMPLETE
        constraints: dict[int, dict[str, Any]] = {}
        for trial_id, key, stored in (
            session.query(attr.trial_id, attr.key, attr.value_json)
            .join(trial, trial.trial_id == attr.trial_id)
            .filter(trial.state == complete)
            .filter(
                sqlalchemy.or_(
                    attr.key == _CONSTRAINTS_KEY, attr.key.like(f"{_CONSTRAINTS_KEY}:%")
                )
            )
        ):
            constraints.setdefault(trial_id, {})[key] = json.loads(stored)
        for study, trial_id, stored, kind in (
            session.query(trial.study_id, trial.trial_id, value.value, value.value_type)
            .join(value, value.trial_id == trial.trial_id)
            .filter(trial.state == complete, value.objective == 0)
        ):
            own = _get_constraints_from_system_attrs(constraints.get(trial_id, {}))
            digest[study]["values"].append(
                (value.stored_repr_to_value(stored, kind), all(c <= 0.0 for c in own.values()))
            )
    return {names[study]: entry for study, entry in digest.items()}


def missing() -> list[str]:
    """The internals above that the installed Optuna lacks (empty when all are there)."""
    import importlib

    gone = []
    for module, name in (
        ("optuna.storages._rdb.models", "TrialModel"),
        ("optuna.storages._rdb.models", "StudyModel"),
        ("optuna.storages._rdb.models", "TrialValueModel"),
        ("optuna.storages._rdb.models", "TrialHeartbeatModel"),
        ("optuna.storages._rdb.models", "TrialUserAttributeModel"),
        ("optuna.storages._rdb.models", "TrialSystemAttributeModel"),
        ("optuna.storages._rdb.storage", "_create_scoped_session"),
        ("optuna.study._constrained_optimization", "_CONSTRAINTS_KEY"),
        ("optuna.study._constrained_optimization", "_get_constraints_from_system_attrs"),
    ):
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            gone.append(f"{module}.{name}")
    for name in (*NEEDED, "_get_stale_trial_ids"):
        if not hasattr(optuna.storages.RDBStorage, name) and name != "scoped_session":
            gone.append(f"optuna.storages.RDBStorage.{name}")
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    if not hasattr(storage, "scoped_session"):
        gone.append("optuna.storages.RDBStorage.scoped_session")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=storage)
    finally:
        optuna.logging.set_verbosity(verbosity)
    for owner, name in ((study, "_storage"), (study, "_study_id"), (study, "_thread_local")):
        if not hasattr(owner, name):
            gone.append(f"optuna.Study.{name}")
    if not hasattr(getattr(study, "_storage", None), "_backend"):
        gone.append("optuna.storages._CachedStorage._backend")
    trial = study.ask()
    if not hasattr(trial, "_trial_id"):
        gone.append("optuna.Trial._trial_id")
    study.tell(trial, 0.0)
    if not hasattr(study.trials[0], "_trial_id"):
        gone.append("optuna.trial.FrozenTrial._trial_id")
    if not hasattr(getattr(study, "_thread_local", None), "cached_all_trials"):
        gone.append("optuna.Study._thread_local.cached_all_trials")
    return gone
