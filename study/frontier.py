"""The budget frontier: the fewest hidden neurons that learn f under an epoch budget.

Success is close to monotone in width for a fixed training recipe, so each cell (function
seed, depth, epoch budget; `FrontierCell`) is answered in four stages, every evaluation stored
as a trial:

1. **recipe**: Optuna (TPE) searches Adam's learning rate, the batch size (up to the full
   table) and the schedule (constant or cosine) at a probe width, on `recipe_seeds` selection
   seeds per trial, minimising how far the seeds end from the target (study `<cell>-recipe`);
2. **width**: with the best recipe, a k-ary search over the total hidden neurons finds the
   fewest that learn f on at least `required_rate` of `selection_seeds` selection seeds
   (study `<cell>`, stage "width");
3. **held-out choice**: that width and the next smaller one are trained on `heldout_seeds`
   seeds that played no part in 1 or 2 (stage "heldout"). The chosen width passes there
   (rate at least `required_rate`) while the next smaller one fails; a width that fails moves
   up by one neuron, one whose smaller neighbour also passes moves down, each move on a fresh
   block of held-out seeds;
4. **confirmation**: the chosen width is trained once more on a fresh block of
   `heldout_seeds` seeds (stage "confirm"). The answer (`FrontierAnswer`) is stated with the
   rate of this block and its exact 95% interval: a block that played no part in choosing the
   width. A width that fails its confirmation is not stated; the next larger width goes
   through 3 and 4 again on fresh blocks.

A deep cell spreads its neurons evenly over `depth` layers (the first layers take the
remainder). Everything resumes: an evaluation already stored is read back, not retrained.
Every evaluation is claimed before it is trained, as `study run` claims its trials
(`study.claims`: a RUNNING trial with its owner and heartbeat, under the store's claim lock),
so that several processes on one store divide the work: a process that finds a cell's next
evaluations running elsewhere moves on to another cell and comes back (`run_frontier`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from study import claims, interrupt
from study.boolean_trial import BooleanTrial, CandidateOutcome, train_together
from study.config import (
    MAX_FRONTIER_NEURONS,
    BooleanCandidate,
    BooleanSettings,
    FrontierCell,
    FrontierGrid,
    FrontierPlan,
    mlp_parameters,
)
from study.errors import ConfigError
from study.storage import open_storage, study_names
from study.studies import ANSWER_ATTR, FRONTIER_NAME, PLAN_ATTR, bind_cell, cell_plan

SELECTION_SEED = 2_000_000
"""Selection seeds (recipe and width stages) are SELECTION_SEED + i."""
HELDOUT_SEED = 3_000_000
"""Held-out block j is HELDOUT_SEED + j * HELDOUT_BLOCK + i: never a selection seed."""
HELDOUT_BLOCK = 10_000
CONFIRM_BLOCK = 100
"""Confirmation blocks are CONFIRM_BLOCK, CONFIRM_BLOCK + 1, ...: apart from choice blocks."""
CHOICE_BLOCKS = 8
"""Held-out blocks one choice (stage 3) may use; a later choice starts after them."""
ATTEMPTS = 4
"""Widths that may fail their confirmation before a cell gives up."""
LEARNING_RATES = (1e-3, 1e-1)
"""Adam's learning-rate range of the recipe search (log scale)."""
BATCH_SIZES = (8, 16, 32, 64, 128, 256)
"""Batch sizes of the recipe search, up to the full 256-row table."""
SCHEDULES = ("constant", "cosine")
MAX_NEURONS = MAX_FRONTIER_NEURONS
STATED = "stated"
"""The constraint of a cell's evaluations (`stated_constraint`): Optuna's best trial of a cell
(the fewest neurons among feasible trials, what `optuna best-trial`, `load_study().best_trial`
and optuna-dashboard show) is then the confirmation of the stated width."""
STAGE_ATTR = "stage"
POLL_SECONDS = 1.0
"""How often a process whose remaining cells all wait on other processes looks again."""
Log = Callable[[str], None]


