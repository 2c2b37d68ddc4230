"""The budget frontier: the fewest hidden neurons that learn f under an epoch budget.

Success is close to monotone in width for a fixed training recipe, so each cell (function
seed, depth, epoch budget; `FrontierCell`) is answered in four stages, every evaluation stored
as a trial:

1. **recipe**: Optuna's TPE, seeded from the cell, searches Adam's learning rate, the batch
   size (up to the full table) and the schedule (constant, cosine or onecycle decay, a linear
   warm-up, the floor a decay ends at) at a probe width near the cell's boundary (`probe_for`),
   on `recipe_seeds` selection seeds per trial, minimising how far the seeds end from the
   target (study `<cell>-recipe`). The best recipes of neighbouring cells already answered in
   the store (other budgets and depths) are its first trials;
2. **width**: with the best recipe, a k-ary search over the total hidden neurons finds the
   fewest that learn f on at least `required_rate` of `selection_seeds` selection seeds
   (study `<cell>`, stage "width");
3. **success curve**: five widths around that one are trained on a block of `heldout_seeds`
   held-out seeds (stage "curve"), and a logistic curve in width is fitted to every held-out
   seed (`study.success_curve`): the width where it crosses `required_rate` and the
   profile-likelihood 95% interval of that width. A fit that does not place the crossing
   inside the widths trained moves the five widths on a fresh block;
4. **confirmation**: the smallest whole width whose fitted rate is at least `required_rate`
   is trained on a fresh block of `confirmation_seeds` seeds (stage "confirm"; 96 by
   default, enough to tell a rate of 80% from one of 95%). The answer (`FrontierAnswer`) is
   that width with this block's rate and exact 95% interval, a block that chose nothing. A
   width that fails is not stated: its block joins the fit, and the next width (at least one
   neuron more) is confirmed on a fresh block.

A deep cell spreads its neurons evenly over `depth` layers (the first layers take the
remainder). Everything resumes: an evaluation already stored is read back, not retrained, and
every decision is re-derived from stored evaluations in the order it was made. Every
evaluation is claimed before it is trained, as `study run` claims its trials (`study.claims`:
a RUNNING trial with its owner and heartbeat, under the store's claim lock), so that several
processes on one store divide the work: a process that finds a cell's next evaluations running
elsewhere moves on to another cell and comes back (`run_frontier`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
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
from study.success_curve import Curve, NoCrossing, Point, fit

SELECTION_SEED = 2_000_000
"""Selection seeds (recipe and width stages) are SELECTION_SEED + i."""
HELDOUT_SEED = 3_000_000
"""Held-out block j is HELDOUT_SEED + j * HELDOUT_BLOCK + i: never a selection seed."""
HELDOUT_BLOCK = 10_000
CONFIRM_BLOCK = 100
"""Confirmation blocks are CONFIRM_BLOCK, CONFIRM_BLOCK + 1, ...: apart from curve blocks."""
CURVE_ROUNDS = 6
"""Blocks of five widths the success curve may take before a cell gives up."""
CURVE_WIDTHS = 5
"""Widths per curve block, evenly spaced around the centre."""
ATTEMPTS = 4
"""Widths that may fail their confirmation before a cell gives up."""
RECIPE_STARTUP = 10
"""Recipe trials before TPE takes over: the neighbouring cells' recipes, then random ones. With
48 trials in all (`FrontierPlan.recipe_trials`), TPE proposes 38 recipes, in rounds of about
eight (`constant_liar`), from densities fitted to the best tenth of the finished trials (Optuna's
default split: 1 of the first 10, 5 of 48): enough rounds for its densities over five
parameters to concentrate on what worked, where 16 trials with 6 random ones (the earlier
search, one sampler seed for every cell) gave it one or two good trials and two rounds: little
more than a random search that returned the same recipes in every cell."""
NEIGHBOURS = 4
"""Recipes of neighbouring cells enqueued as a recipe search's first trials."""
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
POLL_SECONDS = 1.0
"""How often a process whose remaining cells all wait on other processes looks again."""
SCHEMA_VERSION = 2
"""Of answers.json: an object with `schema_version` and an `answers` list."""
OPTIMIZER = "adam"
Log = Callable[[str], None]

