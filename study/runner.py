"""Run a named study to a total trial count: create or resume it, refuse conflicting settings.

`run_study("boolean-shallow", trials=20)` is the Python entry point behind `study run`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from search_spaces import get_space
from study.config import BooleanSettings
from study.errors import ConfigError, NonFiniteLossError
from study.objectives import BooleanObjective, PopulationBatch
from study.storage import DEFAULT_STORAGE, open_storage

# heartbeat, retry and grouped TPE are marked experimental; they are used on purpose
warnings.filterwarnings("ignore", category=ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""Trials that count towards a study's total: failed ones (a crash, a NaN) carry no answer."""
SETTINGS_ATTR = "settings"
KIND_ATTR = "kind"


def make_sampler(kind: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """TPE: multivariate and grouped (the deep space is conditional on the layer count);
    constant liar so that parallel workers do not all sample the same point."""
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=8
    )


def boolean_settings(name: str, overrides: Mapping[str, Any] | None = None) -> BooleanSettings:
    """A study's base settings with the given (non-None) overrides applied and validated."""
    space = get_space(name)
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    return space.base_settings().replace(**changes) if changes else space.base_settings()


def check_settings(study: optuna.Study, kind: str, identity: dict[str, Any]) -> None:
    """Store the fixed settings on a new study; refuse to resume one with other settings."""
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(KIND_ATTR, kind)
        study.set_user_attr(SETTINGS_ATTR, identity)
        return
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


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The feasible complete trial with the fewest neurons (None when there is none yet)."""
    try:
        return study.best_trial
    except ValueError:
        return None


def run_study(
    name: str,
    trials: int,
    storage: str = DEFAULT_STORAGE,
    study_name: str | None = None,
    sampler_seed: int | None = None,
    device: str = "auto",
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
    population: int | None = None,
) -> optuna.Study:
    """Create or resume study `study_name` (default: `name`) and run it to `trials` in total.

    Complete and pruned trials count towards `trials`; running it again with the same number
    does nothing new. Fixed settings must match the stored ones. With `population` K, K
    trials are asked at once and trained together (`study.population`).
    """
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials: must be a positive integer, got {trials!r}")
    if population is not None and population < 1:
        raise ConfigError(f"population: must be a positive integer, got {population!r}")
    space = get_space(name)
    fixed = boolean_settings(name, settings)
    if population:
        batch = PopulationBatch(space, fixed, device=device)
    else:
        objective = BooleanObjective(space, fixed, device=device)
    rdb = open_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=rdb,
        study_name=study_name or name,
        direction="minimize",
        sampler=make_sampler(space.KIND, sampler_seed),
        load_if_exists=True,
    )
    check_settings(study, name, fixed.identity())
    remaining = trials - finished_trials(study)
    if remaining <= 0:
        return study
    bar = _progress_bar(study, trials, progress)

    def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(_best_width_text(study))

    try:
        if population:
            # a crashed population leaves RUNNING trials: fail them, re-enqueue their params
            optuna.storages.fail_stale_trials(study)
        # failed trials (a NaN loss, a crash) do not count: go on until the total is reached,
        # but stop when a whole round finished nothing (every trial failing is not progress)
        while (remaining := trials - finished_trials(study)) > 0:
            if population:
                for trial in batch.run(study, min(population, remaining)):
                    on_trial_end(study, trial)
            else:
                study.optimize(
                    objective,
                    callbacks=[
                        optuna.study.MaxTrialsCallback(trials, states=FINISHED),
                        on_trial_end,
                    ],
                    n_trials=remaining,
                    catch=(NonFiniteLossError,),
                )
            if trials - finished_trials(study) == remaining:
                break
    finally:
        if bar is not None:
            bar.close()
    return study


def _progress_bar(study: optuna.Study, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=finished_trials(study), desc=study.study_name, unit="trial")
    bar.set_postfix_str(_best_width_text(study))
    return bar


def _best_width_text(study: optuna.Study) -> str:
    best = best_feasible(study)
    return f"best feasible: {best.user_attrs['neurons']} neurons" if best else "none yet"