def probe_for(cell: FrontierCell) -> int:
    """A probe width near where the boundary is expected: slightly above the capacity
    estimate (2048 random bits at ~2 bits per parameter: ~60 neurons in one layer) for long
    budgets, wider for short ones. The recipe search ranks recipes by how close they bring
    this width to the target, so it should be hard but not hopeless."""
    return {500: 110, 1000: 96, 2000: 84, 4000: 74}.get(
        cell.budget, 64 if cell.budget < 16000 else 60
    )


@dataclass(frozen=True)
class Recipe:
    """The training of a cell: Adam's rate, the batch size and the schedule."""

    learning_rate: float
    batch_size: int
    lr_schedule: str

    def params(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "lr_schedule": self.lr_schedule,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Recipe:
        return cls(
            float(params["learning_rate"]), int(params["batch_size"]), str(params["lr_schedule"])
        )


DISTRIBUTIONS = {
    "neurons": IntDistribution(1, MAX_NEURONS),
    "learning_rate": FloatDistribution(*LEARNING_RATES, log=True),
    "batch_size": CategoricalDistribution(list(BATCH_SIZES)),
    "lr_schedule": CategoricalDistribution(list(SCHEDULES)),
}


def exact_interval(successes: int, seeds: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial rate: conservative, and defined at
    0/n and n/n."""
    from scipy.stats import binomtest

    interval = binomtest(successes, seeds).proportion_ci(confidence, method="exact")
    return float(interval.low), float(interval.high)


# ----------------------------------------------------------------------------------------------
# the answer of a cell, typed: what the report, answers.json, `study best` and notebooks read


@dataclass(frozen=True)
class BlockRate:
    """Successes out of the seeds of one block of held-out seeds."""

    block: int
    successes: int
    seeds: int

    @property
    def first_seed(self) -> int:
        return HELDOUT_SEED + self.block * HELDOUT_BLOCK

    @property
    def interval(self) -> tuple[float, float]:
        """The exact 95% interval of the rate."""
        return exact_interval(self.successes, self.seeds)

    def fields(self) -> dict[str, Any]:
        low, high = self.interval
        return {
            "heldout_successes": self.successes,
            "heldout_seeds": self.seeds,
            "interval_95": [round(low, 4), round(high, 4)],
            "heldout_block": self.block,
            "heldout_first_seed": self.first_seed,
        }

    @classmethod
    def from_fields(cls, values: Mapping[str, Any], block_key: str = "heldout_block"):
        return cls(values[block_key], values["heldout_successes"], values["heldout_seeds"])


@dataclass(frozen=True)
class Width:
    """A width of a cell and its rate on one held-out block."""

    profile: tuple[int, ...]
    parameters: int
    rate: BlockRate

    @property
    def neurons(self) -> int:
        return sum(self.profile)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": list(self.profile),
            "neurons": self.neurons,
            "parameters": self.parameters,
            **self.rate.fields(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Width:
        return cls(tuple(values["profile"]), values["parameters"], BlockRate.from_fields(values))


@dataclass(frozen=True)
class Pooled:
    """Every held-out seed (choice and confirmation blocks) a width was trained on."""

    successes: int
    seeds: int
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Choice:
    """Stage 3's result: a width that passed on its block, and the next smaller one there (or
    on the fresh block where it failed after passing on the choice block)."""

    width: Width
    next_smaller: Width | None
    next_smaller_fresh_block: BlockRate | None = None


@dataclass(frozen=True)
class FrontierAnswer:
    """A cell's stated answer: the width, its rate on the confirmation block, and the evidence
    behind it. `to_dict` is the answers.json entry (and the stored `answer` attribute)."""

    cell: FrontierCell
    width: Width
    """The stated width and its rate on the confirmation block (chose nothing)."""
    recipe: Recipe
    target_loss: float
    table_bits: int
    choice: Choice
    """The block that chose the width, and the next smaller width's rate."""
    all_heldout: Pooled

    @property
    def neurons(self) -> int:
        return self.width.neurons

    @property
    def parameters(self) -> int:
        return self.width.parameters

    @property
    def rate(self) -> BlockRate:
        return self.width.rate

    def to_dict(self) -> dict[str, Any]:
        fresh = self.choice.next_smaller_fresh_block
        smaller = self.choice.next_smaller
        chosen = self.choice.width.rate
        return {
            "study": self.cell.name,
            "function_seed": self.cell.function_seed,
            "depth": self.cell.depth,
            "budget_epochs": self.cell.budget,
            **self.width.to_dict(),
            "recipe": self.recipe.params(),
            "target_loss": self.target_loss,
            "table_bits": self.table_bits,
            "next_smaller": smaller.to_dict() if smaller is not None else None,
            **(
                {
                    "next_smaller_fresh_block": {
                        "block": fresh.block,
                        "heldout_successes": fresh.successes,
                        "heldout_seeds": fresh.seeds,
                    }
                }
                if fresh is not None
                else {}
            ),
            "chosen_on": {
                "heldout_block": chosen.block,
                "heldout_successes": chosen.successes,
                "heldout_seeds": chosen.seeds,
            },
            "all_heldout": {
                "heldout_successes": self.all_heldout.successes,
                "heldout_seeds": self.all_heldout.seeds,
                "blocks": list(self.all_heldout.blocks),
            },
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FrontierAnswer:
        cell = FrontierCell(values["function_seed"], values["depth"], values["budget_epochs"])
        width = Width.from_dict(values)
        smaller = values.get("next_smaller")
        fresh = values.get("next_smaller_fresh_block")
        chosen = BlockRate.from_fields(values["chosen_on"])
        # the choice block's rate of the stated width: its successes there, same profile
        choice = Choice(
            Width(width.profile, width.parameters, chosen),
            Width.from_dict(smaller) if smaller else None,
            BlockRate.from_fields(fresh, "block") if fresh else None,
        )
        pooled = values["all_heldout"]
        return cls(
            cell,
            width,
            Recipe.from_params(values["recipe"]),
            values["target_loss"],
            values["table_bits"],
            choice,
            Pooled(pooled["heldout_successes"], pooled["heldout_seeds"], tuple(pooled["blocks"])),
        )


def stated_constraint(stage: str, successes: int, required: int) -> float:
    """<= 0 only for a confirmation block its width passed: the evaluation an answer is stated
    from (confirmations run in increasing width, and the first that passes is the answer)."""
    return float(required - successes) if stage == "confirm" else 1.0


def align_with_optuna(storage) -> int:
    """Give the evaluations of frontier cells stored before `STATED` existed (value: their
    success share, no constraint) their value (neurons) and constraint, so that plain Optuna
    tools name the stated width as a cell's best; one transaction per cell. Returns how many
    evaluations changed. Touches nothing else."""
    from optuna.storages._rdb import models

    backend = claims._rdb(storage)
    if backend is None:
        return 0
    changed = 0
    for name in study_names(storage):
        match = FRONTIER_NAME.match(name)
        if match is None or match.group(4):  # not a cell, or its recipe search (consistent)
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        plan = FrontierPlan.from_dict(study.user_attrs.get(PLAN_ATTR) or {})
        old = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if f"constraints:{STATED}" not in t.system_attrs
        ]
        if not old:
            continue
        with claims._transaction(backend) as session:
            for t in old:
                attrs = t.user_attrs
                value = stated_constraint(
                    attrs.get(STAGE_ATTR, ""),
                    attrs["successes"],
                    plan.required(attrs["seeds_planned"]),
                )
                session.query(models.TrialValueModel).filter(
                    models.TrialValueModel.trial_id == t._trial_id
                ).update({"value": float(t.params["neurons"])})
                session.add(  # a finished trial: Optuna's own setter refuses it
                    models.TrialSystemAttributeModel(
                        trial_id=t._trial_id,
                        key=f"constraints:{STATED}",
                        value_json=json.dumps(value),
                    )
                )
                changed += 1
    return changed


def stored_answer(study: optuna.Study) -> FrontierAnswer | None:
    """The confirmed answer stored with a cell (None until a width is confirmed: a run that
    stopped between choosing and confirming states nothing)."""
    stored = study.user_attrs.get(ANSWER_ATTR)
    if stored is None or "chosen_on" not in stored:
        return None
    return FrontierAnswer.from_dict(stored)


# ----------------------------------------------------------------------------------------------
# evaluations: a width and a recipe trained on a list of seeds, stored as a trial


@dataclass(frozen=True)
class Unit:
    """An evaluation to make: `neurons` with `recipe` on `seeds` (stage and block recorded)."""

    stage: str
    neurons: int
    recipe: Recipe
    seeds: tuple[int, ...]
    block: int = 0
    prune: bool = True
    """Stop a seed once the target is out of reach within the budget (`TargetUnreachable`)."""
    decisive: bool = False
    """Stop the other seeds once the required share is reached or out of reach."""

    @property
    def key(self) -> tuple:
        return (self.stage, self.neurons, self.recipe, self.block)


def _key(trial: FrozenTrial) -> tuple:
    """The `Unit.key` of a stored evaluation."""
    attrs = trial.user_attrs
    recipe = Recipe.from_params(trial.params)
    return (attrs.get(STAGE_ATTR), trial.params.get("neurons"), recipe, attrs.get("block"))


def _rate(trial: FrozenTrial) -> tuple[int, int]:
    return trial.user_attrs["successes"], trial.user_attrs["seeds_planned"]


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


class Elsewhere(Exception):
    """The cell's next evaluations run in another process: nothing for this one to train."""


# ----------------------------------------------------------------------------------------------
# one cell


class CellRun:
    """One cell on a store: its two studies, its plan, and the four stages."""

    def __init__(
        self,
        url: str,
        storage: optuna.storages.BaseStorage,
        cell: FrontierCell,
        plan: FrontierPlan,
        settings: BooleanSettings,
        threads: int,
        log: Log,
    ) -> None:
        from study.data import boolean_function

        self.url, self.storage, self.cell, self.plan = url, storage, cell, plan
        self.settings = replace(
            settings, function_seed=cell.function_seed, required_share=plan.required_rate
        )
        self.threads, self.log = threads, log
        self.fn = boolean_function(
            self.settings.input_bits, cell.function_seed, self.settings.output_bits
        )
        self.recipes = optuna.create_study(
            storage=storage,
            study_name=cell.recipe_name,
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=6, constant_liar=True),
            load_if_exists=True,
        )
        self.study = optuna.create_study(
            storage=storage, study_name=cell.name, load_if_exists=True
        )
        bind_cell(self.recipes, cell, None)
        bind_cell(self.study, cell, plan)
        self.trained = 0
        """Evaluations this process trained (how `run_frontier` sees progress)."""

    @property
    def probe(self) -> int:
        return self.plan.probe_neurons or probe_for(self.cell)

    def answer(self) -> FrontierAnswer:
        """All four stages (resuming what is stored); raises `Elsewhere` where the next
        evaluations run in another process."""
        recipe = self.search_recipe()
        neurons = self.search_width(recipe)
        choice = self.choose(recipe, neurons)
        answer = self.confirm(recipe, choice)
        if self.study.user_attrs.get(ANSWER_ATTR) != answer.to_dict():
            self.study.set_user_attr(ANSWER_ATTR, answer.to_dict())
        return answer

    # --- stage 1

    def search_recipe(self) -> Recipe:
        """Optuna's TPE over the recipe at the probe width, to `plan.recipe_trials`; several
        processes each claim their share of the trials."""
        study, total = self.recipes, self.plan.recipe_trials
        rounds = max(1, (os.cpu_count() or 1) * 4)  # recipes trained together
        while True:
            with interrupt.held(), claims.claim_lock(self.url, self.storage, study.study_name):
                claims.reap(study)
                free = total - claims.claimed(study)
                asked = claims.claim(study, min(rounds, free)) if free > 0 else []
            if asked:
                self._train_recipes(asked)
            elif claims.count(study, (TrialState.COMPLETE,)) >= total:
                break
            else:
                raise Elsewhere(study.study_name)
        best = study.best_trial
        self.log(
            f"{self.cell.name}: recipe {best.params} (score {best.value:.3f} at "
            f"{best.user_attrs.get('probe_neurons', self.probe)} neurons)"
        )
        return Recipe.from_params(best.params)

    def _train_recipes(self, asked: list[optuna.Trial]) -> None:
        seeds = tuple(SELECTION_SEED + i for i in range(self.plan.recipe_seeds))
        units = []
        try:
            for trial in asked:
                recipe = Recipe(
                    trial.suggest_float("learning_rate", *LEARNING_RATES, log=True),
                    trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
                    trial.suggest_categorical("lr_schedule", list(SCHEDULES)),
                )
                units.append(Unit("recipe", self.probe, recipe, seeds))
            with claims.heartbeat(self.recipes, asked):
                outcomes = self._train(units)
        except BaseException as error:
            claims.abandon(self.recipes, asked, error)
            raise
        for trial, outcome in zip(asked, outcomes, strict=True):
            self._store(trial, outcome)
            trial.set_user_attr("probe_neurons", self.probe)
            self.recipes.tell(trial, recipe_score(outcome, self.cell.budget))

    # --- stage 2

    def search_width(self, recipe: Recipe) -> int:
        """The fewest neurons that learn f on the selection seeds with `recipe` (k-ary search,
        several widths trained together per round)."""
        seeds = tuple(SELECTION_SEED + i for i in range(self.plan.selection_seeds))
        need = self.plan.required(len(seeds))
        while True:
            known = {
                t.params["neurons"]: _rate(t)[0] >= need
                for t in self._stored("width")
                if Recipe.from_params(t.params) == recipe
            }
            passing = [n for n, ok in known.items() if ok]
            high = min(passing) if passing else None
            low = max(
                (n for n, ok in known.items() if not ok and (high is None or n < high)),
                default=0,
            )
            if high is not None and high - low <= 1:
                self.log(
                    f"{self.cell.name}: {high} neurons learn f on >= {need}/{len(seeds)} "
                    "selection seeds"
                )
                return high
            widths = self._next_widths(low, high, known)
            self.evaluate([Unit("width", n, recipe, seeds, decisive=True) for n in widths])

    def _next_widths(self, low: int, high: int | None, known: Mapping[int, bool]) -> list[int]:
        if high is None:  # no passing width yet: reach up
            if low >= MAX_NEURONS:
                raise ConfigError(f"{self.cell.name}: no width up to {MAX_NEURONS} learns f")
            top = min(MAX_NEURONS, max(2 * low, self.probe + self.probe // 2))
            widths = sorted({max(low + 1, self.probe), top} - set(known))
        else:  # three points inside (low, high)
            inside = {low + (high - low) * q // 4 for q in (1, 2, 3)}
            widths = sorted(inside - {low, high} - set(known))
        return widths or [low + 1]

    # --- stage 3

    def choose(self, recipe: Recipe, neurons: int, first_block: int = 0) -> Choice:
        """The width and the next smaller one on a block of held-out seeds. The choice is a
        width that passes on its block while the next smaller fails there. A width that fails
        moves up by one, one whose smaller neighbour also passes moves down by one; each move
        takes a fresh block, so that a reported rate never chose what it reports on."""
        passed: tuple[int, int] | None = None  # the last (width, block) that passed
        for block in range(first_block, first_block + CHOICE_BLOCKS):
            trials = self.heldout(recipe, (neurons, neurons - 1), block)
            successes, count = _rate(trials[neurons])
            smaller = trials.get(neurons - 1)
            need = self.plan.required(count)
            if successes >= need and (smaller is None or _rate(smaller)[0] < need):
                return self._chose(trials[neurons], smaller)
            if successes >= need:  # the smaller one passes too: try it on a fresh block
                passed, neurons = (neurons, block), neurons - 1
                continue
            if passed is not None:  # it failed where it had passed: the last pass stands
                width, where = passed
                earlier = self.heldout(recipe, (width, width - 1), where)
                choice = self._chose(earlier[width], earlier.get(width - 1))
                return replace(choice, next_smaller_fresh_block=BlockRate(block, successes, count))
            self.log(
                f"{self.cell.name}: {neurons} neurons learn f on {successes}/{count} held-out "
                "seeds; trying one more neuron on a fresh block"
            )
            neurons += 1
        raise ConfigError(
            f"{self.cell.name}: no width settled on the held-out seeds in {CHOICE_BLOCKS} blocks"
        )

    def _chose(self, trial: FrozenTrial, smaller: FrozenTrial | None) -> Choice:
        choice = Choice(self._width(trial), self._width(smaller) if smaller else None)
        rate = choice.width.rate
        self.log(
            f"{self.cell.name}: chose {choice.width.neurons} neurons, held-out "
            f"{rate.successes}/{rate.seeds}"
        )
        return choice

    def _width(self, trial: FrozenTrial) -> Width:
        neurons = trial.params["neurons"]
        profile = self.cell.profile(neurons)
        s = self.settings
        successes, count = _rate(trial)
        rate = BlockRate(trial.user_attrs["block"], successes, count)
        return Width(profile, mlp_parameters(s.input_bits, profile, s.output_bits), rate)

    # --- stage 4

    def confirm(self, recipe: Recipe, choice: Choice) -> FrontierAnswer:
        """The chosen width on a fresh confirmation block; its rate is the one stated. A width
        that fails is not stated: the next larger one is chosen and confirmed afresh."""
        for attempt in range(ATTEMPTS):
            neurons = choice.width.neurons
            block = CONFIRM_BLOCK + attempt
            trial = self.heldout(recipe, (neurons,), block, "confirm")[neurons]
            successes, count = _rate(trial)
            if successes >= self.plan.required(count):
                self.log(
                    f"{self.cell.name}: answer {neurons} neurons, confirmed on "
                    f"{successes}/{count} fresh held-out seeds"
                )
                return FrontierAnswer(
                    self.cell,
                    self._width(trial),
                    recipe,
                    self.settings.target_loss,
                    2**self.settings.input_bits * self.settings.output_bits,
                    choice,
                    self._pooled(recipe, neurons),
                )
            self.log(
                f"{self.cell.name}: {neurons} neurons learn f on {successes}/{count} seeds of "
                "their confirmation block; choosing again from one more neuron on fresh blocks"
            )
            choice = self.choose(recipe, neurons + 1, first_block=(attempt + 1) * CHOICE_BLOCKS)
        raise ConfigError(f"{self.cell.name}: no width was confirmed in {ATTEMPTS} attempts")

    def _pooled(self, recipe: Recipe, neurons: int) -> Pooled:
        """Every held-out seed (choice and confirmation blocks) this width was trained on."""
        trials = [
            t
            for stage in ("heldout", "confirm")
            for t in self._stored(stage)
            if t.params["neurons"] == neurons and Recipe.from_params(t.params) == recipe
        ]
        return Pooled(
            sum(_rate(t)[0] for t in trials),
            sum(_rate(t)[1] for t in trials),
            tuple(sorted(t.user_attrs["block"] for t in trials)),
        )

    # --- evaluations, claimed and stored

    def heldout(
        self, recipe: Recipe, widths: Iterable[int], block: int, stage: str = "heldout"
    ) -> dict[int, FrozenTrial]:
        """The held-out evaluations of `widths` on `block`, by width (trained if not stored)."""
        seeds = tuple(
            HELDOUT_SEED + block * HELDOUT_BLOCK + i for i in range(self.plan.heldout_seeds)
        )
        units = [Unit(stage, n, recipe, seeds, block, prune=False) for n in widths if n >= 1]
        done = self.evaluate(units)
        return {unit.neurons: done[unit.key] for unit in units}

    def evaluate(self, units: Sequence[Unit]) -> dict[tuple, FrozenTrial]:
        """The stored evaluations of `units`, by key. Those not stored are claimed by this
        process and trained; raises `Elsewhere` when the rest run in another process."""
        while True:
            with interrupt.held(), claims.claim_lock(self.url, self.storage, self.cell.name):
                claims.reap(self.study, requeue=False)  # a cell's evaluations are re-derived
                stored = self._claimed({unit.key for unit in units})
                mine = [unit for unit in units if unit.key not in stored]
                claimed = claims.claim_fixed(
                    self.study,
                    [{"neurons": u.neurons, **u.recipe.params()} for u in mine],
                    DISTRIBUTIONS,
                    [
                        {STAGE_ATTR: u.stage, "block": u.block, "budget_epochs": self.cell.budget}
                        for u in mine
                    ],
                )
            done = {k: t for k, t in stored.items() if t.state == TrialState.COMPLETE}
            if len(done) == len(units):
                return done
            if not claimed:
                raise Elsewhere(self.cell.name)
            try:
                with claims.heartbeat(self.study, claimed):
                    outcomes = self._train(mine)
            except BaseException as error:
                claims.abandon(self.study, claimed, error, requeue=False)
                raise
            for trial, unit, outcome in zip(claimed, mine, outcomes, strict=True):
                self._store(trial, outcome)
                required = self.plan.required(outcome.seeds_planned)
                trial.set_constraint(
                    STATED, stated_constraint(unit.stage, outcome.successes, required)
                )
                self.study.tell(trial, float(unit.neurons))

    def _claimed(self, keys: set[tuple]) -> dict[tuple, FrozenTrial]:
        """The complete evaluations with these keys and those a live process of this tool is
        running (the first stored of each key)."""
        found: dict[tuple, FrozenTrial] = {}
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        for trial in self.study.get_trials(deepcopy=False, states=states):
            owned = trial.state == TrialState.COMPLETE or claims.OWNER_ATTR in trial.system_attrs
            key = _key(trial)
            if owned and key in keys and key not in found:
                found[key] = trial
        return found

    def _stored(self, stage: str) -> list[FrozenTrial]:
        return [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get(STAGE_ATTR) == stage
        ]

    def _train(self, units: Sequence[Unit]) -> list[CandidateOutcome]:
        """Train every unit's seeds together as one population; return each unit's outcome."""
        runs = []
        for unit in units:
            candidate = BooleanCandidate(
                self.cell.profile(unit.neurons),
                unit.recipe.learning_rate,
                unit.recipe.batch_size,
                self.cell.budget,
                unit.recipe.lr_schedule,
            )
            runs.append(
                BooleanTrial(
                    candidate, unit.seeds, self.settings, prune=unit.prune, decisive=unit.decisive
                )
            )
        networks = sum(len(unit.seeds) for unit in units)
        self.log(
            f"{self.cell.name}: training {networks} networks ({len(units)} evaluations, "
            f"{self.cell.budget} epochs at most)"
        )
        train_together(runs, self.fn, self.threads, watch=interrupt.check)
        self.trained += len(units)
        return [run.outcome() for run in runs]

    def _store(self, trial: optuna.Trial, outcome: CandidateOutcome) -> None:
        s = self.settings
        for key, value in outcome.user_attrs(s.input_bits, s.output_bits).items():
            trial.set_user_attr(key, value)


# ----------------------------------------------------------------------------------------------
# many cells, many processes


def run_frontier(
    storage_url: str,
    grid: FrontierGrid,
    plan_overrides: Mapping[str, Any] | None = None,
    threads: int | None = None,
    log: Log = print,
    settings: BooleanSettings | None = None,
    on_answer: Callable[[FrontierAnswer], None] | None = None,
) -> list[FrontierAnswer]:
    """Answer every cell of `grid` (resuming what is stored), in the grid's order; a cell whose
    next evaluations run in another process is left for later, so that several processes on one
    store divide the work. Every plan is checked before anything is written."""
    cells = grid.cells()
    storage = open_storage(storage_url, create=True)
    existing = set(study_names(storage))
    plans = {
        cell: cell_plan(
            optuna.load_study(study_name=cell.name, storage=storage)
            if cell.name in existing
            else None,
            plan_overrides or {},
        )
        for cell in cells
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if existing:
        with interrupt.held():
            if align_with_optuna(open_storage(storage_url)):  # cells of earlier versions
                storage = open_storage(storage_url)  # no cache of the values before
    base = settings or BooleanSettings(prune=True)
    threads = threads or os.cpu_count() or 1
    runs = {
        cell: _Lazy(lambda c=cell: CellRun(storage_url, storage, c, plans[c], base, threads, log))
        for cell in cells
    }
    answers: dict[FrontierCell, FrontierAnswer] = {}
    said = False
    with interrupt.watching():
        try:
            while len(answers) < len(cells):
                trained = sum(r.trained for r in runs.values())
                for cell in [c for c in cells if c not in answers]:
                    with contextlib.suppress(Elsewhere):
                        answers[cell] = runs[cell].get().answer()
                        if on_answer is not None:
                            on_answer(answers[cell])
                if len(answers) < len(cells) and sum(r.trained for r in runs.values()) == trained:
                    if not said:  # once per wait: the rest runs in other processes
                        _say_waiting(len(cells) - len(answers))
                    said = True
                    _sleep(POLL_SECONDS)
                else:
                    said = False
        except interrupt.Stopped as stopped:
            raise interrupt.Stopped(
                stopped.stop,
                f"{stopped.stop.words}: {len(answers)} of {len(cells)} frontier cells answered "
                "and stored; the running evaluations were failed with the reason; run the same "
                "command again to continue",
            ) from None
    return [answers[cell] for cell in cells]


class _Lazy:
    """A cell's run, made (its studies created) when the cell is first reached."""

    def __init__(self, make: Callable[[], CellRun]) -> None:
        self.make, self.run = make, None

    def get(self) -> CellRun:
        if self.run is None:
            self.run = self.make()
        return self.run

    @property
    def trained(self) -> int:
        return 0 if self.run is None else self.run.trained


def _say_waiting(cells: int) -> None:
    print(
        f"study: {cells} frontier cell(s) wait for evaluations that other processes are "
        "running; a process that died is noticed once its heartbeat is stale",
        file=sys.stderr,
        flush=True,
    )


def _sleep(seconds: float) -> None:
    """Sleep, honouring a stop within a tenth of a second."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        interrupt.check()
        time.sleep(0.1)


def run_cell(
    storage_url: str,
    cell: FrontierCell,
    plan: FrontierPlan | None = None,
    threads: int | None = None,
    log: Log = print,
    settings: BooleanSettings | None = None,
) -> FrontierAnswer:
    """One cell (resuming what is stored), waiting for evaluations other processes run."""
    overrides = {} if plan is None else plan.identity()
    grid = FrontierGrid((cell.function_seed,), (cell.depth,), (cell.budget,))
    (answer,) = run_frontier(storage_url, grid, overrides, threads, log, settings)
    return answer
