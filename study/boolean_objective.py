"""The Optuna objective of the Boolean width studies, one trial at a time or as a population.

A Boolean study minimises hidden neurons subject to the constraint "learns f" (Optuna 5's
`Trial.set_constraint`; feasible when the value is <= 0). Each trial trains r seeds under the
rules of `study.boolean_trial.BooleanTrial`; this module only binds them to Optuna: suggest,
report, store the outcome, and turn the verdict into a trial state.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import optuna
import torch
from optuna.trial import TrialState

from study import device as dev
from study import interrupt
from study.boolean_trial import BooleanTrial, Verdict, train_seeds, train_together
from study.config import BooleanSettings
from study.data import BooleanFunction, boolean_function
from study.errors import TrialFailed


def record(trial: optuna.Trial, run: BooleanTrial, fn: BooleanFunction) -> Verdict:
    """Store how a Boolean trial ended on its Optuna trial; return the verdict to act on.

    A failed trial stores its reason; any other stores the outcome (user attributes) and the
    constraint "learns f"."""
    verdict = run.verdict()
    if verdict.state == TrialState.FAIL:
        trial.set_user_attr("fail_reason", verdict.reason)
        return verdict
    outcome = run.outcome()
    for key, value in outcome.user_attrs(fn.input_bits, fn.output_bits).items():
        trial.set_user_attr(key, value)
    trial.set_constraint("learns_f", outcome.constraint)
    return verdict


class BooleanObjective:
    """Optuna objective of a Boolean width study: returns neurons, sets the constraint."""

    def __init__(
        self, space: ModuleType, settings: BooleanSettings, device: str | torch.device = "auto"
    ) -> None:
        self.space = space
        self.settings = settings
        self.device = dev.resolve_device(device)
        dev.limit_threads_for_tiny_models(self.device)
        # the truth table is built once per process and lives on the device
        self.fn = boolean_function(
            settings.input_bits, settings.function_seed, settings.output_bits, self.device
        )

    def seeds_for(self, trial_number: int) -> list[int]:
        """Initialisation seeds of a trial: distinct across trials, stored with the trial."""
        return [trial_number * self.settings.seeds + i for i in range(self.settings.seeds)]

    def trial(self, trial: optuna.Trial) -> BooleanTrial:
        """The rules of this Optuna trial: its sampled candidate on its seeds."""
        candidate = self.space.suggest(trial, self.settings)
        return BooleanTrial(
            candidate, self.seeds_for(trial.number), self.settings, report=trial.report
        )

    def __call__(self, trial: optuna.Trial) -> float:
        run = train_seeds(self.trial(trial), self.fn, watch=lambda: interrupt.check(trial))
        verdict = record(trial, run, self.fn)
        if verdict.state == TrialState.FAIL:
            raise TrialFailed(verdict.reason)  # the study's `catch` fails it and goes on
        if verdict.state == TrialState.PRUNED:
            raise optuna.TrialPruned(verdict.reason)
        return verdict.value


class PopulationBatch:
    """Train K asked trials at once: all their seeds as one population, then tell every result.

    The runner asks the trials (exact totals) and beats their heartbeats; a trial that is over
    (a seed diverged, or its required share is out of reach) stops its other seeds at once.
    """

    def __init__(
        self,
        space: ModuleType,
        settings: BooleanSettings,
        device: str | torch.device = "auto",
        threads: int = 1,
    ) -> None:
        self.objective = BooleanObjective(space, settings, device)
        self.fn = self.objective.fn
        self.threads = threads
        self.progress: Callable[[str], None] | None = None
        """Told after epochs: how far the population is and how many networks still train."""

    def train(
        self, study: optuna.Study, trials: list[optuna.Trial]
    ) -> list[optuna.trial.FrozenTrial]:
        """Sample, train together and tell `trials` (asked, RUNNING); returns the told trials.
        A stop (`interrupt.Stopped`) propagates: the runner fails the trials with its reason."""
        runs = []
        for i, trial in enumerate(trials):
            if i % 64 == 63:
                interrupt.check()  # sampling thousands takes a while: a stop is honoured
            runs.append(self.objective.trial(trial))
        members = sum(len(run.seeds) for run in runs)
        try:
            train_together(
                runs, self.fn, self.threads, watch=interrupt.check, progress=self.progress
            )
        except interrupt.Stopped:
            # the trials decided before the stop are kept; the runner fails the others
            with interrupt.shielded():
                for trial, run in zip(trials, runs, strict=True):
                    if run.decided:
                        self._tell(study, trial, run, members)
            raise
        return [
            self._tell(study, trial, run, members) for trial, run in zip(trials, runs, strict=True)
        ]

    def _tell(self, study: optuna.Study, trial: optuna.Trial, run: BooleanTrial, members: int):
        trial.set_user_attr("population_size", members)
        verdict = record(trial, run, self.fn)
        return study.tell(trial, verdict.value, state=verdict.state)
