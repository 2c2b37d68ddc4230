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

The rooms: `study.answers` (the answer, typed; no torch, no engine), `study.recipe_search`
(stage 1), `study.cell_engine` (a cell's two studies and its evaluations, claimed, trained and
stored), and this module (stages 2 to 4, each a function of a `CellRun`, and many cells over
many processes). A plan that runs to its end without a width to state is a result
(`NoAnswer`), not an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from study import interrupt, rdb, recipe_search
from study.answers import (
    ANSWER_ATTR,
    CONFIRM_BLOCK,
    NO_ANSWER_ATTR,
    BlockRate,
    FrontierAnswer,
    NoAnswer,
    Pooled,
    Provenance,
    Recipe,
    Width,
    cell_studies,
    code_commit,
)
from study.cell_engine import (
    MAX_NEURONS,
    STAGE_ATTR,
    STATED,
    CellRun,
    Elsewhere,
    Log,
    Unanswered,
    Unit,
    rate_of,
    stated_constraint,
    torch_version,
)
from study.config import BooleanSettings, FrontierCell, FrontierGrid, FrontierPlan
from study.storage import open_storage, study_names
from study.studies import PLAN_ATTR, cell_plan, store_attr, stored_attrs
from study.success_curve import Curve, NoCrossing, fit

CURVE_ROUNDS = 6
"""Blocks of five widths the success curve may take before a cell gives up."""
CURVE_WIDTHS = 5
"""Widths per curve block, evenly spaced around the centre."""
ATTEMPTS = 4
"""Widths that may fail their confirmation before a cell gives up."""
POLL_SECONDS = 1.0
"""How often a process whose remaining cells all wait on other processes looks again."""


def _interval(curve: Curve) -> str:
    """`95% low..high` of a curve's crossing ("open" where the data do not close it)."""
    low, high = ("open" if end is None else f"{end:.1f}" for end in curve.interval)
    return f"95% {low}..{high}"


def _pooled(rates: Sequence[BlockRate]) -> Pooled | None:
    """Every held-out seed of a width's blocks, pooled (None: never trained)."""
    if not rates:
        return None
    return Pooled(*_pooled_counts(rates), tuple(r.block for r in rates))


def _pooled_counts(rates: Sequence[BlockRate]) -> tuple[int, int]:
    """Successes and seeds of a width's blocks, pooled."""
    return sum(r.successes for r in rates), sum(r.seeds for r in rates)


# ----------------------------------------------------------------------------------------------
# the stages after the recipe (stage 1: `study.recipe_search`)


def answer(run: CellRun) -> FrontierAnswer | NoAnswer:
    """All four stages (resuming what is stored): the stated answer, or the research
    outcome that the plan states none (`NoAnswer`, stored with the cell); raises
    `Elsewhere` where the next evaluations run in another process."""
    try:
        recipe = recipe_search.search(run)
        neurons = search_width(run, recipe)
        blocks = fit_curve(run, recipe, neurons)
        stated = confirm(run, recipe, blocks)
    except Unanswered as outcome:
        if stored_attrs(run.study).get(NO_ANSWER_ATTR) != str(outcome):
            store_attr(run.study, NO_ANSWER_ATTR, str(outcome))
        return NoAnswer(run.cell, str(outcome))
    if stored_attrs(run.study).get(ANSWER_ATTR) != stated.to_dict():
        store_attr(run.study, ANSWER_ATTR, stated.to_dict())
    return stated


def search_width(run: CellRun, recipe: Recipe) -> int:
    """The fewest neurons that learn f on the selection seeds with `recipe` (k-ary search,
    several widths trained together per round)."""
    seeds = run.seeds("width", run.plan.selection_seeds)
    need = run.plan.required(len(seeds))
    while True:
        known = {
            t.params["neurons"]: rate_of(t)[0] >= need
            for t in run.stored("width")
            if Recipe.from_params(t.params) == recipe
        }
        passing = [n for n, ok in known.items() if ok]
        high = min(passing) if passing else None
        low = max(
            (n for n, ok in known.items() if not ok and (high is None or n < high)),
            default=0,
        )
        if high is not None and high - low <= 1:
            run.log(
                f"{run.cell.name}: {high} neurons learn f on >= {need}/{len(seeds)} "
                "selection seeds"
            )
            return high
        widths = _next_widths(run, low, high, known)
        run.evaluate([Unit("width", n, recipe, seeds, decisive=True) for n in widths])


