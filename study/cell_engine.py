"""A frontier cell's engine: its two studies (the recipe search and the cell's own), the
evaluations it makes (a width and a recipe trained on a list of seeds, claimed before they are
trained, stored as trials), and what the stages read back from them. The stages themselves
are `study.recipe_search` (stage 1) and `study.frontier` (stages 2 to 4)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from study import claims, interrupt
from study.answers import CONFIRM_BLOCK, BlockRate, Recipe, Width, stage_seeds
from study.boolean_trial import BooleanTrial, CandidateOutcome, train_together
from study.config import (
    MAX_FRONTIER_NEURONS,
    BooleanCandidate,
    BooleanSettings,
    FrontierCell,
    FrontierPlan,
    mlp_parameters,
)
from study.studies import bind_cell, stored_attrs
from study.success_curve import Point

RECIPE_STARTUP = 10
"""Recipe trials before TPE takes over: the neighbouring cells' recipes, then random ones. With
48 trials in all (`FrontierPlan.recipe_trials`), TPE proposes 38 recipes, in rounds of about
eight (`constant_liar`), from densities fitted to the best tenth of the finished trials (Optuna's
default split: 1 of the first 10, 5 of 48): enough rounds for its densities over five
parameters to concentrate on what worked, where 16 trials with 6 random ones (the earlier
search, one sampler seed for every cell) gave it one or two good trials and two rounds: little
more than a random search that returned the same recipes in every cell."""
LEARNING_RATES = (3e-4, 1e-1)
"""Adam's learning-rate range of the recipe search (log scale)."""
BATCH_SIZES = (8, 16, 32, 64, 128, 256)
"""Batch sizes of the recipe search, up to the full 256-row table."""
SCHEDULES = ("constant", "cosine", "onecycle")
MAX_WARMUP = 0.3
"""Largest warm-up share of the budget the recipe search tries."""
MAX_FLOOR = 0.5
"""Largest floor (share of the peak rate a decay ends at) the recipe search tries."""
MAX_NEURONS = MAX_FRONTIER_NEURONS
STATED = "stated"
"""The constraint of a cell's evaluations (`stated_constraint`): Optuna's best trial of a cell
(the fewest neurons among feasible trials, what `optuna best-trial`, `load_study().best_trial`
and optuna-dashboard show) is then the confirmation of the stated width."""
STAGE_ATTR = "stage"
PROBE_ATTR = "probe_neurons"
STARTS_ATTR = "starting_points"
SAMPLER_SEED_ATTR = "sampler_seed"
Log = Callable[[str], None]


def candidate_of(cell: FrontierCell, neurons: int, recipe: Recipe) -> BooleanCandidate:
    """`neurons` of the cell trained with `recipe` for the cell's budget."""
    return BooleanCandidate(
        cell.profile(neurons),
        recipe.learning_rate,
        recipe.batch_size,
        cell.budget,
        recipe.lr_schedule,
        recipe.warmup_fraction,
        recipe.lr_floor,
    )


def cell_seed(cell: FrontierCell) -> int:
    """The recipe sampler's seed: the cell's own (stable across processes and versions)."""
    return zlib.crc32(cell.name.encode())


DISTRIBUTIONS = {
    "neurons": IntDistribution(1, MAX_NEURONS),
    "learning_rate": FloatDistribution(*LEARNING_RATES, log=True),
    "batch_size": CategoricalDistribution(list(BATCH_SIZES)),
    "lr_schedule": CategoricalDistribution(list(SCHEDULES)),
    "warmup_fraction": FloatDistribution(0.0, MAX_WARMUP),
    "lr_floor": FloatDistribution(0.0, MAX_FLOOR),
}


def stated_constraint(stage: str, successes: int, required: int) -> float:
    """<= 0 only for a confirmation block its width passed: the evaluation an answer is stated
    from (confirmations run in increasing width, and the first that passes is the answer); in
    a records study (`study.record_search`), for a block in which any seed learned f."""
    if stage == "record":
        return float(1 - successes)
    return float(required - successes) if stage == "confirm" else 1.0


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
    pooled_before: tuple[int, int, int] | None = None
    """Method 3's confirmation: successes, seeds and blocks of the width before this block; the
    evaluation is feasible (`STATED`) only if the stating rule holds with it."""

    @property
    def key(self) -> tuple:
        return (self.stage, self.neurons, self.recipe, self.block)


