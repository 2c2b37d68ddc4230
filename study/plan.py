"""The plan of an image study with a time budget: successive halving over epochs, fitted to the
budget and to what an epoch costs on the machine at hand.

Rule (what `fit` does, in the README's words). Before the first trial the run measures two
rates on the space's baseline network (`calibrate`): seconds per epoch of a trial (the search
split, a worker's threads) and of the export (all training images, all threads), plus what
loading and measuring took. With a reduction factor of 3 and `K + 1` rungs, the rungs are
`E / 3^K, ..., E / 3, E` epochs, and a configuration that climbs them all costs
`(K + 1) * E / 3^K` epochs per configuration started at rung 0 (a third climbs each rung). For
a depth `K`, `E` is the most epochs (at most the space's `max_epochs`) for which `w` workers can
give every rung `E` epochs each and the export its `E` epochs within the budget; the budget's
trial epochs, divided by that cost, are the configurations rung 0 holds. `K` is the smallest
depth at which they reach `MIN_CONFIGURATIONS`: the shallowest halving that still searches,
since a shallow rung 0 judges configurations at a fidelity that says little of their last
epoch (measured: rungs of 2, 6 and 18 epochs on the 2-core CPU promoted configurations that
ended 0.5 validation points below the best of a plain 18-epoch search; results/summary.md).

Every evaluation is a trial trained from scratch with its rung's epochs and its own full
schedule (a trial stopped at epoch 3 of 18 mid-schedule says little about its 18th), so
Optuna's best trial is a configuration at the epochs it was measured with, which is what the
export retrains. The schedule is asynchronous successive halving (ASHA): a free worker promotes
the best configuration of the highest rung among the top third of that rung's finished ones,
else starts a new configuration at rung 0; a job starts only if it ends before the trials'
deadline (the budget less the export's measured time), and once a new configuration could no
longer reach the top rung in time, only promotions run, the best first.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from study.config import Settings
from study.errors import ConfigError

REDUCTION = 3
"""Each rung keeps the top third of the one below and trains it for three times the epochs."""
MIN_CONFIGURATIONS = 16
"""Configurations rung 0 holds at least, where the budget allows (TPE starts from 8)."""
EXPORT_MARGIN = 1.15
"""The export's measured seconds x this, for what varies between runs."""
EXPORT_FIXED_SECONDS = 8.0
"""Loading the data, testing and saving in the export, besides its epochs (a few seconds for
FashionMNIST on the 2-core CPU)."""
CALIBRATION_STEPS = 48
"""Timed optimiser steps per rate (after WARMUP_STEPS untimed ones)."""
WARMUP_STEPS = 8

RUNG_ATTR = "rung"
"""Trial user attribute: the rung (0 = the first) a trial of a planned study was trained at."""
PROMOTED_FROM_ATTR = "promoted_from"
"""Trial user attribute: the number of the trial one rung below that a promotion repeats."""
PLANS_ATTR = "plans"
"""Study user attribute: the plan of every run that had one, in order."""


@dataclass(frozen=True)
class Costs:
    """What an epoch costs here, measured on the space's baseline network."""

    trial_seconds_per_epoch: float
    """A trial: the search split, a worker's threads (evaluation included)."""
    export_seconds_per_epoch: float
    """The export: every training image, all threads (evaluation of the test set excluded)."""
    overhead_seconds: float
    """Loading the data and measuring these rates, before the first trial."""