BUDGET_SHRINK = 0.12
"""The boundary shrinks about as budget^-0.12 (the earlier method's one layer: 84, 66 and 61
neurons at 2,000, 8,000 and 16,000 epochs, exponents 0.17 and 0.11, flattening)."""
DEPTH_FACTOR = {1: 1.0, 2: 0.85, 3: 1.0, 4: 1.3}
"""Boundary of a depth relative to one layer, at equal budget (earlier method: at 2,000 and
16,000 epochs two layers needed 0.81 and 0.89 of one layer's neurons, three 0.98 and 1.07, four
1.24 and 1.34)."""


def probe_for(cell: FrontierCell, known: Sequence[FrontierAnswer] = ()) -> int:
    """A probe width near the cell's boundary, where the recipe decides success: from the
    answers `known` in the store, else from a one-layer table of 8-bit functions set a little
    below the boundaries measured (the recipe score still ranks recipes below the boundary, by
    how close they come to the target, while above it every recipe succeeds and only speed ranks
    them). With answers of the same function and depth (`boundary_at`): between two answered
    budgets, interpolated in log width over log budget; beyond them, continued at the slope of
    the two nearest, else at budget^-BUDGET_SHRINK. Otherwise the nearest answer (the same
    function first), scaled by budget^-BUDGET_SHRINK and `DEPTH_FACTOR`.

    On the committed store (each cell against the answers finished before its recipe search
    began; the frontier report's "How near the probes were") this rule probes 2.65 neurons from
    the fitted 90% crossing on average (at most 5.6), the budget^-0.12 scaling of the nearest
    answer alone 3.23 (at most 6.3): it over-shrank where the boundary flattens (one layer at
    32,000 epochs: 52 for a crossing of 57.9, now 55)."""
    estimate = boundary_at(cell, known)
    if estimate is None and known:

        def distance(a: FrontierAnswer) -> tuple:
            return (
                a.cell.function_seed != cell.function_seed,
                a.cell.depth != cell.depth,
                abs(math.log2(a.cell.budget / cell.budget)),
                abs(a.cell.depth - cell.depth),
            )

        near = min(known, key=distance)
        estimate = near.curve.crossing * (near.cell.budget / cell.budget) ** BUDGET_SHRINK
        estimate *= DEPTH_FACTOR[cell.depth] / DEPTH_FACTOR[near.cell.depth]
    if estimate is None:
        one_layer = {500: 100, 1000: 86, 2000: 72, 4000: 64}.get(
            cell.budget, 58 if cell.budget < 16000 else 55 * (16000 / cell.budget) ** BUDGET_SHRINK
        )
        estimate = one_layer * DEPTH_FACTOR[cell.depth]
    return max(1, min(MAX_NEURONS, round(estimate)))


