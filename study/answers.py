"""A frontier cell's answer, typed: what the report, answers.json, `study best`, the overview
and the notebooks read. It imports neither torch nor the training engine (`study.frontier`),
so that reading a store's answers costs what reading JSON costs; the engine writes answers
through these types.

A cell (function seed, depth, epoch budget) states a width with its rate on a confirmation
block of fresh held-out seeds, the success curve fitted to every held-out seed of its recipe,
the recipes the search ranked best, and what reproduces it (plan, seeds, code commit, torch
version, device, command).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import optuna

from study.config import BooleanSettings, FrontierCell, FrontierPlan, mlp_parameters
from study.studies import ANSWER_ATTR, FRONTIER_NAME, stored_attrs
from study.success_curve import Curve

SELECTION_SEED = 2_000_000
"""Selection seeds (recipe and width stages) are SELECTION_SEED + i."""
HELDOUT_SEED = 3_000_000
"""Held-out block j is HELDOUT_SEED + j * HELDOUT_BLOCK + i: never a selection seed."""
HELDOUT_BLOCK = 10_000
CONFIRM_BLOCK = 100
"""Confirmation blocks are CONFIRM_BLOCK, CONFIRM_BLOCK + 1, ...: apart from curve blocks."""
CELL_SEED = 2**59
"""Method 3: a cell's seeds are CELL_SEED + crc32(cell name) * 2**22 + stage * 2**19 + b * 2**14
+ i (`stage_seeds`): block b of stage `STAGES[stage]`, seed i < 2**14. Cells with different
names get different crc32s (checked over the grids run, `tests/test_seeds.py`), so no two
cells, stages or blocks share a seed; all lie above the record seeds (below 2**59) and the
method-2 seeds (below 10,000,000)."""
STAGES = ("recipe", "width", "curve", "confirm", "recheck")
"""The stages that draw their own seeds (method 3), in the order of their ranges."""
OPTIMIZER = "adam"
SCHEMA_VERSION = 4
"""Of answers.json: an object with `schema_version`, an `answers` list (each entry with its
`fitted_widths` at 50, 90 and 99% since version 3; since version 4 `blocks`, every held-out
block of the stated width with its first seed, and a `seeds` entry that names each stage's
range) and, since version 3, `records` (the record networks shown beside the answers,
`study.records`)."""
READABLE_SCHEMAS = (2, 3, 4)
"""The answers.json versions this version reads (what versions 3 and 4 added is only shown)."""


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


def exact_interval(successes: int, seeds: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial rate: conservative, and defined at
    0/n and n/n."""
    from scipy.stats import binomtest

    interval = binomtest(successes, seeds).proportion_ci(confidence, method="exact")
    return float(interval.low), float(interval.high)


def first_seed(block: int) -> int:
    """The first seed of held-out block `block` (method 2: every cell's)."""
    return HELDOUT_SEED + block * HELDOUT_BLOCK


def cell_first_seed(name: str, stage: str, block: int = 0) -> int:
    """Method 3: the first seed of block `block` of `stage` of the cell named `name` (a
    confirmation block counts from `CONFIRM_BLOCK`)."""
    if stage == "confirm":
        block -= CONFIRM_BLOCK
    if not 0 <= block < 32:
        raise ValueError(f"block {block} of stage {stage!r} outside 0..31")
    return (
        CELL_SEED + zlib.crc32(name.encode()) * 2**22 + STAGES.index(stage) * 2**19 + block * 2**14
    )


def stage_seeds(
    cell: FrontierCell, method: int, stage: str, count: int, block: int = 0
) -> tuple[int, ...]:
    """The `count` seeds of `block` of `stage` of `cell` under `method`: method 3 the cell's own
    (`cell_first_seed`), method 2 those every cell shared (selection seeds from
    `SELECTION_SEED`, held-out blocks from `first_seed`)."""
    if count > 2**14:
        raise ValueError(f"{count} seeds: a block holds at most {2**14}")
    if method >= 3:
        first = cell_first_seed(cell.name, stage, block)
    elif stage in ("recipe", "width"):
        first = SELECTION_SEED
    else:
        first = first_seed(block)
    return tuple(range(first, first + count))


# ----------------------------------------------------------------------------------------------
# the answer of a cell, typed: what the report, answers.json, `study best` and notebooks read