def key_of(trial: FrozenTrial) -> tuple:
    """The `Unit.key` of a stored evaluation."""
    attrs = trial.user_attrs
    recipe = Recipe.from_params(trial.params)
    return (attrs.get(STAGE_ATTR), trial.params.get("neurons"), recipe, attrs.get("block"))


def rate_of(trial: FrozenTrial) -> tuple[int, int]:
    return trial.user_attrs["successes"], trial.user_attrs["seeds_planned"]


def torch_version() -> str:
    import torch

    return torch.__version__


def recipe_sampler(cell: FrontierCell) -> optuna.samplers.TPESampler:
    """TPE seeded from the cell, multivariate over the recipe's parameters (grouped, as the
    floor exists only for decaying schedules), `RECIPE_STARTUP` trials before it models."""
    import warnings

    with warnings.catch_warnings():  # multivariate and group are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=cell_seed(cell),
            n_startup_trials=RECIPE_STARTUP,
            multivariate=True,
            group=True,
            constant_liar=True,
        )


class Unanswered(Exception):
    """The cell's plan ran to its end without a width to state (becomes a `NoAnswer`)."""


class Elsewhere(Exception):
    """The cell's next evaluations run in another process: nothing for this one to train."""


# ----------------------------------------------------------------------------------------------
# one cell


