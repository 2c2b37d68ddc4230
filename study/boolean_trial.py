"""The rules of one Boolean trial, written once for both trainers.

A Boolean trial trains one candidate on r initialisation seeds. `BooleanTrial` owns every
rule of it: which intermediate values are reported, when a seed stops early
(`TargetUnreachable`), when the whole trial is over (a seed diverged, or the required share of
seeds can no longer learn f), and its verdict: complete (value: hidden neurons), pruned
(abandoned without learning f) or failed (a seed diverged). The one-at-a-time path
(`train_seeds`) and the population path (`study.boolean_objective.PopulationBatch`,
`study.certify`) both drive a `BooleanTrial`; neither decides anything of its own.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from optuna.trial import TrialState

from study import models
from study.config import BooleanCandidate, BooleanSettings, TrainConfig
from study.data import BooleanFunction
from study.population import Member, train_population
from study.trainer import Divergence, EpochMetrics, TrainResult, train


class TargetUnreachable:
    """Stop rule: the target loss cannot be reached within the remaining epoch budget.

    After a warm-up (a tenth of the budget, at least 10 epochs), the best full-table loss is
    extrapolated in log space at the rate it fell over the last quarter of the epochs run so
    far. If even `slack` times that rate would not bring it to the target before the budget
    ends, the run stops. Loss curves of these nets fall roughly geometrically once they fall
    at all, so a run that is this far behind is not going to make it; runs near the target
    with a steady rate are kept. Certification retrains without this rule.
    """

    def __init__(self, target_loss: float, max_epochs: int, slack: float = 3.0) -> None:
        self.target = target_loss
        self.max_epochs = max_epochs
        self.slack = slack
        self.warmup = max(10, max_epochs // 10)
        self.best: list[float] = []

    def __call__(self, metrics: EpochMetrics) -> bool:
        loss = metrics.eval_loss
        self.best.append(min(loss, self.best[-1]) if self.best else loss)
        epoch = len(self.best)
        if epoch < self.warmup or epoch >= self.max_epochs:
            return False
        needed = math.log10(self.best[-1] / self.target)  # decades still to go
        if needed <= 0:
            return False
        window = max(5, epoch // 4)
        rate = (math.log10(self.best[-1 - window]) - math.log10(self.best[-1])) / window
        return rate * (self.max_epochs - epoch) * self.slack < needed


@dataclass(frozen=True)
class SeedRun:
    """One initialisation seed of a candidate: its training result and verdict."""

    seed: int
    result: TrainResult
    learned: bool
    """Reached the target loss with every bit right."""

    @property
    def best_loss(self) -> float:
        return self.result.best_eval_loss

    @property
    def bit_accuracy(self) -> float:
        return self.result.best_eval_accuracy


@dataclass(frozen=True)
class CandidateOutcome:
    """A candidate trained on several seeds (possibly abandoned once hopeless)."""

    candidate: BooleanCandidate
    runs: list[SeedRun]
    seeds_planned: int
    required_successes: int
    target_loss: float

    @property
    def successes(self) -> int:
        return sum(r.learned for r in self.runs)

    @property
    def success_share(self) -> float:
        """Share of the planned seeds that learned f (untrained seeds count as failures)."""
        return self.successes / self.seeds_planned

    @property
    def learns(self) -> bool:
        """The verdict: at least the required share of seeds learned f."""
        return self.successes >= self.required_successes

    @property
    def abandoned(self) -> bool:
        """Training stopped early: a seed was cut off, or the share became unreachable."""
        return len(self.runs) < self.seeds_planned or any(
            r.result.stopped_by_callback for r in self.runs
        )

    @property
    def constraint(self) -> float:
        """<= 0 iff f is learned; else how many decades the deciding seed missed the target by.

        The deciding seed is the k-th best, k = required successes (among the seeds trained).
        """
        scores = sorted(
            r.best_loss if r.learned else max(r.best_loss, self.target_loss * 1.01)
            for r in self.runs
        )
        k = min(self.required_successes, len(scores))
        if self.learns:
            return math.log10(scores[k - 1] / self.target_loss)
        return max(math.log10(scores[k - 1] / self.target_loss), 1e-3)

    @property
    def median_best_loss(self) -> float:
        return statistics.median(r.best_loss for r in self.runs)

    @property
    def seconds(self) -> float:
        return sum(r.result.seconds for r in self.runs)

    def user_attrs(self, input_bits: int, output_bits: int) -> dict[str, Any]:
        """What a trial stores: its configuration (whatever its space named the parameters),
        neurons, parameters, per-seed losses, share, time, device."""
        runs = self.runs
        return {
            "hidden_layer_profile": list(self.candidate.hidden_layer_profile),
            "recipe": {
                "learning_rate": self.candidate.learning_rate,
                "batch_size": self.candidate.batch_size,
                "epochs": self.candidate.epochs,
                "lr_schedule": self.candidate.lr_schedule,
                **(
                    {"warmup_fraction": self.candidate.warmup_fraction}
                    if self.candidate.warmup_fraction
                    else {}
                ),
                **({"lr_floor": self.candidate.lr_floor} if self.candidate.lr_floor else {}),
            },
            "neurons": self.candidate.neurons,
            "parameters": self.candidate.parameters(input_bits, output_bits),
            "seeds": [r.seed for r in runs],
            "best_full_table_loss": [r.best_loss for r in runs],
            "best_running_loss": [r.result.best_train_loss for r in runs],
            "bit_accuracy": [r.bit_accuracy for r in runs],
            "learned": [r.learned for r in runs],
            "epochs_run": [r.result.epochs_run for r in runs],
            "success_share": self.success_share,
            "successes": self.successes,
            "seeds_planned": self.seeds_planned,
            "median_best_loss": self.median_best_loss,
            "learns_f": self.learns,
            "seconds": self.seconds,
            "device": runs[0].result.device if runs else "",
            "engine": runs[0].result.engine if runs else "",
            "threads": runs[0].result.threads if runs else 0,
        }


def report_every(epochs: int) -> int:
    """Report every k-th epoch of the first seed as the trial's intermediate values: at most
    ~200 points a trial, since every report is a write to the storage."""
    return max(1, epochs // 200)


class Verdict(NamedTuple):
    """How a Boolean trial ends: its Optuna state, its value (complete only) and why."""

    state: TrialState
    value: float | None
    reason: str | None


Reporter = Callable[[float, int], None]
"""report(value, step), e.g. `optuna.Trial.report`."""


class BooleanTrial:
    """One candidate trained on `seeds`: every rule of a Boolean trial, for either trainer.

    A trainer asks `config(i)` for seed i's training, calls `on_epoch(i, metrics)` after each
    of its epochs (True: stop that seed), `finish(i, result)` when it ends, and stops the
    remaining seeds once `stops_others` is true. `verdict()` and `outcome()` say how the trial
    ended.
    """

    def __init__(
        self,
        candidate: BooleanCandidate,
        seeds: Sequence[int],
        settings: BooleanSettings,
        *,
        prune: bool | None = None,
        decisive: bool = True,
        report: Reporter | None = None,
    ) -> None:
        self.candidate = candidate
        self.seeds = list(seeds)
        self.target_loss = settings.target_loss
        self.prune = settings.prune if prune is None else prune
        self.decisive = decisive
        """Stop the remaining seeds once the trial is `over` (False: every seed trains on,
        e.g. when every seed's loss is wanted, or a rate on fresh seeds is the evidence)."""
        self.required = settings.required_of(len(self.seeds))
        self.report = report
        self.every = report_every(candidate.epochs)
        self._rules = [
            TargetUnreachable(self.target_loss, candidate.epochs) if self.prune else None
            for _ in self.seeds
        ]
        self._results: dict[int, TrainResult] = {}

    def config(self, index: int) -> TrainConfig:
        """The training of seed `index` (its seed also draws the initial weights)."""
        return self.candidate.train_config(self.seeds[index], self.target_loss)

    def on_epoch(self, index: int, metrics: EpochMetrics) -> bool:
        """After an epoch of seed `index`: report the first seed's curve every k epochs; True
        when that seed cannot reach the target within its budget (with pruning on)."""
        if self.report is not None and index == 0 and metrics.epoch % self.every == 0:
            self.report(metrics.eval_loss, metrics.epoch)
        rule = self._rules[index]
        return bool(rule is not None and rule(metrics))

    def finish(self, index: int, result: TrainResult) -> None:
        """Seed `index` has ended (target, budget, stop rule or divergence)."""
        self._results.setdefault(index, result)

    def finished(self, index: int) -> bool:
        return index in self._results

    @property
    def decided(self) -> bool:
        """Its verdict is known: every seed has ended, or the trial is decisive and over (a
        stop that comes now keeps it: nothing of it is still training)."""
        return self.stops_others or all(self.finished(k) for k in range(len(self.seeds)))

    @property
    def divergence(self) -> Divergence | None:
        """The first diverged seed's reason, if any seed diverged."""
        return next((r.divergence for _, r in sorted(self._results.items()) if r.divergence), None)

    @property
    def over(self) -> bool:
        """Nothing more to learn from the remaining seeds: one diverged, or (with pruning) the
        required share can no longer be reached."""
        if self.divergence is not None:
            return True
        failures = sum(not r.reached_target for r in self._results.values())
        return self.prune and len(self.seeds) - failures < self.required

    @property
    def stops_others(self) -> bool:
        """The seeds that still train should stop now (the trial is decisive and over)."""
        return self.decisive and self.over

    def outcome(self) -> CandidateOutcome:
        """The seeds trained so far, in seed order, with the trial's success rule."""
        runs = [
            SeedRun(seed, self._results[i], self._results[i].reached_target)
            for i, seed in enumerate(self.seeds)
            if i in self._results
        ]
        return CandidateOutcome(
            self.candidate, runs, len(self.seeds), self.required, self.target_loss
        )

    def verdict(self) -> Verdict:
        """Failed when a seed diverged; pruned when abandoned without learning f; else
        complete with the hidden neurons as value (feasibility is the constraint)."""
        if (divergence := self.divergence) is not None:
            return Verdict(TrialState.FAIL, None, str(divergence))
        outcome = self.outcome()
        if outcome.abandoned and not outcome.learns:
            return Verdict(
                TrialState.PRUNED,
                None,
                f"cannot learn f within the budget ({outcome.successes}/"
                f"{outcome.required_successes} seeds)",
            )
        return Verdict(TrialState.COMPLETE, float(self.candidate.neurons), None)


def train_seeds(
    trial: BooleanTrial, fn: BooleanFunction, watch: Callable[[], None] | None = None
) -> BooleanTrial:
    """The one-at-a-time path: train the trial's seeds in turn until it is over.

    `watch()` runs between epochs (e.g. to honour a Ctrl-C or the time budget), never after
    a trial's last one: a trial that has ended is kept, whatever stops the run then."""
    task = fn.task()
    profile = trial.candidate.hidden_layer_profile
    for index, seed in enumerate(trial.seeds):
        if index and watch is not None:
            watch()  # between seeds

        def on_epoch(
            metrics: EpochMetrics, index: int = index, epochs: int = trial.config(index).epochs
        ) -> bool:
            stop = trial.on_epoch(index, metrics)
            if not stop and metrics.epoch < epochs and watch is not None:
                watch()  # more epochs of this seed follow
            return stop

        model = models.build_boolean_net(profile, fn.input_bits, fn.output_bits, seed)
        trial.finish(index, train(model, task, trial.config(index), on_epoch))
        if trial.stops_others:
            break  # the remaining seeds cannot change the verdict
    return trial


def train_together(
    trials: Sequence[BooleanTrial],
    fn: BooleanFunction,
    threads: int = 1,
    watch: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """The population path: every seed of every trial is one member of a single population
    (`study.population`), trained at once on `threads` CPU threads; the trials' rules decide
    when a seed stops, and a trial that `stops_others` stops its remaining seeds at once.

    `watch()` runs after every epoch but the last (e.g. to honour a Ctrl-C or the time
    budget: the trials `decided` by then are the caller's to keep); `progress` is told how far
    the population is. Studies, the frontier and certification all train through here."""
    owner = [(j, k) for j, trial in enumerate(trials) for k in range(len(trial.seeds))]
    members = [
        Member(trials[j].candidate.hidden_layer_profile, trials[j].config(k)) for j, k in owner
    ]
    ended: set[int] = set()
    epoch = 0

    def on_epoch(i: int, metrics: EpochMetrics) -> bool:
        nonlocal epoch
        epoch = max(epoch, metrics.epoch)
        j, k = owner[i]
        return trials[j].stops_others or trials[j].on_epoch(k, metrics)

    def after_epoch(ended_now: dict[int, TrainResult]) -> set[int]:
        for i, result in ended_now.items():
            j, k = owner[i]
            trials[j].finish(k, result)
        stop = {
            i
            for i, (j, k) in enumerate(owner)
            if trials[j].stops_others and not trials[j].finished(k)
        }
        ended.update(ended_now, stop)
        if progress is not None:
            progress(
                f"population of {len(members)} networks: epoch {epoch}, "
                f"{len(members) - len(ended)} still training"
            )
        if watch is not None and len(ended) < len(members):
            watch()  # a stop now leaves the decided trials decided
        return stop

    results = train_population(members, fn, on_epoch, after_epoch, threads=threads)
    for i, result in enumerate(results):
        j, k = owner[i]
        trials[j].finish(k, result)
