"""Stage 1 of a frontier cell: Optuna's TPE, seeded from the cell, searches the training
recipe (Adam's learning rate, the batch size, the schedule with its warm-up and floor) at a
probe width near the cell's boundary (`study.probe`), on `recipe_seeds` selection seeds per
trial, minimising how far the seeds end from the target (`recipe_score`). The best recipes of
neighbouring cells already answered in the store are its first trials. Several processes each
claim their share of the trials."""

from __future__ import annotations

import math
import os
import statistics

import optuna
from optuna.trial import TrialState

from study import claims, interrupt
from study.answers import (
    FrontierAnswer,
    RankedRecipe,
    Recipe,
    cell_studies,
    stored_answer,
)
from study.boolean_trial import CandidateOutcome
from study.cell_engine import (
    BATCH_SIZES,
    LEARNING_RATES,
    MAX_FLOOR,
    MAX_WARMUP,
    PROBE_ATTR,
    SAMPLER_SEED_ATTR,
    SCHEDULES,
    STARTS_ATTR,
    CellRun,
    Elsewhere,
    Unit,
    cell_seed,
    rate_of,
)
from study.config import FrontierCell
from study.probe import probe_for
from study.studies import store_attr, stored_attrs

NEIGHBOURS = 4
"""Recipes of neighbouring cells enqueued as a recipe search's first trials."""


def recipe_score(outcome: CandidateOutcome, budget: int) -> float:
    """How far a recipe leaves its seeds from the target (lower is better): per seed, the
    decades its best loss stayed above the target, minus a bonus for reaching it early."""
    scores = []
    for run in outcome.runs:
        missed = max(0.0, math.log10(max(run.best_loss, 1e-12) / outcome.target_loss))
        early = 0.5 * (1.0 - run.result.epochs_run / budget) if run.learned else 0.0
        scores.append(missed - early)
    scores += [3.0] * (outcome.seeds_planned - len(outcome.runs))  # seeds never trained
    return statistics.mean(scores)


def neighbour_answers(storage, cell: FrontierCell) -> list[FrontierAnswer]:
    """The answers of the store's other cells, nearest first (same function, then the same
    depth, then the closest budget, then the closest depth)."""
    found = []
    for name in cell_studies(storage):
        if name == cell.name:
            continue
        answer = stored_answer(optuna.load_study(study_name=name, storage=storage))
        if answer is not None:
            found.append(answer)

    def distance(a: FrontierAnswer) -> tuple:
        return (
            a.cell.function_seed != cell.function_seed,
            abs(math.log2(a.cell.budget / cell.budget)) + abs(a.cell.depth - cell.depth),
            a.cell.depth != cell.depth,
            a.cell.name,
        )

    return sorted(found, key=distance)


def begin(run: CellRun, study: optuna.Study) -> None:
    """Once per cell, under the claim lock: the probe width, the sampler's seed and the
    neighbouring cells' recipes (enqueued as the first trials), stored with the study."""
    if STARTS_ATTR in stored_attrs(study):
        return
    known = neighbour_answers(run.storage, run.cell)
    if PROBE_ATTR not in stored_attrs(study):
        store_attr(study, PROBE_ATTR, run.plan.probe_neurons or probe_for(run.cell, known))
    store_attr(study, SAMPLER_SEED_ATTR, cell_seed(run.cell))
    starts = []
    for answer in known:
        if answer.recipe not in [r for _, r in starts] and len(starts) < NEIGHBOURS:
            starts.append((answer.cell.name, answer.recipe))
    for _, recipe in starts:
        study.enqueue_trial(recipe.search_params(), skip_if_exists=True)
    store_attr(study, STARTS_ATTR, [{"cell": name, "recipe": r.params()} for name, r in starts])
    if starts:
        run.log(
            f"{run.cell.name}: recipe search starts from "
            + "; ".join(f"{name}'s {r.describe()}" for name, r in starts)
        )


def search(run: CellRun) -> Recipe:
    """Optuna's TPE over the recipe at the probe width, to `plan.recipe_trials`; several
    processes each claim their share of the trials."""
    study, total = run.recipes, run.plan.recipe_trials
    rounds = max(1, (os.cpu_count() or 1) * 4)  # recipes trained together
    while True:
        with interrupt.held(), claims.claim_lock(run.url, run.storage, study.study_name):
            begin(run, study)
            claims.reap(study)
            free = total - claims.claimed(study)
            asked = claims.claim(study, min(rounds, free)) if free > 0 else []
        if asked:
            _train(run, asked)
        elif claims.count(study, (TrialState.COMPLETE,)) >= total:
            break
        else:
            raise Elsewhere(study.study_name)
    best = study.best_trial
    run.log(
        f"{run.cell.name}: recipe {Recipe.from_params(best.params).describe()} (score "
        f"{best.value:.3f} at {best.user_attrs.get('probe_neurons', run.probe)} neurons)"
    )
    return Recipe.from_params(best.params)


def ranked(run: CellRun, count: int = 3) -> tuple[RankedRecipe, ...]:
    """The recipe search's best `count` recipes, best first."""
    done = run.recipes.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = sorted(done, key=lambda t: (t.value, t.number))[:count]
    return tuple(
        RankedRecipe(
            Recipe.from_params(t.params),
            float(t.value),
            *rate_of(t),
            int(t.user_attrs.get("probe_neurons", run.probe)),
        )
        for t in best
    )


def _train(run: CellRun, asked: list[optuna.Trial]) -> None:
    seeds = run.seeds("recipe", run.plan.recipe_seeds)
    units = []
    try:
        for trial in asked:
            schedule = trial.suggest_categorical("lr_schedule", list(SCHEDULES))
            recipe = Recipe(
                trial.suggest_float("learning_rate", *LEARNING_RATES, log=True),
                trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
                schedule,
                trial.suggest_float("warmup_fraction", 0.0, MAX_WARMUP),
                0.0 if schedule == "constant" else trial.suggest_float("lr_floor", 0.0, MAX_FLOOR),
            )
            units.append(Unit("recipe", run.probe, recipe, seeds))
    except BaseException as error:  # a stop while sampling: the claimed trials are failed
        claims.abandon(run.recipes, asked, error)
        raise
    outcomes = claims.train_claimed(run.recipes, asked, run.train, units)
    for trial, outcome in zip(asked, outcomes, strict=True):
        run.store(trial, outcome)
        trial.set_user_attr("probe_neurons", run.probe)
        run.recipes.tell(trial, recipe_score(outcome, run.cell.budget))