class CellRun:
    """One cell on a store: its two studies, its plan and its evaluations. The stages are
    functions of a `CellRun` (`recipe_search.search`, `frontier.search_width`, `fit_curve`,
    `confirm`), each deriving its decision from the evaluations stored."""

    def __init__(
        self,
        url: str,
        storage: optuna.storages.BaseStorage,
        cell: FrontierCell,
        plan: FrontierPlan,
        settings: BooleanSettings,
        threads: int,
        log: Log,
        command: str = "",
    ) -> None:
        from study.data import boolean_function

        self.url, self.storage, self.cell, self.plan = url, storage, cell, plan
        self.settings = replace(
            settings, function_seed=cell.function_seed, required_rate=plan.required_rate
        )
        self.threads, self.log, self.command = threads, log, command
        self.fn = boolean_function(
            self.settings.input_bits, cell.function_seed, self.settings.output_bits
        )
        self.recipes = optuna.create_study(
            storage=storage,
            study_name=cell.recipe_name,
            direction="minimize",
            sampler=recipe_sampler(cell),
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
        """The recipe search's width: the plan's, or the one stored when the search began."""
        if self.plan.probe_neurons:
            return self.plan.probe_neurons
        return int(stored_attrs(self.recipes)[PROBE_ATTR])

    def points(
        self, recipe: Recipe, curve_through: int, confirm_below: int = CONFIRM_BLOCK
    ) -> list[Point]:
        """The held-out evaluations of `recipe` the fit of one decision saw: curve blocks up to
        `curve_through`, confirmation blocks before `confirm_below` (so that a resumed cell
        re-derives every decision from the evaluations it was made on)."""
        return [
            Point(t.params["neurons"], *rate_of(t))
            for stage, last in (("curve", curve_through), ("confirm", confirm_below - 1))
            for t in self.stored(stage)
            if Recipe.from_params(t.params) == recipe and t.user_attrs["block"] <= last
        ]

    def seeds(self, stage: str, count: int, block: int = 0) -> tuple[int, ...]:
        """The seeds of `block` of `stage` (the cell's own under method 3)."""
        return stage_seeds(self.cell, self.plan.method, stage, count, block)

    def rate(self, trial: FrozenTrial) -> BlockRate:
        """A held-out evaluation's rate on its block (with the block's first seed)."""
        block, stage = trial.user_attrs["block"], trial.user_attrs[STAGE_ATTR]
        successes, count = rate_of(trial)
        return BlockRate(block, successes, count, self.seeds(stage, 1, block)[0])

    def block_rates(
        self, recipe: Recipe, neurons: int, curve_through: int, confirm_below: int
    ) -> tuple[BlockRate, ...]:
        """Every held-out block `neurons` was trained on with `recipe` (curve blocks up to
        `curve_through`, confirmation blocks before `confirm_below`), in block order."""
        return tuple(
            sorted(
                (
                    self.rate(t)
                    for stage, last in (("curve", curve_through), ("confirm", confirm_below - 1))
                    for t in self.stored(stage)
                    if t.params["neurons"] == neurons
                    and Recipe.from_params(t.params) == recipe
                    and t.user_attrs["block"] <= last
                ),
                key=lambda r: r.block,
            )
        )

    def width(self, trial: FrozenTrial) -> Width:
        neurons = trial.params["neurons"]
        profile = self.cell.profile(neurons)
        s = self.settings
        return Width(
            profile, mlp_parameters(s.input_bits, profile, s.output_bits), self.rate(trial)
        )

    def heldout(
        self,
        recipe: Recipe,
        widths: Iterable[int],
        block: int,
        stage: str,
        pooled_before: tuple[int, int, int] | None = None,
    ) -> dict[int, FrozenTrial]:
        """The held-out evaluations of `widths` on `block`, by width (trained if not stored)."""
        count = self.plan.confirmation_seeds if stage == "confirm" else self.plan.heldout_seeds
        seeds = self.seeds(stage, count, block)
        units = [
            Unit(stage, n, recipe, seeds, block, prune=False, pooled_before=pooled_before)
            for n in widths
            if n >= 1
        ]
        done = self.evaluate(units)
        return {unit.neurons: done[unit.key] for unit in units}

    def evaluate(self, units: Sequence[Unit]) -> dict[tuple, FrozenTrial]:
        """The stored evaluations of `units`, by key. Those not stored are claimed by this
        process and trained; raises `Elsewhere` when the rest run in another process."""
        while True:
            lock = claims.claim_lock(self.url, self.storage, self.study.study_name)
            with interrupt.held(), lock:
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
                raise Elsewhere(self.study.study_name)
            outcomes = claims.train_claimed(self.study, claimed, self.train, mine, requeue=False)
            for trial, unit, outcome in zip(claimed, mine, outcomes, strict=True):
                self.store(trial, outcome)
                trial.set_constraint(STATED, self.constraint(unit, outcome))
                self.study.tell(trial, float(unit.neurons))

    def constraint(self, unit: Unit, outcome: CandidateOutcome) -> float:
        """`STATED` of an evaluation: <= 0 only for the one an answer is stated from."""
        if unit.pooled_before is None:
            required = self.plan.required(outcome.seeds_planned)
            return stated_constraint(unit.stage, outcome.successes, required)
        from study.stating_rule import StatingRule

        successes, seeds, blocks = unit.pooled_before
        holds = StatingRule.of(self.plan).holds(
            successes + outcome.successes, seeds + outcome.seeds_planned, blocks + 1
        )
        return 0.0 if holds else 1.0

    def _claimed(self, keys: set[tuple]) -> dict[tuple, FrozenTrial]:
        """The complete evaluations with these keys and those a live process of this tool is
        running (the first stored of each key)."""
        found: dict[tuple, FrozenTrial] = {}
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        for trial in self.study.get_trials(deepcopy=False, states=states):
            owned = trial.state == TrialState.COMPLETE or claims.OWNER_ATTR in trial.system_attrs
            key = key_of(trial)
            if owned and key in keys and key not in found:
                found[key] = trial
        return found

    def stored(self, stage: str) -> list[FrozenTrial]:
        return [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get(STAGE_ATTR) == stage
        ]

    def train(self, units: Sequence[Unit]) -> list[CandidateOutcome]:
        """Train every unit's seeds together as one population; return each unit's outcome."""
        runs = []
        for unit in units:
            candidate = candidate_of(self.cell, unit.neurons, unit.recipe)
            runs.append(
                BooleanTrial(
                    candidate, unit.seeds, self.settings, prune=unit.prune, decisive=unit.decisive
                )
            )
        networks = sum(len(unit.seeds) for unit in units)
        self.log(
            f"{self.study.study_name}: training {networks} networks ({len(units)} evaluations, "
            f"{self.cell.budget} epochs at most)"
        )
        train_together(runs, self.fn, self.threads, watch=interrupt.check)
        self.trained += len(units)
        return [run.outcome() for run in runs]

    def store(self, trial: optuna.Trial, outcome: CandidateOutcome) -> None:
        s = self.settings
        for key, value in outcome.user_attrs(s.input_bits, s.output_bits).items():
            trial.set_user_attr(key, value)
