"""The budget frontier: the fewest hidden neurons that learn f under an epoch budget.

Success is close to monotone in width for a fixed training recipe, so each cell (function
seed, depth, epoch budget) is answered in four stages, every evaluation stored as a trial:

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
   `heldout_seeds` seeds (stage "confirm"). The answer is stated with the rate of this block
   and its exact 95% interval: a block that played no part in choosing the width. A width
   that fails its confirmation is not stated; the next larger width goes through 3 and 4
   again on fresh blocks.

A deep cell spreads its neurons evenly over `depth` layers (the first layers take the
remainder). Everything resumes: an evaluation already stored is read back, not retrained.
One process per cell at a time.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from study.boolean_trial import BooleanTrial, CandidateOutcome
from study.config import (
    BooleanCandidate,
    BooleanSettings,
    is_int,
    mlp_parameters,
    require,
)
from study.errors import ConfigError

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
MAX_NEURONS = 512
STAGE_ATTR = "stage"


@dataclass(frozen=True)
class Cell:
    """One point of the frontier: a function, a depth and an epoch budget."""

    function_seed: int
    depth: int
    budget: int

    @property
    def name(self) -> str:
        return f"frontier-f{self.function_seed}-d{self.depth}-b{self.budget}"

    def profile(self, neurons: int) -> tuple[int, ...]:
        """`neurons` spread evenly over the cell's layers (the first ones take the rest)."""
        base, rest = divmod(neurons, self.depth)
        return tuple(base + (1 if i < rest else 0) for i in range(self.depth))


PLAN_BOUNDS = {
    "recipe_trials": (1, 1000),
    "recipe_seeds": (1, 100),
    "selection_seeds": (1, 1000),
    "heldout_seeds": (20, 10_000),
}
"""The range of each count of a `Plan`."""


@dataclass(frozen=True)
class Plan:
    """How thoroughly each stage works; the defaults are those of the reference runs."""

    recipe_trials: int = 16
    """Recipes Optuna tries per cell."""
    recipe_seeds: int = 4
    """Selection seeds per recipe."""
    selection_seeds: int = 10
    """Selection seeds per width of the width search."""
    heldout_seeds: int = 24
    """Held-out seeds per certified width (at least 20)."""
    required_rate: float = 0.9
    """A width learns f when at least this share of its seeds does."""
    probe_neurons: int | None = None
    """Width of the recipe search (default: `probe_for(cell)`)."""

    def __post_init__(self) -> None:
        for name, (low, high) in PLAN_BOUNDS.items():
            value = getattr(self, name)
            ok = is_int(value) and low <= value <= high
            require(ok, name, value, f"must be from {low} to {high}")
        require(
            0 < self.required_rate <= 1, "required_rate", self.required_rate, "must be in (0, 1]"
        )


def probe_for(cell: Cell) -> int:
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
    def from_params(cls, params: dict) -> Recipe:
        return cls(
            float(params["learning_rate"]), int(params["batch_size"]), str(params["lr_schedule"])
        )


