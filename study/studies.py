"""What a stored study is: its search space, its kind and its typed settings.

The one place that writes and reads these study attributes. `study run` binds a new study to
its space and settings (`bind`); every command that reads a study (`report`, `certify`,
`export`, the notebooks) gets them back typed from `describe`, or refuses in one line a study
of the wrong kind (`load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from search_spaces import SPACES, get_space
from study.config import SETTINGS_OF_KIND, BooleanSettings, ImageSettings
from study.errors import ConfigError, StorageError
from study.storage import load_study, open_storage

SPACE_ATTR = "space"
"""Study user attribute: the search space's name (boolean-shallow, fashion-cnn, ...)."""
KIND_ATTR = "kind"
"""Study user attribute: boolean or image. (Stores written before `space` existed kept the
space's name here; `describe` reads both.)"""
SETTINGS_ATTR = "settings"
"""Study user attribute: the fixed settings, as `Settings.identity()` writes them."""

CERTIFICATION_ATTR = "certification"
"""Study user attribute: the last `study certify` of a Boolean study (its table, command)."""
EXPORT_ATTR = "export"
"""Study user attribute: the last `study export` of an image study (test accuracy, ...)."""

KINDS = {"boolean": "a Boolean width study", "image": "an image study"}
PLURALS = {"boolean": "Boolean width studies", "image": "image studies"}
COMMANDS = {
    "boolean": "`study certify` retrains its answer on fresh seeds",
    "image": "`study export` retrains its best configuration and tests it; `study predict` "
    "uses the export",
}

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""Trials that count towards a study's total: failed ones (a crash, a NaN) carry no answer."""


@dataclass(frozen=True)
class StudyInfo:
    """A stored study's identity, typed."""

    name: str
    """The study's name in the storage."""
    space: str
    """Its search space (a key of `search_spaces.SPACES`)."""
    kind: str
    """boolean or image."""
    settings: BooleanSettings | ImageSettings
    """Its fixed settings."""


def _space_and_kind(study: optuna.Study) -> tuple[str, str]:
    attrs = study.user_attrs
    if "frontier" in attrs or study.study_name.startswith("frontier-"):
        raise StorageError(
            f"study {study.study_name!r} is a cell of the budget frontier; "
            "`study frontier report` reports the frontier"
        )
    space = attrs.get(SPACE_ATTR)
    if space is None and attrs.get(KIND_ATTR) in SPACES:
        space = attrs[KIND_ATTR]  # a store written before the `space` attribute existed
    if space not in SPACES:
        raise StorageError(
            f"study {study.study_name!r} was not made by this tool (no known search space "
            f"stored with it; spaces: {', '.join(SPACES)})"
        )
    return space, get_space(space).KIND


def kind_of(study: optuna.Study) -> str | None:
    """boolean or image for a study of this tool, None for any other study in the store."""
    try:
        return _space_and_kind(study)[1]
    except StorageError:
        return None


def describe(study: optuna.Study) -> StudyInfo:
    """The space, kind and typed settings stored with `study`."""
    space, kind = _space_and_kind(study)
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        raise StorageError(f"study {study.study_name!r} has no stored settings")
    return StudyInfo(study.study_name, space, kind, SETTINGS_OF_KIND[kind].from_dict(stored))


def wrong_kind(name: str, space: str, kind: str, command: str, wanted: str) -> ConfigError:
    """One line: what the study is, and which command fits it."""
    return ConfigError(
        f"study {name!r} is {KINDS[kind]} ({space}), not {KINDS[wanted]}: "
        f"`study {command}` is for {PLURALS[wanted]}; {COMMANDS[kind]}"
    )


def load(
    name: str, storage: str, kind: str | None = None, command: str = ""
) -> tuple[optuna.Study, StudyInfo]:
    """Open study `name` read-only (no heartbeat) and describe it; with `kind`, refuse in one
    line a study of another kind, naming the command that fits it."""
    study = load_study(name, open_storage(storage, heartbeat=False))
    space, actual = _space_and_kind(study)
    if kind is not None and actual != kind:
        raise wrong_kind(name, space, actual, command, kind)
    return study, describe(study)


def bind(study: optuna.Study, space: str, settings: BooleanSettings | ImageSettings) -> None:
    """Store space, kind and settings on a new study; refuse to resume one with other
    settings (a study never mixes settings)."""
    identity: dict[str, Any] = settings.identity()
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, space)
        study.set_user_attr(KIND_ATTR, get_space(space).KIND)
        study.set_user_attr(SETTINGS_ATTR, identity)
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
    if study.user_attrs.get(SPACE_ATTR) is None:  # a store written before `space` existed
        study.set_user_attr(SPACE_ATTR, space)
        study.set_user_attr(KIND_ATTR, get_space(space).KIND)


def finished_trials(study: optuna.Study) -> int:
    """Complete and pruned trials: what counts towards a study's total."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial (None when there is none yet): for Boolean studies the feasible
    one with the fewest neurons, for image studies the highest validation accuracy."""
    try:
        return study.best_trial
    except ValueError:
        return None