@dataclass(frozen=True)
class BlockRate:
    """Successes out of the seeds of one block of held-out seeds."""

    block: int
    successes: int
    seeds: int
    first: int | None = None
    """The block's first seed (None: method 2's `first_seed(block)`)."""

    @property
    def first_seed(self) -> int:
        return first_seed(self.block) if self.first is None else self.first

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
        return cls(
            values[block_key],
            values["heldout_successes"],
            values["heldout_seeds"],
            values.get("heldout_first_seed"),
        )


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
    blocks: tuple[BlockRate, ...] = ()
    """Every held-out block the stated width was trained on (curve and confirmation), in
    order: what `all_heldout` pools (empty for answers stored before they were kept)."""

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
    def stated_on(self) -> tuple[int, int]:
        """Successes and seeds that stated the width: method 3, every held-out seed it was
        trained on (pooled); method 2, its confirmation block."""
        if self.plan.method >= 3:
            return self.all_heldout.successes, self.all_heldout.seeds
        return self.rate.successes, self.rate.seeds

    def pooled_words(self) -> str:
        """The stated width's rate over every held-out seed it was trained on (curve and
        confirmation blocks), with its exact 95% interval and, beside it, the confirmation
        block that stated it: what `make study` and the report's headline say."""
        pooled = self.all_heldout
        low, high = exact_interval(pooled.successes, pooled.seeds)
        if self.plan.method >= 3:
            return (
                f"learns f on {pooled.successes}/{pooled.seeds} of the seeds it was trained on "
                f"(95% {low:.2f}..{high:.2f}; {len(pooled.blocks)} blocks, stated by the rule)"
            )
        return (
            f"learns f on {pooled.successes}/{pooled.seeds} of the seeds it was trained on "
            f"(95% {low:.2f}..{high:.2f}; confirmation block {self.rate.successes}/"
            f"{self.rate.seeds})"
        )

    @property
    def table_bits(self) -> int:
        return 2**self.settings.input_bits * self.settings.output_bits

    def seeds(self) -> dict[str, Any]:
        """Where every seed of the cell came from."""
        if self.plan.method >= 3:
            name = self.cell.name
            return {
                "rule": f"{CELL_SEED} + crc32({name!r}) * 2**22 + stage * 2**19 + block * 2**14"
                " + i (confirmation blocks counted from 0)",
                "first_seeds": {
                    stage: cell_first_seed(name, stage, CONFIRM_BLOCK if stage == "confirm" else 0)
                    for stage in STAGES
                },
                "recipe_seeds": self.plan.recipe_seeds,
                "selection_seeds": self.plan.selection_seeds,
                "curve_blocks": list(self.curve_blocks),
                "curve_seeds_per_width": self.plan.heldout_seeds,
                "confirmation_blocks": sorted(
                    {w.rate.block for w in self.failed}
                    | {b.block for b in self.blocks if b.block >= CONFIRM_BLOCK}
                ),
                "confirmation_seeds": self.plan.confirmation_seeds,
            }
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
            "blocks": [b.fields() for b in self.blocks],
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
            required_rate=values["required_rate"],
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
            tuple(BlockRate.from_fields(b) for b in values.get("blocks", [])),
        )


def stored_answer(study: optuna.Study) -> FrontierAnswer | None:
    """The confirmed answer stored with a cell (None until a width is confirmed: a run that
    stopped between choosing and confirming states nothing; None too for a cell of the earlier
    method, `earlier_answer`)."""
    stored = stored_attrs(study).get(ANSWER_ATTR)
    if stored is None or stored.get("method") not in (2, 3):
        return None
    return FrontierAnswer.from_dict(stored)


def earlier_answer(study: optuna.Study) -> dict[str, Any] | None:
    """The answer a cell of the earlier method (blocks of 24 seeds, no fitted curve) stored, as
    it stored it; None for any other study."""
    stored = stored_attrs(study).get(ANSWER_ATTR)
    if stored is None or "method" in stored or "chosen_on" not in stored:
        return None
    return stored


NO_ANSWER_ATTR = "no_answer"
"""Cell attribute: why the cell's plan ran to its end without stating a width."""


@dataclass(frozen=True)
class NoAnswer:
    """A research outcome, not an error: the cell's plan ran to its end and states no width
    (no width up to the largest learns f under the budget, the success curve did not settle,
    or no width held on its confirmation blocks). Every evaluation stays stored; another plan
    (more seeds, a larger budget) may answer the cell."""

    cell: FrontierCell
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.cell.name, "answered": False, "reason": self.reason}

    def line(self) -> str:
        return f"{self.cell.name}: no answer: {self.reason}"


def stored_no_answer(study: optuna.Study) -> NoAnswer | None:
    """The research outcome stored with a cell whose plan stated no width, else None."""
    reason = stored_attrs(study).get(NO_ANSWER_ATTR)
    if reason is None or stored_attrs(study).get(ANSWER_ATTR) is not None:
        return None
    cell = cell_of(study.study_name)
    return NoAnswer(cell, reason) if cell is not None else None


def cell_of(name: str) -> FrontierCell | None:
    """The cell whose own study is named `name` (None: another study, or a recipe search)."""
    match = FRONTIER_NAME.match(name)
    if match is None or match.group(4):
        return None
    return FrontierCell(*(int(match.group(i)) for i in (1, 2, 3)))


def cell_studies(storage) -> list[str]:
    """The names of the store's frontier cells (their own studies, not the recipe searches):
    the one place that finds them."""
    from study.storage import study_names

    return [name for name in study_names(storage) if cell_of(name) is not None]