DISTRIBUTIONS = {
    "neurons": IntDistribution(1, MAX_NEURONS),
    "learning_rate": FloatDistribution(*LEARNING_RATES, log=True),
    "batch_size": CategoricalDistribution(list(BATCH_SIZES)),
    "lr_schedule": CategoricalDistribution(list(SCHEDULES)),
}


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial rate: conservative, and defined at
    0/n and n/n."""
    alpha = 1.0 - confidence

    def at_most(k: int, p: float) -> float:  # P(X <= k) for X ~ Binomial(trials, p)
        return sum(math.comb(trials, i) * p**i * (1 - p) ** (trials - i) for i in range(k + 1))

    def solve(increasing: Callable[[float], float], target: float) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if increasing(mid) < target else (low, mid)
        return (low + high) / 2

    # lower: P(X >= k) = alpha/2; upper: P(X <= k) = alpha/2 (both solved as increasing in p)
    lower = 0.0 if successes == 0 else solve(lambda p: 1 - at_most(successes - 1, p), alpha / 2)
    upper = (
        1.0 if successes == trials else solve(lambda p: 1 - at_most(successes, p), 1 - alpha / 2)
    )
    return lower, upper


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
    decide: bool = False
    """Stop the other seeds once the required share is reached or out of reach."""


def _evaluate(
    cell: Cell, units: Sequence[Unit], settings: BooleanSettings, threads: int, log
) -> list[CandidateOutcome]:
    """Train every unit's seeds together as one population; return each unit's outcome."""
    from study.data import boolean_function
    from study.population import Member, train_population

    fn = boolean_function(settings.input_bits, cell.function_seed, settings.output_bits)
    runs, members, owner = [], [], []
    for u, unit in enumerate(units):
        candidate = BooleanCandidate(
            cell.profile(unit.neurons),
            unit.recipe.learning_rate,
            unit.recipe.batch_size,
            cell.budget,
            unit.recipe.lr_schedule,
        )
        run = BooleanTrial(
            candidate,
            unit.seeds,
            settings,
            prune=unit.prune,
            required=math.ceil(settings.required_share * len(unit.seeds)),
        )
        runs.append(run)
        for k in range(len(unit.seeds)):
            members.append(Member(candidate.hidden_layer_profile, run.config(k)))
            owner.append((u, k))
    log(
        f"{cell.name}: training {len(members)} networks ({len(units)} evaluations, "
        f"{cell.budget} epochs at most)"
    )

    def on_epoch(i: int, metrics) -> bool:
        u, k = owner[i]
        return (units[u].decide and runs[u].over) or runs[u].on_epoch(k, metrics)

    results = train_population(members, fn, on_epoch, threads=threads)
    for i, result in enumerate(results):
        u, k = owner[i]
        runs[u].finish(k, result)
    return [run.outcome() for run in runs]


def _record(
    study: optuna.Study,
    cell: Cell,
    unit: Unit,
    outcome: CandidateOutcome,
    settings: BooleanSettings,
    value: float,
) -> None:
    """Store an evaluation as a complete trial of `study` (its value: `value`)."""
    attrs = outcome.user_attrs(settings.input_bits, settings.output_bits)
    attrs = {k: v for k, v in attrs.items() if k not in ("device",)}
    attrs.update({STAGE_ATTR: unit.stage, "block": unit.block, "budget_epochs": cell.budget})
    study.add_trial(
        optuna.create_trial(
            state=TrialState.COMPLETE,
            value=value,
            params={"neurons": unit.neurons, **unit.recipe.params()},
            distributions=DISTRIBUTIONS,
            user_attrs=attrs,
        )
    )


def _stored(study: optuna.Study, stage: str) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(STAGE_ATTR) == stage
    ]


def _rate(trial: optuna.trial.FrozenTrial) -> tuple[int, int]:
    return trial.user_attrs["successes"], trial.user_attrs["seeds_planned"]


# ----------------------------------------------------------------------------------------------
# the four stages


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


def search_recipe(
    storage,
    cell: Cell,
    plan: Plan,
    settings: BooleanSettings,
    threads: int,
    log,
    sampler_seed: int = 0,
) -> Recipe:
    """Stage 1: Optuna's TPE over the recipe at the probe width, to `plan.recipe_trials`."""
    study = optuna.create_study(
        storage=storage,
        study_name=cell.name + "-recipe",
        direction="minimize",
        sampler=optuna.samplers.TPESampler(
            seed=sampler_seed, n_startup_trials=6, constant_liar=True
        ),
        load_if_exists=True,
    )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # a killed run
    probe = plan.probe_neurons or probe_for(cell)
    seeds = tuple(SELECTION_SEED + i for i in range(plan.recipe_seeds))
    rounds = max(1, (os.cpu_count() or 1) * 4)  # recipes trained together
    while (done := len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))) < (
        plan.recipe_trials
    ):
        asked = [study.ask() for _ in range(min(rounds, plan.recipe_trials - done))]
        units = []
        for trial in asked:
            recipe = Recipe(
                trial.suggest_float("learning_rate", *LEARNING_RATES, log=True),
                trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
                trial.suggest_categorical("lr_schedule", list(SCHEDULES)),
            )
            units.append(Unit("recipe", probe, recipe, seeds))
        try:
            outcomes = _evaluate(cell, units, settings, threads, log)
        except BaseException:
            for trial in asked:
                study.tell(trial, state=TrialState.FAIL)
            raise
        for trial, _unit, outcome in zip(asked, units, outcomes, strict=True):
            for key, value in outcome.user_attrs(
                settings.input_bits, settings.output_bits
            ).items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("probe_neurons", probe)
            study.tell(trial, recipe_score(outcome, cell.budget))
    best = study.best_trial
    log(f"{cell.name}: recipe {best.params} (score {best.value:.3f} at {probe} neurons)")
    return Recipe.from_params(best.params)


