"""What a stored study is: its search space, its kind and its typed settings.

The one place that writes and reads these study attributes. `study run` binds a new study to
its space and settings (`bind`), `study frontier run` binds a frontier cell to its cell and
plan (`bind_cell`); every command that reads a study (`report`, `certify`, `export`, `best`,
`list`, the notebooks) gets them back typed from `describe`, or refuses in one line a study of
the wrong kind (`load`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import optuna
from optuna.trial import TrialState

import search_spaces
from search_spaces import get_space
from study.config import (
    SETTINGS_OF_KIND,
    BooleanSettings,
    FrontierCell,
    FrontierPlan,
    ImageSettings,
)
from study.errors import ConfigError, StorageError
from study.storage import load_study, open_storage

SPACE_ATTR = "space"
"""Study user attribute: the search space's name (boolean-shallow, fashion-cnn, ...)."""
KIND_ATTR = "kind"
"""Study user attribute: boolean or image. (Stores written before `space` existed kept the
space's name here; `describe` reads both.)"""
SETTINGS_ATTR = "settings"
"""Study user attribute: the fixed settings, as `Settings.identity()` writes them."""
SOURCE_ATTR = "space_source"
"""Where the study's space came from (`search_spaces.source_of`): a module or a file."""

CERTIFICATION_ATTR = "certification"
"""Study user attribute: the last `study certify` of a Boolean study (its table, command)."""
RUNS_ATTR = "runs"
"""Study user attribute: one record per `study run` that trained something (when it started,
its wall seconds, trials finished before and after, its time budget)."""
BASELINE_EXPORT_ATTR = "export_baseline"
"""Study user attribute: the export of the study's enqueued baseline (`study export
--baseline`), what the search is measured against on the test set."""
EXPORT_ATTR = "export"
"""Study user attribute: the last `study export` of an image study (test accuracy, ...)."""

FRONTIER_ATTR = "frontier"
"""Study user attribute of a frontier cell's two studies (the cell and its recipe search): the
cell, as `FrontierCell.identity()` writes it."""
PLAN_ATTR = "plan"
"""Study user attribute of a frontier cell: its plan (`FrontierPlan.identity()`)."""
ANSWER_ATTR = "answer"
"""Study user attribute of a frontier cell: its confirmed answer (`FrontierAnswer`)."""
FRONTIER_NAME = re.compile(r"^frontier-f(\d+)-d(\d+)-b(\d+)(-recipe)?$")
"""The names of a cell's studies (stores written before `frontier` was stored on both)."""

SUMMARY_ATTRS = (SPACE_ATTR, KIND_ATTR)
"""What stays a study *user* attribute: short, so that `optuna studies` (which prints every
user attribute in its row) and optuna-dashboard show a readable row. Everything else the tool
stores with a study (settings, plans, answers, runs, exports) is a study *system* attribute
under the same key; stores written before kept them as user attributes, and `stored_attrs`
reads both."""


def stored_attrs(study: Any) -> dict[str, Any]:
    """Every attribute the tool stored with a study (an `optuna.Study` or the frozen studies
    of `storage.get_all_studies()`): its system attributes over its user attributes (where
    stores written before 2026-12-08 kept them all)."""
    system = getattr(study, "system_attrs", None)  # a frozen study carries them
    if system is None:
        from study import rdb

        system = rdb.storage_of(study).get_study_system_attrs(rdb.study_id(study))
    return {**study.user_attrs, **system}