@dataclass(frozen=True)
class Plan(Settings):
    """A run's plan: its rungs and the measurements and budget they were fitted to."""

    WHAT = "plan field"

    budget_seconds: float
    """The run's time budget (--timeout), study and export together when it exports."""
    started: float
    """When the run started (time.time())."""
    workers: int
    """Processes training trials at once."""
    rungs: tuple[int, ...]
    """Epochs of each rung, lowest first."""
    trial_seconds_per_epoch: float
    """Measured: an epoch of the baseline in a trial (search split, a worker's threads)."""
    export_seconds_per_epoch: float
    """Measured: an epoch of the baseline in the export (all images, all threads)."""
    overhead_seconds: float
    """Measured: loading and calibration before the first trial."""
    exports: bool
    """Whether the budget also holds the export of the best trial."""
    configurations: int = 0
    """Configurations rung 0 holds in this budget (a third climbs each rung)."""
    reduction: int = REDUCTION
    fitted: bool = True
    """False when the rungs were the study's stored ones (a resumed study keeps its rungs)."""

    @property
    def top(self) -> int:
        return self.rungs[-1]

    def planned(self) -> list[int]:
        """Configurations each rung holds in the plan."""
        first = self.configurations or self.workers * self.reduction ** (len(self.rungs) - 1)
        return [max(1, round(first / self.reduction**k)) for k in range(len(self.rungs))]

    def export_seconds(self, epochs: int, scale: float = 1.0) -> float:
        """What exporting a configuration trained for `epochs` takes: the measured export rate
        of the baseline, x `scale` (the configuration's trial rate against the baseline's)."""
        if not self.exports:
            return 0.0
        per_epoch = self.export_seconds_per_epoch * scale
        return epochs * per_epoch * EXPORT_MARGIN + EXPORT_FIXED_SECONDS

    def why(self) -> str:
        """The plan in one paragraph: what was measured and what it chose."""
        counts = "/".join(str(n) for n in self.planned())
        export = (
            f" and the export {self.export_seconds_per_epoch:.1f} s per epoch (all images, "
            f"all threads; {self.export_seconds(self.top):.0f} s for {self.top} epochs)"
            if self.exports
            else ""
        )
        chosen = (
            f"rungs of {', '.join(map(str, self.rungs))} epochs, {counts} configurations "
            f"(reduction {self.reduction})"
        )
        if not self.fitted:
            return f"the study's stored {chosen}; budget {self.budget_seconds:.0f} s"
        return (
            f"budget {self.budget_seconds:.0f} s, {self.workers} worker(s); measured here: a "
            f"trial's epoch {self.trial_seconds_per_epoch:.1f} s{export}, "
            f"{self.overhead_seconds:.0f} s to load and measure; so {chosen}"
        )


def fit(
    budget_seconds: float,
    workers: int,
    costs: Costs,
    max_epochs: int,
    exports: bool,
    started: float,
    stored_rungs: Sequence[int] | None = None,
) -> Plan:
    """The plan for this budget and these measured costs (the rule in the module docstring).
    A study that has rungs keeps them. A budget that holds not one epoch per worker plus the
    export is refused in one line."""

    usable = budget_seconds - costs.overhead_seconds - (EXPORT_FIXED_SECONDS if exports else 0)
    c = costs.trial_seconds_per_epoch
    x = costs.export_seconds_per_epoch * EXPORT_MARGIN if exports else 0.0

    def configurations(rungs: Sequence[int]) -> int:
        """Rung-0 configurations the budget's trial epochs hold (a third climbs each rung)."""
        epochs = workers * max(0.0, usable - rungs[-1] * x) / c
        climb = sum(r / REDUCTION**k for k, r in enumerate(rungs))
        return math.floor(epochs / climb)

    def plan(rungs: Sequence[int], fitted: bool = True) -> Plan:
        rungs = tuple(int(r) for r in rungs)
        return Plan(
            budget_seconds=float(budget_seconds),
            started=started,
            workers=workers,
            rungs=rungs,
            trial_seconds_per_epoch=c,
            export_seconds_per_epoch=costs.export_seconds_per_epoch,
            overhead_seconds=costs.overhead_seconds,
            exports=exports,
            configurations=configurations(rungs),
            fitted=fitted,
        )

    if stored_rungs:
        return plan(stored_rungs, fitted=False)
    feasible = []  # (depth, rungs) whose first rung has at least one epoch
    for depth in range(8):
        top = min(max_epochs, math.floor(usable / ((depth + 1) * c + x)))
        if top < REDUCTION**depth:
            break
        rungs = sorted({max(1, round(top / REDUCTION ** (depth - k))) for k in range(depth + 1)})
        feasible.append(rungs)
        if configurations(rungs) >= MIN_CONFIGURATIONS:
            return plan(rungs)
    if feasible:  # no depth reaches the minimum: the one that searches most
        return plan(max(feasible, key=configurations))
    need = costs.overhead_seconds + c + x + (EXPORT_FIXED_SECONDS if exports else 0)
    raise ConfigError(
        f"timeout: {budget_seconds:g} s holds not one epoch per worker here (an epoch of the "
        f"baseline costs {c:.1f} s in a trial{' and the export needs its own' if exports else ''}"
        f"); give at least {math.ceil(need)} s, or leave --timeout out"
    )