def _next_widths(run: CellRun, low: int, high: int | None, known: Mapping[int, bool]) -> list[int]:
    if high is None:  # no passing width yet: reach up
        if low >= MAX_NEURONS:
            raise Unanswered(f"no width up to {MAX_NEURONS} neurons learns f")
        top = min(MAX_NEURONS, max(2 * low, run.probe + run.probe // 2))
        widths = sorted({max(low + 1, run.probe), top} - set(known))
    else:  # three points inside (low, high)
        inside = {low + (high - low) * q // 4 for q in (1, 2, 3)}
        widths = sorted(inside - {low, high} - set(known))
    return widths or [low + 1]


def fit_curve(run: CellRun, recipe: Recipe, centre: int) -> tuple[int, ...]:
    """Five widths around `centre` on a block of held-out seeds, then the fit; a fit that
    places the smallest width at the required rate outside the widths trained, or cannot
    place it, moves the five widths there on a fresh block. Returns the blocks used."""
    step = max(1, round(centre / 20))
    for block in range(CURVE_ROUNDS):
        widths = [centre + step * (k - CURVE_WIDTHS // 2) for k in range(CURVE_WIDTHS)]
        widths = [w for w in widths if 1 <= w <= MAX_NEURONS]
        run.heldout(recipe, widths, block, "curve")
        blocks = tuple(range(block + 1))
        points = run.points(recipe, block)
        try:
            curve = fit(points, run.plan.required_rate)
        except NoCrossing as missing:
            if missing.direction == 0:  # no rise in view: look wider around the same centre
                step *= 2
            centre += missing.direction * step * CURVE_WIDTHS
            centre = max(1, min(MAX_NEURONS, centre))
            run.log(f"{run.cell.name}: {missing}; the curve moves to {centre} neurons")
            continue
        smallest = curve.smallest()
        trained = [p.neurons for p in points]
        low, high = curve.interval
        if min(trained) <= smallest <= max(trained) and None not in (low, high):
            run.log(
                f"{run.cell.name}: fitted {run.plan.required_rate:.0%} crossing "
                f"{curve.crossing:.1f} neurons ({_interval(curve)}) on "
                f"{curve.seeds} held-out seeds"
            )
            return blocks
        # not bracketed: the next five widths continue past the open or nearer edge
        down = low is None or smallest < min(trained)
        edge = min(trained) if down else max(trained)
        centre = edge + (-1 if down else 1) * step * (CURVE_WIDTHS // 2 + 1)
        centre = max(1, min(MAX_NEURONS, centre))
        run.log(
            f"{run.cell.name}: the fitted crossing ({curve.crossing:.1f}, {_interval(curve)})"
            f" is not bracketed by the widths trained; the curve continues around {centre}"
        )
    raise Unanswered(f"the success curve did not settle in {CURVE_ROUNDS} blocks")


def confirm(run: CellRun, recipe: Recipe, curve_blocks: tuple[int, ...]) -> FrontierAnswer:
    """Stage 4. The smallest whole width the curve fitted so far places at the required rate
    (at least one more than a width refused before) is trained on fresh confirmation blocks
    until its method decides (`verdict`); a refused width's blocks join the fit and the next
    width is confirmed on fresh blocks.

    Method 3: every held-out seed the width was trained on (its curve block, if any, and every
    confirmation block, failed ones included), pooled, decides under `study.stating_rule`:
    stated once the rule holds on at least `stated_seeds` seeds from two blocks or more;
    refused there if it does not, or earlier once even a success on every remaining seed could
    not lift the estimate to the required rate. The decision is taken once per width, at a
    fixed count of seeds (never repeated as blocks come in), so the chances the report shows
    for the rule are its chances. Method 2: one confirmation block decides (at least the
    required share of its seeds)."""
    failed: list[Width] = []
    block = CONFIRM_BLOCK
    for _ in range(ATTEMPTS):
        chosen_by = fit(run.points(recipe, curve_blocks[-1], block), run.plan.required_rate)
        neurons = max(chosen_by.smallest(), failed[-1].neurons + 1 if failed else 1)
        while True:
            rates = run.block_rates(recipe, neurons, curve_blocks[-1], block)
            said = verdict(run.plan, rates)
            if said == "holds" or said.startswith("fails"):
                break
            pooled = (*_pooled_counts(rates), len(rates))
            run.heldout(
                recipe, (neurons,), block, "confirm", pooled if run.plan.method >= 3 else None
            )
            block += 1
        trial = run.heldout(recipe, (neurons,), rates[-1].block, "confirm")[neurons]
        successes, seeds = _pooled_counts(rates)
        evidence = (
            f"{successes}/{seeds} held-out seeds over {len(rates)} blocks"
            if run.plan.method >= 3
            else f"{rates[-1].successes}/{rates[-1].seeds} seeds of its confirmation block"
        )
        if said == "holds":
            run.log(f"{run.cell.name}: answer {neurons} neurons, learning f on {evidence}")
            return _state(run, recipe, trial, chosen_by, tuple(failed), curve_blocks)
        failed.append(run.width(trial))
        run.log(
            f"{run.cell.name}: {neurons} neurons learn f on {evidence} ({said}); they join the "
            "fit and the next width is confirmed on fresh blocks"
        )
    raise Unanswered(f"no width was stated in {ATTEMPTS} attempts")


def verdict(plan: FrontierPlan, rates: Sequence[BlockRate]) -> str:
    """What the held-out blocks of a width (in block order) say under the plan's method:
    "holds", "fails..." or, until a confirmation block has decided, what it needs."""
    if not rates or rates[-1].block < CONFIRM_BLOCK:
        return "needs a confirmation block"
    if plan.method < 3:
        last = rates[-1]
        return "holds" if last.successes >= plan.required(last.seeds) else "fails its block"
    from study.stating_rule import StatingRule

    return StatingRule.of(plan).verdict(*_pooled_counts(rates), len(rates))


def _state(
    run: CellRun,
    recipe: Recipe,
    trial: FrozenTrial,
    chosen_by: Curve,
    failed: tuple[Width, ...],
    curve_blocks: tuple[int, ...],
) -> FrontierAnswer:
    block = trial.user_attrs["block"]
    points = run.points(recipe, curve_blocks[-1], block + 1)
    neurons = trial.params["neurons"]
    stated = run.block_rates(recipe, neurons, curve_blocks[-1], block + 1)
    stored = stored_attrs(run.study).get(ANSWER_ATTR)
    if stored and stored.get("method") in (2, 3) and stored.get("neurons") == neurons:
        provenance = Provenance.from_dict(stored)  # stated before: as it was stated
    else:
        device = trial.user_attrs.get("device", "")
        engine = trial.user_attrs.get("engine", "")
        provenance = Provenance(
            code_commit(),
            torch_version(),
            f"{device} ({engine})" if engine else device,
            run.command,
        )
    return FrontierAnswer(
        run.cell,
        run.width(trial),
        recipe,
        run.settings,
        run.plan,
        fit(points, run.plan.required_rate),
        chosen_by,
        failed,
        _pooled(stated),
        _pooled(run.block_rates(recipe, neurons - 1, curve_blocks[-1], block + 1)),
        recipe_search.ranked(run),
        curve_blocks,
        provenance,
        stated,
    )


def align_with_optuna(storage) -> int:
    """Give the evaluations of frontier cells stored before `STATED` existed (value: their
    success share, no constraint) their value (neurons) and constraint, so that plain Optuna
    tools name the stated width as a cell's best; one transaction per cell. Returns how many
    evaluations changed. Touches nothing else."""
    models = rdb.models()
    backend = rdb.backend(storage)
    if backend is None:
        return 0
    changed = 0
    for name in cell_studies(storage):  # (a recipe search is consistent already)
        study = optuna.load_study(study_name=name, storage=storage)
        plan = FrontierPlan.from_dict(stored_attrs(study).get(PLAN_ATTR) or {})
        old = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if rdb.constraint_key(STATED) not in t.system_attrs
        ]
        if not old:
            continue
        with rdb.transaction(backend) as session:
            for t in old:
                attrs = t.user_attrs
                value = stated_constraint(
                    attrs.get(STAGE_ATTR, ""),
                    attrs["successes"],
                    plan.required(attrs["seeds_planned"]),
                )
                session.query(models.TrialValueModel).filter(
                    models.TrialValueModel.trial_id == rdb.trial_id(t)
                ).update({"value": float(t.params["neurons"])})
                session.add(  # a finished trial: Optuna's own setter refuses it
                    models.TrialSystemAttributeModel(
                        trial_id=rdb.trial_id(t),
                        key=rdb.constraint_key(STATED),
                        value_json=json.dumps(value),
                    )
                )
                changed += 1
    return changed


# ----------------------------------------------------------------------------------------------
# many cells, many processes


def run_frontier(
    storage_url: str,
    grid: FrontierGrid,
    plan_overrides: Mapping[str, Any] | None = None,
    threads: int | None = None,
    log: Log = print,
    settings: BooleanSettings | None = None,
    on_answer: Callable[[FrontierAnswer | NoAnswer], None] | None = None,
    command: str = "study.frontier.run_frontier (Python)",
) -> list[FrontierAnswer | NoAnswer]:
    """Answer every cell of `grid` (resuming what is stored), in the grid's order: its stated
    width, or `NoAnswer` where its plan ran to its end without one (a research outcome; the
    other cells go on). A cell whose next evaluations run in another process is left for
    later, so that several processes on one store divide the work. Every plan is checked
    before anything is written."""
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
    answers: dict[FrontierCell, FrontierAnswer | NoAnswer] = {}
    said = False
    with interrupt.watching():
        try:
            while len(answers) < len(cells):
                trained = sum(r.trained for r in runs.values())
                for cell in [c for c in cells if c not in answers]:
                    with contextlib.suppress(Elsewhere):
                        answers[cell] = answer(runs[cell].get())
                        if on_answer is not None:
                            on_answer(answers[cell])
                if len(answers) < len(cells) and sum(r.trained for r in runs.values()) == trained:
                    if not said:  # once per wait: the rest runs in other processes
                        _say_waiting(len(cells) - len(answers))
                    said = True
                    sleep(POLL_SECONDS)
                else:
                    said = False
        except interrupt.Stopped as stopped:
            raise interrupt.ended(
                stopped.stop,
                f"{len(answers)} of {len(cells)} frontier cells answered and stored; the running "
                "evaluations were failed with the reason",
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


def sleep(seconds: float) -> None:
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
) -> FrontierAnswer | NoAnswer:
    """One cell (resuming what is stored), waiting for evaluations other processes run."""
    overrides = {} if plan is None else plan.identity()
    grid = FrontierGrid((cell.function_seed,), (cell.depth,), (cell.budget,))
    (answer,) = run_frontier(storage_url, grid, overrides, threads, log, settings)
    return answer