def search_width(
    study: optuna.Study,
    cell: Cell,
    recipe: Recipe,
    plan: Plan,
    settings: BooleanSettings,
    threads: int,
    log,
) -> int:
    """Stage 2: the fewest neurons that learn f on the selection seeds with `recipe`
    (k-ary search, several widths trained together per round)."""
    seeds = tuple(SELECTION_SEED + i for i in range(plan.selection_seeds))
    need = math.ceil(plan.required_rate * len(seeds) - 1e-9)
    probe = plan.probe_neurons or probe_for(cell)
    while True:
        known = {
            t.params["neurons"]: _rate(t)[0] >= need
            for t in _stored(study, "width")
            if Recipe.from_params(t.params) == recipe
        }
        passing = [n for n, ok in known.items() if ok]
        high = min(passing) if passing else None
        low = max(
            (n for n, ok in known.items() if not ok and (high is None or n < high)), default=0
        )
        if high is not None and high - low <= 1:
            log(f"{cell.name}: {high} neurons learn f on >= {need}/{len(seeds)} selection seeds")
            return high
        if high is None:  # no passing width yet: reach up
            if low >= MAX_NEURONS:
                raise ConfigError(f"{cell.name}: no width up to {MAX_NEURONS} learns f")
            top = min(MAX_NEURONS, max(2 * low, probe + probe // 2))
            widths = sorted({max(low + 1, probe), top} - set(known))
        else:  # three points inside (low, high)
            widths = sorted(
                {low + (high - low) * q // 4 for q in (1, 2, 3)} - {low, high} - set(known)
            )
        widths = widths or [low + 1]
        units = [Unit("width", n, recipe, seeds, decide=True) for n in widths]
        for unit, outcome in zip(
            units, _evaluate(cell, units, settings, threads, log), strict=True
        ):
            _record(study, cell, unit, outcome, settings, outcome.success_share)


def certify_heldout(
    study: optuna.Study,
    cell: Cell,
    recipe: Recipe,
    neurons: int,
    plan: Plan,
    settings: BooleanSettings,
    threads: int,
    log,
    first_block: int = 0,
) -> dict:
    """Stage 3: the width and the next smaller one on a block of held-out seeds. The choice is
    a width that passes on its block while the next smaller fails there. A width that fails
    moves up by one, one whose smaller neighbour also passes moves down by one; each move
    takes a fresh block, so that a reported rate never chose what it reports on."""
    passed: tuple[int, int] | None = None  # the last (width, block) that passed
    for block in range(first_block, first_block + CHOICE_BLOCKS):
        trials = _heldout(
            study, cell, recipe, (neurons, neurons - 1), block, plan, settings, threads, log
        )
        successes, count = _rate(trials[neurons])
        smaller = trials.get(neurons - 1)
        need = math.ceil(plan.required_rate * count - 1e-9)
        if successes >= need and (smaller is None or _rate(smaller)[0] < need):
            return _settle(study, cell, recipe, trials[neurons], smaller, settings, log)
        if successes >= need:  # the smaller one passes too: try it on a fresh block
            passed, neurons = (neurons, block), neurons - 1
            continue
        if passed is not None:  # it failed where it had passed: the last pass stands
            width, where = passed
            earlier = _heldout(
                study, cell, recipe, (width, width - 1), where, plan, settings, threads, log
            )
            answer = _settle(
                study, cell, recipe, earlier[width], earlier.get(width - 1), settings, log
            )
            answer["next_smaller_fresh_block"] = {
                "block": block,
                "heldout_successes": successes,
                "heldout_seeds": count,
            }
            return answer
        log(
            f"{cell.name}: {neurons} neurons learn f on {successes}/{count} held-out seeds; "
            "trying one more neuron on a fresh block"
        )
        neurons += 1
    raise ConfigError(
        f"{cell.name}: no width settled on the held-out seeds in {CHOICE_BLOCKS} blocks"
    )


CHOICE_KEYS = ("heldout_block", "heldout_successes", "heldout_seeds")


def confirm(
    study: optuna.Study,
    cell: Cell,
    recipe: Recipe,
    choice: dict,
    plan: Plan,
    settings: BooleanSettings,
    threads: int,
    log,
) -> dict:
    """Stage 4: the chosen width on a fresh confirmation block; its rate is the one stated. A
    width that fails is not stated: the next larger one is chosen and confirmed afresh."""
    for attempt in range(ATTEMPTS):
        neurons = choice["neurons"]
        block = CONFIRM_BLOCK + attempt
        trial = _heldout(
            study, cell, recipe, (neurons,), block, plan, settings, threads, log, "confirm"
        )[neurons]
        successes, count = _rate(trial)
        if successes >= math.ceil(plan.required_rate * count - 1e-9):
            answer = {
                **choice,
                **_rates(trial),
                "chosen_on": {k: choice[k] for k in CHOICE_KEYS},
                "all_heldout": _pooled(study, recipe, neurons),
            }
            study.set_user_attr("answer", answer)
            log(
                f"{cell.name}: answer {neurons} neurons, confirmed on {successes}/{count} fresh "
                "held-out seeds"
            )
            return answer
        log(
            f"{cell.name}: {neurons} neurons learn f on {successes}/{count} seeds of their "
            "confirmation block; choosing again from one more neuron on fresh blocks"
        )
        choice = certify_heldout(
            study, cell, recipe, neurons + 1, plan, settings, threads, log,
            first_block=(attempt + 1) * CHOICE_BLOCKS,
        )  # fmt: skip
    raise ConfigError(f"{cell.name}: no width was confirmed in {ATTEMPTS} attempts")


def _heldout(
    study, cell, recipe, widths, block, plan, settings, threads, log, stage="heldout"
) -> dict:
    """The held-out evaluations of `widths` on `block` (trained if not stored yet)."""
    seeds = tuple(HELDOUT_SEED + block * HELDOUT_BLOCK + i for i in range(plan.heldout_seeds))

    def stored() -> dict:
        return {
            t.params["neurons"]: t
            for t in _stored(study, stage)
            if t.user_attrs["block"] == block and Recipe.from_params(t.params) == recipe
        }

    done = stored()
    units = [
        Unit(stage, n, recipe, seeds, block, prune=False)
        for n in widths
        if n >= 1 and n not in done
    ]
    if units:
        outcomes = _evaluate(cell, units, settings, threads, log)
        for unit, outcome in zip(units, outcomes, strict=True):
            _record(study, cell, unit, outcome, settings, outcome.success_share)
        done = stored()
    return done


def _settle(study, cell, recipe, trial, smaller, settings, log) -> dict:
    choice = _answer(cell, recipe, trial, smaller, settings)
    log(
        f"{cell.name}: chose {choice['neurons']} neurons, held-out "
        f"{choice['heldout_successes']}/{choice['heldout_seeds']}"
    )
    return choice


def _pooled(study: optuna.Study, recipe: Recipe, neurons: int) -> dict:
    """Every held-out seed (choice and confirmation blocks) this width was trained on."""
    trials = [
        t
        for stage in ("heldout", "confirm")
        for t in _stored(study, stage)
        if t.params["neurons"] == neurons and Recipe.from_params(t.params) == recipe
    ]
    return {
        "heldout_successes": sum(_rate(t)[0] for t in trials),
        "heldout_seeds": sum(_rate(t)[1] for t in trials),
        "blocks": sorted(t.user_attrs["block"] for t in trials),
    }


def _rates(t) -> dict:
    """A held-out evaluation's rate, exact 95% interval and seeds."""
    successes, count = _rate(t)
    low, high = clopper_pearson(successes, count)
    return {
        "heldout_successes": successes,
        "heldout_seeds": count,
        "interval_95": [round(low, 4), round(high, 4)],
        "heldout_block": t.user_attrs["block"],
        "heldout_first_seed": min(t.user_attrs["seeds"]),
    }


def _answer(cell: Cell, recipe: Recipe, trial, smaller, settings: BooleanSettings) -> dict:
    def summary(t) -> dict:
        neurons = t.params["neurons"]
        return {
            "profile": list(cell.profile(neurons)),
            "neurons": neurons,
            "parameters": mlp_parameters(
                settings.input_bits, cell.profile(neurons), settings.output_bits
            ),
            **_rates(t),
        }

    return {
        "study": cell.name,
        "function_seed": cell.function_seed,
        "depth": cell.depth,
        "budget_epochs": cell.budget,
        **summary(trial),
        "recipe": recipe.params(),
        "target_loss": settings.target_loss,
        "table_bits": 2**settings.input_bits * settings.output_bits,
        "next_smaller": summary(smaller) if smaller is not None else None,
    }


def run_cell(
    storage_url: str,
    cell: Cell,
    plan: Plan,
    threads: int | None = None,
    log=print,
    settings: BooleanSettings | None = None,
) -> dict:
    """All four stages of one cell (resuming what is stored); returns its answer."""
    from study.storage import open_storage

    require(
        is_int(cell.depth) and 1 <= cell.depth <= 4, "depth", cell.depth, "must be from 1 to 4"
    )
    require(
        is_int(cell.budget) and 1 <= cell.budget <= 10**6,
        "budget",
        cell.budget,
        "must be from 1 to 1000000",
    )
    settings = settings or BooleanSettings(function_seed=cell.function_seed, prune=True)
    settings = replace(settings, required_share=plan.required_rate)
    threads = threads or os.cpu_count() or 1
    storage = open_storage(storage_url, heartbeat=False, create=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipe = search_recipe(storage, cell, plan, settings, threads, log)
    study = optuna.create_study(storage=storage, study_name=cell.name, load_if_exists=True)
    study.set_user_attr(
        "frontier",
        {"function_seed": cell.function_seed, "depth": cell.depth, "budget": cell.budget},
    )
    neurons = search_width(study, cell, recipe, plan, settings, threads, log)
    choice = certify_heldout(study, cell, recipe, neurons, plan, settings, threads, log)
    return confirm(study, cell, recipe, choice, plan, settings, threads, log)