# ----------------------------------------------------------------------------------------------
# the schedule: what a free worker trains next


def rung_of(trial: FrozenTrial) -> int:
    return int(trial.user_attrs.get(RUNG_ATTR, 0))


def _seconds_per_epoch(trials: list[FrozenTrial], plan: Plan) -> float:
    """A configuration's typical epoch here: the median of the measured ones, else the plan's."""
    measured = [
        t.user_attrs["seconds_per_epoch"]
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and t.user_attrs.get("seconds_per_epoch")
    ]
    return statistics.median(measured) if measured else plan.trial_seconds_per_epoch


def deadline(study: optuna.Study, plan: Plan) -> float:
    """When trials must end (time.time()): the budget less the export of the best trial so far,
    trained at the top rung (where the best will be). Its export rate is the measured one of
    the baseline, scaled by the best trial's epoch against the baseline trial's in this study
    (both measured side by side with the other workers; the export runs alone)."""
    end = plan.started + plan.budget_seconds
    if not plan.exports:
        return end
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value, default=None)
    base = next((t for t in complete if t.user_attrs.get("baseline")), None)
    scale = 1.0
    if best is not None and base is not None:
        mine, theirs = (t.user_attrs.get("seconds_per_epoch") for t in (best, base))
        scale = mine / theirs if mine and theirs else 1.0
    return end - plan.export_seconds(plan.top, scale)


@dataclass(frozen=True)
class Promotion:
    """Train the configuration of `trial` at rung `rung`."""

    trial: FrozenTrial
    rung: int


NEW = "new"
"""A new configuration at rung 0 (the sampler's)."""


def next_job(study: optuna.Study, plan: Plan, now: float | None = None) -> Promotion | str | None:
    """What a free worker trains next: a `Promotion`, `NEW`, or None when nothing fits before
    the trials' deadline (the worker stops; the rest of the budget is the export's)."""
    now = time.time() if now is None else now
    trials = study.get_trials(deepcopy=False)
    end = deadline(study, plan)
    typical = _seconds_per_epoch(trials, plan)
    top = len(plan.rungs) - 1
    promoted = {t.user_attrs.get(PROMOTED_FROM_ATTR) for t in trials} - {None}
    climb = sum(plan.rungs) * typical
    closing = now + climb > end  # a new configuration could not reach the top rung in time
    for rung in range(top - 1, -1, -1):
        done = sorted(
            (t for t in trials if t.state == TrialState.COMPLETE and rung_of(t) == rung),
            key=lambda t: t.value,
            reverse=True,
        )
        quota = len(done) if closing else len(done) // plan.reduction
        for trial in done[:quota]:
            if trial.number in promoted:
                continue
            rate = trial.user_attrs.get("seconds_per_epoch") or typical
            if now + plan.rungs[rung + 1] * rate <= end:
                return Promotion(trial, rung + 1)
    if not closing and now + plan.rungs[0] * typical <= end:
        return NEW
    return None


def promote(study: optuna.Study, job: Promotion) -> None:
    """Enqueue the promoted configuration with its rung (the next claim takes it)."""
    attrs = {RUNG_ATTR: job.rung, PROMOTED_FROM_ATTR: job.trial.number}
    if job.trial.user_attrs.get("baseline"):
        attrs["baseline"] = True
    study.enqueue_trial(job.trial.params, user_attrs=attrs, skip_if_exists=False)


def rung_table(study: optuna.Study, plan: Plan) -> list[dict]:
    """Per rung: its epochs, the plan's configurations and what the study holds there."""
    trials = study.get_trials(deepcopy=False)
    rows = []
    for k, epochs in enumerate(plan.rungs):
        here = [t for t in trials if RUNG_ATTR in t.user_attrs and rung_of(t) == k]
        complete = [t for t in here if t.state == TrialState.COMPLETE]
        rows.append({
            "rung": k,
            "epochs": epochs,
            "planned": plan.planned()[k],
            "complete": len(complete),
            "failed or stopped": sum(t.state == TrialState.FAIL for t in here),
            "best": max((t.value for t in complete), default=None),
        })  # fmt: skip
    return rows