def boundary_at(cell: FrontierCell, known: Sequence[FrontierAnswer]) -> float | None:
    """The fitted 90% crossing at the cell's budget as the answers of its function and depth
    place it (None: no such answer): log crossing is taken piecewise linear in log budget
    between answered budgets and continued beyond them at the slope of the two nearest (clipped
    to 0..BUDGET_SHRINK: a boundary does not grow with budget, and one answer gives no slope)."""
    points = sorted(
        (math.log(a.cell.budget), math.log(a.curve.crossing))
        for a in known
        if a.cell.function_seed == cell.function_seed and a.cell.depth == cell.depth
    )
    if not points:
        return None
    x = math.log(cell.budget)
    below = [p for p in points if p[0] <= x]
    above = [p for p in points if p[0] >= x]
    if below and above:
        (x0, y0), (x1, y1) = below[-1], above[0]
        return math.exp(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    side = below[::-1] if below else above
    (x0, y0), slope = side[0], BUDGET_SHRINK
    if len(side) > 1:
        slope = min(BUDGET_SHRINK, max(0.0, (y0 - side[1][1]) / (side[1][0] - x0)))
    return math.exp(y0 - slope * (x - x0))


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


@dataclass(frozen=True)
class Recipe:
    """The training of a cell: Adam's rate, the batch size and the schedule."""

    learning_rate: float
    batch_size: int
    lr_schedule: str
    warmup_fraction: float = 0.0
    lr_floor: float = 0.0

    def params(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "lr_schedule": self.lr_schedule,
            "warmup_fraction": self.warmup_fraction,
            "lr_floor": self.lr_floor,
        }

    def search_params(self) -> dict:
        """As the recipe search suggests it (no floor for a constant rate)."""
        params = self.params()
        if self.lr_schedule == "constant":
            del params["lr_floor"]
        return params

    def describe(self) -> str:
        text = f"lr {self.learning_rate:.3g}, batch {self.batch_size}, {self.lr_schedule}"
        text += f", warm-up {self.warmup_fraction:.0%}" * bool(self.warmup_fraction)
        return text + f", floor {self.lr_floor:.2f}" * bool(self.lr_floor)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Recipe:
        return cls(
            float(params["learning_rate"]),
            int(params["batch_size"]),
            str(params["lr_schedule"]),
            float(params.get("warmup_fraction", 0.0)),
            float(params.get("lr_floor", 0.0)),
        )


DISTRIBUTIONS = {
    "neurons": IntDistribution(1, MAX_NEURONS),
    "learning_rate": FloatDistribution(*LEARNING_RATES, log=True),
    "batch_size": CategoricalDistribution(list(BATCH_SIZES)),
    "lr_schedule": CategoricalDistribution(list(SCHEDULES)),
    "warmup_fraction": FloatDistribution(0.0, MAX_WARMUP),
    "lr_floor": FloatDistribution(0.0, MAX_FLOOR),
}


def exact_interval(successes: int, seeds: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial rate: conservative, and defined at
    0/n and n/n."""
    from scipy.stats import binomtest

    interval = binomtest(successes, seeds).proportion_ci(confidence, method="exact")
    return float(interval.low), float(interval.high)


def first_seed(block: int) -> int:
    """The first seed of held-out block `block`."""
    return HELDOUT_SEED + block * HELDOUT_BLOCK


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
        return first_seed(self.block)

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
    """Every held-out seed (curve and confirmation blocks) a width was trained on."""

    successes: int
    seeds: int
    blocks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "heldout_successes": self.successes,
            "heldout_seeds": self.seeds,
            "blocks": list(self.blocks),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Pooled:
        return cls(values["heldout_successes"], values["heldout_seeds"], tuple(values["blocks"]))


@dataclass(frozen=True)
class RankedRecipe:
    """One of a cell's best recipes: its score at the probe width (lower is better) and how many
    of its selection seeds reached the target there."""

    recipe: Recipe
    score: float
    successes: int
    seeds: int
    probe_neurons: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.params(),
            "score": round(self.score, 4),
            "successes": self.successes,
            "seeds": self.seeds,
            "probe_neurons": self.probe_neurons,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RankedRecipe:
        return cls(
            Recipe.from_params(values["recipe"]),
            values["score"],
            values["successes"],
            values["seeds"],
            values["probe_neurons"],
        )


@dataclass(frozen=True)
class Provenance:
    """What reproduces a cell besides its plan and seeds: the code, torch, the device and the
    command of the process that stated the answer."""

    code_commit: str
    torch_version: str
    device: str
    command: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Provenance:
        return cls(**{f.name: values[f.name] for f in fields(cls)})


def code_commit() -> str:
    """The git commit of this code, with `-dirty` when the package's tracked files differ from
    it, or the installed version where the code is no git checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", here, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
        return commit + "-dirty" * bool(changed)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"version {version('study')}"
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class FrontierAnswer:
    """A cell's stated answer: the width, its rate on the confirmation block, the fitted success
    curve, and everything that reproduces it. `to_dict` is the answers.json entry (and the
    stored `answer` attribute)."""

    cell: FrontierCell
    width: Width
    """The stated width and its rate on the confirmation block (chose nothing)."""
    recipe: Recipe
    settings: BooleanSettings
    plan: FrontierPlan
    curve: Curve
    """The success curve fitted to every held-out evaluation of the cell's recipe."""
    chosen_by: Curve
    """The fit that chose the width (the evaluations before its confirmation block)."""
    failed: tuple[Width, ...]
    """Widths that failed their confirmation blocks before this one, in order."""
    all_heldout: Pooled
    next_smaller: Pooled | None
    """Every held-out seed the next smaller width was trained on (None: never trained)."""
    recipes: tuple[RankedRecipe, ...]
    """The recipe search's best three (the first is `recipe`)."""
    curve_blocks: tuple[int, ...]
    """The held-out blocks of the curve stage."""
    provenance: Provenance

    @property
    def neurons(self) -> int:
        return self.width.neurons

    @property
    def parameters(self) -> int:
        return self.width.parameters

    @property
    def rate(self) -> BlockRate:
        return self.width.rate

    @property
    def target_loss(self) -> float:
        return self.settings.target_loss

    @property
    def table_bits(self) -> int:
        return 2**self.settings.input_bits * self.settings.output_bits

    def seeds(self) -> dict[str, Any]:
        """Where every seed of the cell came from."""
        return {
            "selection_first_seed": SELECTION_SEED,
            "recipe_seeds": self.plan.recipe_seeds,
            "selection_seeds": self.plan.selection_seeds,
            "heldout_block_seed": f"{HELDOUT_SEED} + {HELDOUT_BLOCK} * block + i",
            "curve_blocks": list(self.curve_blocks),
            "curve_seeds_per_width": self.plan.heldout_seeds,
            "confirmation_blocks": [w.rate.block for w in self.failed] + [self.rate.block],
            "confirmation_seeds": self.plan.confirmation_seeds,
        }

    def to_dict(self) -> dict[str, Any]:
        low, high = self.curve.interval
        smaller = self.next_smaller
        profile = self.cell.profile(self.neurons - 1) if self.neurons > 1 else ()
        s = self.settings
        return {
            "study": self.cell.name,
            "method": self.plan.method,
            "function_seed": self.cell.function_seed,
            "depth": self.cell.depth,
            "budget_epochs": self.cell.budget,
            **self.width.to_dict(),
            "confirmation_successes": self.rate.successes,
            "confirmation_seeds": self.rate.seeds,
            "fitted_width_90": self.curve.crossing,
            "fitted_width_90_interval": [low, high],
            "fitted_rate": round(self.curve.at(self.neurons), 4),
            "success_curve": self.curve.to_dict(),
            "recipe": self.recipe.params(),
            "recipe_ranking": [r.to_dict() for r in self.recipes],
            "target_loss": s.target_loss,
            "table_bits": self.table_bits,
            "input_bits": s.input_bits,
            "output_bits": s.output_bits,
            "required_rate": self.plan.required_rate,
            "optimizer": OPTIMIZER,
            "next_smaller": None
            if self.neurons <= 1
            else {
                "profile": list(profile),
                "neurons": self.neurons - 1,
                "parameters": mlp_parameters(s.input_bits, profile, s.output_bits),
                "fitted_rate": round(self.curve.at(self.neurons - 1), 4),
                **(smaller.to_dict() if smaller is not None else {}),
            },
            "failed_confirmations": [w.to_dict() for w in self.failed],
            "chosen_on": {
                "fitted_width_90": self.chosen_by.crossing,
                "fitted_width_90_interval": list(self.chosen_by.interval),
                "fitted_rate": round(self.chosen_by.at(self.neurons), 4),
                "heldout_seeds": self.chosen_by.seeds,
                "success_curve": self.chosen_by.to_dict(),
            },
            "all_heldout": self.all_heldout.to_dict(),
            "seeds": self.seeds(),
            "plan": self.plan.identity(),
            **self.provenance.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FrontierAnswer:
        cell = FrontierCell(values["function_seed"], values["depth"], values["budget_epochs"])
        smaller = values.get("next_smaller") or {}
        settings = BooleanSettings(
            input_bits=values["input_bits"],
            output_bits=values["output_bits"],
            target_loss=values["target_loss"],
            function_seed=cell.function_seed,
            required_share=values["required_rate"],
        )
        return cls(
            cell,
            Width.from_dict(values),
            Recipe.from_params(values["recipe"]),
            settings,
            FrontierPlan.from_dict(values["plan"]),
            Curve.from_dict(values["success_curve"]),
            Curve.from_dict(values["chosen_on"]["success_curve"]),
            tuple(Width.from_dict(w) for w in values["failed_confirmations"]),
            Pooled.from_dict(values["all_heldout"]),
            Pooled.from_dict(smaller) if "blocks" in smaller else None,
            tuple(RankedRecipe.from_dict(r) for r in values["recipe_ranking"]),
            tuple(values["seeds"]["curve_blocks"]),
            Provenance.from_dict(values),
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
    stopped between choosing and confirming states nothing; None too for a cell of the earlier
    method, `earlier_answer`)."""
    stored = study.user_attrs.get(ANSWER_ATTR)
    if stored is None or stored.get("method") != 2:
        return None
    return FrontierAnswer.from_dict(stored)


def earlier_answer(study: optuna.Study) -> dict[str, Any] | None:
    """The answer a cell of the earlier method (blocks of 24 seeds, no fitted curve) stored, as
    it stored it; None for any other study."""
    stored = study.user_attrs.get(ANSWER_ATTR)
    if stored is None or "method" in stored or "chosen_on" not in stored:
        return None
    return stored


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


def _interval(curve: Curve) -> str:
    """`95% low..high` of a curve's crossing ("open" where the data do not close it)."""
    low, high = ("open" if end is None else f"{end:.1f}" for end in curve.interval)
    return f"95% {low}..{high}"


def _pooled(points: Sequence[Point], neurons: int, blocks: tuple[int, ...]) -> Pooled | None:
    """Every held-out seed of `points` at `neurons` (None: never trained)."""
    mine = [p for p in points if p.neurons == neurons]
    if not mine:
        return None
    return Pooled(sum(p.successes for p in mine), sum(p.seeds for p in mine), blocks)


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


def neighbour_answers(storage, cell: FrontierCell) -> list[FrontierAnswer]:
    """The answers of the store's other cells, nearest first (same function, then the same
    depth, then the closest budget, then the closest depth)."""
    found = []
    for name in study_names(storage):
        match = FRONTIER_NAME.match(name)
        if match is None or match.group(4) or name == cell.name:
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
        command: str = "",
    ) -> None:
        from study.data import boolean_function

        self.url, self.storage, self.cell, self.plan = url, storage, cell, plan
        self.settings = replace(
            settings, function_seed=cell.function_seed, required_share=plan.required_rate
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
        return int(self.recipes.user_attrs[PROBE_ATTR])

    def answer(self) -> FrontierAnswer:
        """All four stages (resuming what is stored); raises `Elsewhere` where the next
        evaluations run in another process."""
        recipe = self.search_recipe()
        neurons = self.search_width(recipe)
        blocks = self.fit_curve(recipe, neurons)
        answer = self.confirm(recipe, blocks)
        if self.study.user_attrs.get(ANSWER_ATTR) != answer.to_dict():
            self.study.set_user_attr(ANSWER_ATTR, answer.to_dict())
        return answer

    # --- stage 1

    def _begin_recipes(self, study: optuna.Study) -> None:
        """Once per cell, under the claim lock: the probe width, the sampler's seed and the
        neighbouring cells' recipes (enqueued as the first trials), stored with the study."""
        if STARTS_ATTR in study.user_attrs:
            return
        known = neighbour_answers(self.storage, self.cell)
        if PROBE_ATTR not in study.user_attrs:
            study.set_user_attr(PROBE_ATTR, self.plan.probe_neurons or probe_for(self.cell, known))
        study.set_user_attr(SAMPLER_SEED_ATTR, cell_seed(self.cell))
        starts = []
        for answer in known:
            if answer.recipe not in [r for _, r in starts] and len(starts) < NEIGHBOURS:
                starts.append((answer.cell.name, answer.recipe))
        for _, recipe in starts:
            study.enqueue_trial(recipe.search_params(), skip_if_exists=True)
        study.set_user_attr(
            STARTS_ATTR, [{"cell": name, "recipe": r.params()} for name, r in starts]
        )
        if starts:
            self.log(
                f"{self.cell.name}: recipe search starts from "
                + "; ".join(f"{name}'s {r.describe()}" for name, r in starts)
            )

    def search_recipe(self) -> Recipe:
        """Optuna's TPE over the recipe at the probe width, to `plan.recipe_trials`; several
        processes each claim their share of the trials."""
        study, total = self.recipes, self.plan.recipe_trials
        rounds = max(1, (os.cpu_count() or 1) * 4)  # recipes trained together
        while True:
            with interrupt.held(), claims.claim_lock(self.url, self.storage, study.study_name):
                self._begin_recipes(study)
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
            f"{self.cell.name}: recipe {Recipe.from_params(best.params).describe()} (score "
            f"{best.value:.3f} at {best.user_attrs.get('probe_neurons', self.probe)} neurons)"
        )
        return Recipe.from_params(best.params)

    def ranked_recipes(self, count: int = 3) -> tuple[RankedRecipe, ...]:
        """The recipe search's best `count` recipes, best first."""
        done = self.recipes.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ranked = sorted(done, key=lambda t: (t.value, t.number))[:count]
        return tuple(
            RankedRecipe(
                Recipe.from_params(t.params),
                float(t.value),
                *_rate(t),
                int(t.user_attrs.get("probe_neurons", self.probe)),
            )
            for t in ranked
        )

    def _train_recipes(self, asked: list[optuna.Trial]) -> None:
        seeds = tuple(SELECTION_SEED + i for i in range(self.plan.recipe_seeds))
        units = []
        try:
            for trial in asked:
                schedule = trial.suggest_categorical("lr_schedule", list(SCHEDULES))
                recipe = Recipe(
                    trial.suggest_float("learning_rate", *LEARNING_RATES, log=True),
                    trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
                    schedule,
                    trial.suggest_float("warmup_fraction", 0.0, MAX_WARMUP),
                    0.0
                    if schedule == "constant"
                    else trial.suggest_float("lr_floor", 0.0, MAX_FLOOR),
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

    def fit_curve(self, recipe: Recipe, centre: int) -> tuple[int, ...]:
        """Five widths around `centre` on a block of held-out seeds, then the fit; a fit that
        places the smallest width at the required rate outside the widths trained, or cannot
        place it, moves the five widths there on a fresh block. Returns the blocks used."""
        step = max(1, round(centre / 20))
        for block in range(CURVE_ROUNDS):
            widths = [centre + step * (k - CURVE_WIDTHS // 2) for k in range(CURVE_WIDTHS)]
            widths = [w for w in widths if 1 <= w <= MAX_NEURONS]
            self.heldout(recipe, widths, block, "curve")
            blocks = tuple(range(block + 1))
            points = self._points(recipe, block)
            try:
                curve = fit(points, self.plan.required_rate)
            except NoCrossing as missing:
                if missing.direction == 0:  # no rise in view: look wider around the same centre
                    step *= 2
                centre += missing.direction * step * CURVE_WIDTHS
                centre = max(1, min(MAX_NEURONS, centre))
                self.log(f"{self.cell.name}: {missing}; the curve moves to {centre} neurons")
                continue
            smallest = curve.smallest()
            trained = [p.neurons for p in points]
            low, high = curve.interval
            if min(trained) <= smallest <= max(trained) and None not in (low, high):
                self.log(
                    f"{self.cell.name}: fitted {self.plan.required_rate:.0%} crossing "
                    f"{curve.crossing:.1f} neurons ({_interval(curve)}) on "
                    f"{curve.seeds} held-out seeds"
                )
                return blocks
            # not bracketed: the next five widths continue past the open or nearer edge
            down = low is None or smallest < min(trained)
            edge = min(trained) if down else max(trained)
            centre = edge + (-1 if down else 1) * step * (CURVE_WIDTHS // 2 + 1)
            centre = max(1, min(MAX_NEURONS, centre))
            self.log(
                f"{self.cell.name}: the fitted crossing ({curve.crossing:.1f}, {_interval(curve)})"
                f" is not bracketed by the widths trained; the curve continues around {centre}"
            )
        raise ConfigError(
            f"{self.cell.name}: the success curve did not settle in {CURVE_ROUNDS} blocks"
        )

    def _points(
        self, recipe: Recipe, curve_through: int, confirm_below: int = CONFIRM_BLOCK
    ) -> list[Point]:
        """The held-out evaluations of `recipe` the fit of one decision saw: curve blocks up to
        `curve_through`, confirmation blocks before `confirm_below` (so that a resumed cell
        re-derives every decision from the evaluations it was made on)."""
        return [
            Point(t.params["neurons"], *_rate(t))
            for stage, last in (("curve", curve_through), ("confirm", confirm_below - 1))
            for t in self._stored(stage)
            if Recipe.from_params(t.params) == recipe and t.user_attrs["block"] <= last
        ]

    # --- stage 4

    def confirm(self, recipe: Recipe, curve_blocks: tuple[int, ...]) -> FrontierAnswer:
        """The smallest whole width the curve fitted so far places at the required rate (at
        least one more than a width that failed before), on a fresh confirmation block; its
        rate there is the one stated. A width that fails is not stated: its block joins the
        fit, and the next width is confirmed on a fresh block."""
        failed: list[Width] = []
        for attempt in range(ATTEMPTS):
            block = CONFIRM_BLOCK + attempt
            points = self._points(recipe, curve_blocks[-1], block)
            chosen_by = fit(points, self.plan.required_rate)
            neurons = max(chosen_by.smallest(), failed[-1].neurons + 1 if failed else 1)
            trial = self.heldout(recipe, (neurons,), block, "confirm")[neurons]
            successes, count = _rate(trial)
            if successes >= self.plan.required(count):
                self.log(
                    f"{self.cell.name}: answer {neurons} neurons, confirmed on "
                    f"{successes}/{count} fresh held-out seeds"
                )
                return self._answer(recipe, trial, chosen_by, tuple(failed), curve_blocks)
            failed.append(self._width(trial))
            self.log(
                f"{self.cell.name}: {neurons} neurons learn f on {successes}/{count} seeds of "
                "their confirmation block; the fit takes them in and the next width is "
                "confirmed on a fresh block"
            )
        raise ConfigError(f"{self.cell.name}: no width was confirmed in {ATTEMPTS} attempts")

    def _answer(
        self,
        recipe: Recipe,
        trial: FrozenTrial,
        chosen_by: Curve,
        failed: tuple[Width, ...],
        curve_blocks: tuple[int, ...],
    ) -> FrontierAnswer:
        block = trial.user_attrs["block"]
        points = self._points(recipe, curve_blocks[-1], block + 1)
        neurons = trial.params["neurons"]
        stored = self.study.user_attrs.get(ANSWER_ATTR)
        if stored and stored.get("method") == 2 and stored.get("neurons") == neurons:
            provenance = Provenance.from_dict(stored)  # stated before: as it was stated
        else:
            device = trial.user_attrs.get("device", "")
            engine = trial.user_attrs.get("engine", "")
            provenance = Provenance(
                code_commit(),
                torch_version(),
                f"{device} ({engine})" if engine else device,
                self.command,
            )
        return FrontierAnswer(
            self.cell,
            self._width(trial),
            recipe,
            self.settings,
            self.plan,
            fit(points, self.plan.required_rate),
            chosen_by,
            failed,
            _pooled(points, neurons, self._blocks(recipe, neurons, curve_blocks[-1], block)),
            _pooled(
                points, neurons - 1, self._blocks(recipe, neurons - 1, curve_blocks[-1], block)
            ),
            self.ranked_recipes(),
            curve_blocks,
            provenance,
        )

    def _blocks(self, recipe: Recipe, neurons: int, curve: int, confirm: int) -> tuple[int, ...]:
        """The blocks (curve through `curve`, confirmation through `confirm`) `neurons` was
        trained on."""
        return tuple(
            sorted(
                t.user_attrs["block"]
                for stage, last in (("curve", curve), ("confirm", confirm))
                for t in self._stored(stage)
                if t.params["neurons"] == neurons
                and Recipe.from_params(t.params) == recipe
                and t.user_attrs["block"] <= last
            )
        )

    def _width(self, trial: FrozenTrial) -> Width:
        neurons = trial.params["neurons"]
        profile = self.cell.profile(neurons)
        s = self.settings
        successes, count = _rate(trial)
        rate = BlockRate(trial.user_attrs["block"], successes, count)
        return Width(profile, mlp_parameters(s.input_bits, profile, s.output_bits), rate)

    # --- evaluations, claimed and stored

    def heldout(
        self, recipe: Recipe, widths: Iterable[int], block: int, stage: str
    ) -> dict[int, FrozenTrial]:
        """The held-out evaluations of `widths` on `block`, by width (trained if not stored)."""
        count = self.plan.confirmation_seeds if stage == "confirm" else self.plan.heldout_seeds
        seeds = tuple(first_seed(block) + i for i in range(count))
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
            candidate = candidate_of(self.cell, unit.neurons, unit.recipe)
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
    command: str = "study.frontier.run_frontier (Python)",
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
        cell: _Lazy(
            lambda c=cell: CellRun(storage_url, storage, c, plans[c], base, threads, log, command)
        )
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