def store_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Store `value` under `key` with the study: a user attribute for the short ones
    (`SUMMARY_ATTRS`), else a system attribute."""
    if key in SUMMARY_ATTRS:
        study.set_user_attr(key, value)
    else:
        from study import rdb

        rdb.storage_of(study).set_study_system_attr(rdb.study_id(study), key, value)


MOVED_ATTRS = (
    "settings", "space_source", "certification", "runs", "export_baseline", "export",
    "frontier", "plan", "answer", "no_answer", "run", "sampler_seed", "plans",
    "probe_neurons", "starting_points",
)  # fmt: skip
"""The tool's study attributes that stores written before 2026-12-08 kept as user attributes;
`tidy_attrs` moves them (a user's own attributes stay where they are)."""


def tidy_attrs(study: optuna.Study) -> None:
    """Move the tool's large attributes of a study written before 2026-12-08 from its user
    attributes to its system attributes, so that `optuna studies` shows a short row. Only
    commands that write call it; on a storage without Optuna's models the copies are made
    and the old user attributes stay (reads prefer the system ones)."""
    from study import rdb

    old = {k: v for k, v in study.user_attrs.items() if k in MOVED_ATTRS}
    if not old:
        return
    storage, sid = rdb.storage_of(study), rdb.study_id(study)
    system = storage.get_study_system_attrs(sid)
    for key, value in old.items():
        if key not in system:
            storage.set_study_system_attr(sid, key, value)
    rdb.drop_study_user_attrs(study, sorted(old))


KINDS = {
    "boolean": "a Boolean width study",
    "image": "an image study",
    "frontier": "a study of the budget frontier",
}
PLURALS = {
    "boolean": "Boolean width studies",
    "image": "image studies",
    "frontier": "the budget frontier",
}
COMMANDS = {
    "boolean": "`study certify` retrains its answer on fresh seeds",
    "image": "`study export` retrains its best configuration and tests it; `study predict` "
    "uses the export",
    "frontier": "`study frontier report` reports the frontier and `study best` a cell's answer",
}

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""Trials that count towards a study's total: failed ones (a crash, a NaN) carry no answer."""


@dataclass(frozen=True)
class StudyInfo:
    """A stored study's identity, typed."""

    name: str
    """The study's name in the storage."""
    space: str
    """Its search space (a study name of `search_spaces`; "frontier" for a frontier cell)."""
    kind: str
    """boolean, image or frontier."""
    settings: BooleanSettings | ImageSettings | FrontierCell
    """Its fixed settings (a frontier study: its cell)."""


def frontier_cell(study: optuna.Study) -> FrontierCell | None:
    """The cell of a frontier study (the cell's own or its recipe search), else None."""
    stored = stored_attrs(study).get(FRONTIER_ATTR)
    if stored is not None:
        return FrontierCell.from_dict(stored)
    match = FRONTIER_NAME.match(study.study_name)
    if match is None:
        return None
    seed, depth, budget = (int(g) for g in match.groups()[:3])
    return FrontierCell(seed, depth, budget)


def _space_and_kind(study: optuna.Study) -> tuple[str, str]:
    attrs = stored_attrs(study)
    if frontier_cell(study) is not None:
        return "frontier", "frontier"
    space = attrs.get(SPACE_ATTR)
    if space is None and attrs.get(KIND_ATTR) in search_spaces.builtin():
        space = attrs[KIND_ATTR]  # a store written before the `space` attribute existed
    known = space in search_spaces.names() or SOURCE_ATTR in attrs
    if not isinstance(space, str) or not known:
        raise StorageError(
            f"study {study.study_name!r} was not made by this tool (no known search space "
            f"stored with it; spaces: {', '.join(search_spaces.names())})"
        )
    kind = attrs.get(KIND_ATTR)
    if kind not in search_spaces.DIRECTIONS:
        kind = search_spaces.from_source(space, attrs.get(SOURCE_ATTR)).KIND
    return space, kind


def space_of(study: optuna.Study):
    """The space module of a study of this tool, also one whose space came from a file."""
    return search_spaces.from_source(
        (attrs := stored_attrs(study))[SPACE_ATTR], attrs.get(SOURCE_ATTR)
    )


def kind_of(study: optuna.Study) -> str | None:
    """boolean or image for a study of this tool, None for any other study in the store."""
    try:
        return _space_and_kind(study)[1]
    except StorageError:
        return None


def describe(study: optuna.Study) -> StudyInfo:
    """The space, kind and typed settings stored with `study`."""
    space, kind = _space_and_kind(study)
    cell = frontier_cell(study)
    if cell is not None:
        return StudyInfo(study.study_name, space, kind, cell)
    stored = stored_attrs(study).get(SETTINGS_ATTR)
    if stored is None:
        raise StorageError(f"study {study.study_name!r} has no stored settings")
    return StudyInfo(study.study_name, space, kind, SETTINGS_OF_KIND[kind].from_dict(stored))


def wrong_kind(
    name: str, space: str, kind: str, command: str, wanted: tuple[str, ...]
) -> ConfigError:
    """One line: what the study is, and which command fits it."""
    return ConfigError(
        f"study {name!r} is {KINDS[kind]} ({space}), not "
        f"{' or '.join(KINDS[w] for w in wanted)}: `study {command}` is for "
        f"{' and '.join(PLURALS[w] for w in wanted)}; {COMMANDS[kind]}"
    )


def load(
    name: str, storage: str, kind: str | tuple[str, ...] | None = None, command: str = ""
) -> tuple[optuna.Study, StudyInfo]:
    """Open study `name` read-only (no heartbeat) and describe it; with `kind` (one or
    several), refuse in one line a study of another kind, naming the command that fits it."""
    study = load_study(name, open_storage(storage, heartbeat=False))
    space, actual = _space_and_kind(study)
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted is not None and actual not in wanted:
        raise wrong_kind(name, space, actual, command, wanted)
    return study, describe(study)


def bind(
    study: optuna.Study,
    space: str | ModuleType,
    settings: BooleanSettings | ImageSettings,
    source: Mapping[str, Any] | None = None,
) -> None:
    """Store space (a name or the module), its source, kind and settings on a new study;
    refuse to resume one with other settings (a study never mixes settings)."""
    module = get_space(space) if isinstance(space, str) else space
    space, kind = module.NAME, module.KIND
    identity: dict[str, Any] = settings.identity()
    stored = stored_attrs(study).get(SETTINGS_ATTR)
    if stored is not None:
        stored = type(settings).upgrade(stored)  # a field renamed since it was stored
    if stored is None:  # the settings last: a study without them is not bound yet
        store_attr(study, SPACE_ATTR, space)
        if source:
            store_attr(study, SOURCE_ATTR, dict(source))
        store_attr(study, KIND_ATTR, kind)
        store_attr(study, SETTINGS_ATTR, identity)
        return
    stored_space, _ = _space_and_kind(study)
    if stored_space != space:
        raise ConfigError(
            f"study {study.study_name!r} exists as a {stored_space} study, not {space}; "
            "use another --study-name"
        )
    conflicts = [
        f"{key}={identity.get(key)!r} (stored {stored.get(key)!r})"
        for key in sorted(set(stored) | set(identity))
        if stored.get(key) != identity.get(key)
    ]
    if conflicts:
        raise ConfigError(
            f"study {study.study_name!r} exists with other fixed settings: "
            f"{', '.join(conflicts)}; use the stored settings or another --study-name"
        )
    if stored_attrs(study).get(SPACE_ATTR) is None:  # a store written before `space` existed
        store_attr(study, SPACE_ATTR, space)
        store_attr(study, KIND_ATTR, kind)
    tidy_attrs(study)


def bind_cell(study: optuna.Study, cell: FrontierCell, plan: FrontierPlan | None) -> None:
    """Store the cell (and, on the cell's own study, its plan) on a new frontier study. A study
    that has them already is not written (`cell_plan` refused any conflict before)."""
    tidy_attrs(study)
    if FRONTIER_ATTR not in stored_attrs(study):
        store_attr(study, FRONTIER_ATTR, cell.identity())
    if plan is not None and PLAN_ATTR not in stored_attrs(study):
        store_attr(study, PLAN_ATTR, plan.identity())


def cell_plan(study: optuna.Study | None, overrides: Mapping[str, Any]) -> FrontierPlan:
    """The plan a cell runs with: the stored one or, for a new cell, the defaults, with the
    given `overrides`; one that contradicts a stored plan, or a cell of the earlier method, is
    refused in one line."""
    stored = None if study is None else stored_attrs(study).get(PLAN_ATTR)
    if stored is None and (study is None or not study.get_trials(deepcopy=False)):
        return FrontierPlan.from_dict(overrides)  # a new cell
    if stored is None or "method" not in stored:
        assert study is not None
        raise ConfigError(
            f"frontier cell {study.study_name!r} was answered by the earlier method (blocks of "
            "24 seeds, no fitted curve); its stored answer stays readable with Optuna, but this "
            "version answers cells afresh: use another --storage"
        )
    base = FrontierPlan.from_dict(stored)
    conflicts = [
        f"{key}={value!r} (stored {getattr(base, key)!r})"
        for key, value in sorted(overrides.items())
        if getattr(base, key) != value
    ]
    if conflicts:
        assert study is not None
        raise ConfigError(
            f"frontier cell {study.study_name!r} exists with another plan: "
            f"{', '.join(conflicts)}; leave those flags out to use the stored plan, or use "
            "another --storage"
        )
    return base


def run_seconds(study: optuna.Study) -> float | None:
    """Wall time the study's runs spent (as `study run` records them), None when unknown."""
    runs = stored_attrs(study).get(RUNS_ATTR)
    return round(sum(r["seconds"] for r in runs), 1) if runs else None


def finished_trials(study: optuna.Study) -> int:
    """Complete and pruned trials: what counts towards a study's total."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """An image study's enqueued baseline, once complete (None before); in a planned study,
    where it may have climbed rungs, the one trained for the most epochs."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    runs = [t for t in complete if t.user_attrs.get("baseline")]
    return max(runs, key=lambda t: t.user_attrs["config"]["train"]["epochs"], default=None)


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial (None when there is none yet): for Boolean studies the feasible
    one with the fewest neurons, for image studies the highest validation accuracy."""
    try:
        return study.best_trial
    except ValueError:
        return None
