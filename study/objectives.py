"""Objectives: bind a search space, its data and the shared trainer into an Optuna objective.

Boolean studies minimise hidden neurons subject to the constraint "learns f" (Optuna 5's
`Trial.set_constraint`; feasible when the value is <= 0). Each trial trains r seeds.
Image studies maximise validation accuracy, reported each epoch to a median pruner.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import optuna
import torch

from study import device as dev
from study import interrupt
from study.config import BooleanCandidate, BooleanSettings
from study.data import BooleanFunction, boolean_function
from study.errors import NonFiniteLossError
from study.models import DeepNeuralNet, count_parameters
from study.trainer import EpochMetrics, TrainResult, train


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
        """What a trial stores: neurons, parameters, per-seed losses, share, time, device."""
        runs = self.runs
        return {
            "hidden_layer_profile": list(self.candidate.hidden_layer_profile),
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
        }


def report_every(epochs: int) -> int:
    """Report every k-th epoch of the first seed as the trial's intermediate values: at most
    ~200 points a trial, since every report is a write to the storage."""
    return max(1, epochs // 200)


def build_boolean_net(
    candidate: BooleanCandidate, fn: BooleanFunction, seed: int
) -> DeepNeuralNet:
    """The ReLU network of a candidate with initial weights drawn from `seed` (logits out)."""
    with dev.seeded(seed):
        return DeepNeuralNet(fn.input_bits, candidate.hidden_layer_profile, fn.output_bits)


def train_candidate(
    candidate: BooleanCandidate,
    fn: BooleanFunction,
    settings: BooleanSettings,
    seeds: Sequence[int],
    prune: bool | None = None,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    required_successes: int | None = None,
) -> CandidateOutcome:
    """Train one candidate on each seed in turn; stop once the required share is out of reach.

    `on_epoch(seed_index, metrics)` sees every epoch (e.g. to report to Optuna). With `prune`
    (default: the settings'), each seed also stops once `TargetUnreachable` says so.
    """
    prune = settings.prune if prune is None else prune
    required = settings.required_successes if required_successes is None else required_successes
    task = fn.task()
    runs: list[SeedRun] = []
    for index, seed in enumerate(seeds):
        rule = TargetUnreachable(settings.target_loss, candidate.epochs) if prune else None

        def callback(metrics: EpochMetrics, index: int = index, rule=rule) -> bool:
            if on_epoch is not None:
                on_epoch(index, metrics)
            return bool(rule and rule(metrics))

        model = build_boolean_net(candidate, fn, seed)
        result = train(model, task, candidate.train_config(settings, seed), callback)
        runs.append(SeedRun(seed, result, result.reached_target))
        successes = sum(r.learned for r in runs)
        if prune and successes + (len(seeds) - len(runs)) < required:
            break  # the required share can no longer be reached: save the remaining seeds
    return CandidateOutcome(candidate, runs, len(seeds), required, settings.target_loss)


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

    def __call__(self, trial: optuna.Trial) -> float:
        candidate = self.space.suggest(trial, self.settings)

        every = report_every(candidate.epochs)

        def report(seed_index: int, metrics: EpochMetrics) -> None:
            interrupt.check(trial)
            if seed_index == 0 and metrics.epoch % every == 0:
                trial.report(metrics.eval_loss, metrics.epoch)

        try:
            outcome = train_candidate(
                candidate, self.fn, self.settings, self.seeds_for(trial.number), on_epoch=report
            )
        except NonFiniteLossError as error:
            trial.set_user_attr("fail_reason", str(error))
            raise  # the study's `catch` fails this trial and goes on
        record_outcome(trial, outcome, self.fn)
        if outcome.abandoned and not outcome.learns:
            raise optuna.TrialPruned(
                f"cannot learn f within the budget ({outcome.successes}/"
                f"{outcome.required_successes} seeds)"
            )
        return float(candidate.neurons)


def record_outcome(trial: optuna.Trial, outcome: CandidateOutcome, fn: BooleanFunction) -> None:
    """Store a candidate's outcome on its trial: user attributes and the constraint."""
    for key, value in outcome.user_attrs(fn.input_bits, fn.output_bits).items():
        trial.set_user_attr(key, value)
    trial.set_constraint("learns_f", outcome.constraint)


class PopulationBatch:
    """Ask K trials at once, train all their seeds as one population, tell every result.

    Optuna's heartbeat covers `study.optimize` only; here each asked trial's heartbeat is
    recorded by hand (at ask and then every few seconds), so that a crash leaves trials that
    the next run finds stale, fails, and re-enqueues with the same parameters.
    """

    def __init__(
        self, space: ModuleType, settings: BooleanSettings, device: str | torch.device = "auto"
    ) -> None:
        self.objective = BooleanObjective(space, settings, device)
        self.space, self.settings, self.fn = space, settings, self.objective.fn

    def run(self, study: optuna.Study, size: int) -> list[optuna.trial.FrozenTrial]:
        """One population of `size` trials: ask, train together, tell. Returns the told trials."""
        from study.population import Member, train_population

        settings, storage = self.settings, study._storage
        heartbeat = getattr(storage, "record_heartbeat", None)
        interval = storage.get_heartbeat_interval() if heartbeat is not None else None
        if interval is None:
            heartbeat = None
        trials = []
        with warnings.catch_warnings():
            # ask/tell with a heartbeat storage: the heartbeat is recorded here, by hand, right
            # after each ask (a RUNNING trial without any heartbeat would never turn stale)
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            for _ in range(size):
                trials.append(study.ask())
                if heartbeat is not None:
                    heartbeat(trials[-1]._trial_id)
        beat_at = time.monotonic()
        candidates = [self.space.suggest(trial, settings) for trial in trials]
        members, owner = [], []
        for j, (trial, candidate) in enumerate(zip(trials, candidates, strict=True)):
            for seed in self.objective.seeds_for(trial.number):
                members.append(Member(candidate, seed))
                owner.append(j)
        first_member = {j: owner.index(j) for j in range(len(trials))}
        rules = [
            TargetUnreachable(settings.target_loss, m.candidate.epochs) if settings.prune else None
            for m in members
        ]
        every = [report_every(c.epochs) for c in candidates]
        successes = [0] * len(trials)
        failures = [0] * len(trials)

        def on_epoch(i: int, metrics: EpochMetrics) -> bool:
            nonlocal beat_at
            j = owner[i]
            if i == first_member[j] and metrics.epoch % every[j] == 0:
                trials[j].report(metrics.eval_loss, metrics.epoch)
            if heartbeat is not None and time.monotonic() - beat_at > interval / 2:
                beat_at = time.monotonic()
                for trial in trials:
                    heartbeat(trial._trial_id)
            rule = rules[i]
            return bool(rule and rule(metrics))

        def after_epoch(finished: dict[int, bool]) -> set[int]:
            hopeless: set[int] = set()
            for i, reached in finished.items():
                j = owner[i]
                if reached:
                    successes[j] += 1
                else:
                    failures[j] += 1
                if settings.prune and settings.seeds - failures[j] < settings.required_successes:
                    hopeless |= {m for m, o in enumerate(owner) if o == j}
            return hopeless

        def after_epoch_or_stop(finished: dict[int, bool]) -> set[int]:
            interrupt.check()
            return after_epoch(finished)

        try:
            results = train_population(
                members, self.fn, settings.target_loss, on_epoch, after_epoch_or_stop
            )
        except interrupt.Interrupted:
            for trial in trials:  # the whole population stops: fail its trials with the reason
                trial.set_user_attr("fail_reason", interrupt.REASON)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        told = []
        for j, (trial, candidate) in enumerate(zip(trials, candidates, strict=True)):
            runs = [
                SeedRun(members[i].seed, results[i], results[i].reached_target)
                for i in range(len(members))
                if owner[i] == j
            ]
            trial.set_user_attr("population_size", len(members))
            diverged = [
                r.result.extra["non_finite"] for r in runs if "non_finite" in r.result.extra
            ]
            if diverged:  # as in the sequential path: the trial fails with its reason
                trial.set_user_attr("fail_reason", diverged[0])
                told.append(study.tell(trial, state=optuna.trial.TrialState.FAIL))
                continue
            outcome = CandidateOutcome(
                candidate,
                runs,
                settings.seeds,
                settings.required_successes,
                settings.target_loss,
            )
            record_outcome(trial, outcome, self.fn)
            if outcome.abandoned and not outcome.learns:
                told.append(study.tell(trial, state=optuna.trial.TrialState.PRUNED))
            else:
                told.append(study.tell(trial, float(candidate.neurons)))
        return told


# ----------------------------------------------------------------------------------------------
# Image studies (FashionMNIST, MNIST)


class TrialOutOfMemory(RuntimeError):
    """A trial's model did not fit in device memory: that trial fails, the study goes on."""


def image_pruner() -> optuna.pruners.BasePruner:
    """Median rule: stop a trial whose validation accuracy after epoch k is below the median of
    earlier trials at epoch k. Waits for 4 finished trials, never judges epochs 1-2, and judges
    epoch k only when at least 3 earlier trials reached it (so that a long trial is not cut
    near its end against a single earlier one)."""
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=3, n_min_trials=3)


def history_rows(result_history: Sequence[EpochMetrics]) -> list[dict[str, float]]:
    """Per-epoch metrics as compact JSON-able rows (stored with the trial for the reports)."""
    return [
        {
            "epoch": m.epoch,
            "train_loss": round(m.train_loss, 5),
            "train_accuracy": round(m.train_accuracy or 0.0, 5),
            "val_loss": round(m.eval_loss, 5),
            "val_accuracy": round(m.eval_accuracy, 5),
            "seconds": round(m.seconds, 2),
        }
        for m in result_history
    ]


def prepare_model(candidate, image_shape, num_classes, device: torch.device) -> torch.nn.Module:
    """Build a candidate's network on `device`; CNNs in channels_last (NHWC) memory format."""
    model = candidate.build(image_shape, num_classes).to(device)
    if candidate.is_cnn:
        model = model.to(memory_format=torch.channels_last)
    return model


class ImageObjective:
    """Optuna objective of an image study: the final validation accuracy of one training.

    The dataset is read once per process and lives on the device; every trial trains on the
    training part of the seeded split and reports validation accuracy after each epoch.
    """

    def __init__(
        self,
        space: ModuleType,
        settings,
        device: str | torch.device = "auto",
        data_dir=None,
    ) -> None:
        from study.data import load_image_dataset

        self.space = space
        self.settings = settings
        self.device = dev.resolve_device(device)
        self.dataset = load_image_dataset(
            settings.dataset,
            data_dir,
            device=self.device,
            validation_size=settings.validation_size,
            split_seed=settings.split_seed,
        )
        self.task = self.dataset.search_task()

    def __call__(self, trial: optuna.Trial) -> float:
        candidate = self.space.suggest(trial, self.settings)
        trial.set_user_attr("learning_rate", candidate.train.learning_rate)
        trial.set_user_attr("config", candidate.to_dict())
        with dev.seeded(self.settings.seed):
            model = prepare_model(
                candidate, self.dataset.image_shape, self.dataset.num_classes, self.device
            )
        trial.set_user_attr("parameters", count_parameters(model))
        trial.set_user_attr("device", dev.describe(self.device))
        history: list[EpochMetrics] = []

        def on_epoch(metrics: EpochMetrics) -> None:
            history.append(metrics)
            interrupt.check(trial)
            trial.report(metrics.eval_accuracy, metrics.epoch)
            # the last epoch is done anyway: a trial that got there completes
            if metrics.epoch < candidate.train.epochs and trial.should_prune():
                raise optuna.TrialPruned(
                    f"validation accuracy {metrics.eval_accuracy:.4f} after epoch "
                    f"{metrics.epoch} is below the median of earlier trials"
                )

        reason = None
        try:
            result = train(model, self.task, candidate.train, on_epoch)
        except torch.cuda.OutOfMemoryError as error:
            reason = f"device out of memory: {str(error).splitlines()[0]}"
        except NonFiniteLossError as error:
            trial.set_user_attr("fail_reason", str(error))
            raise  # the study's `catch` fails this trial and goes on
        finally:
            # however the trial ends (complete, pruned, interrupted, failed): what it learned,
            # written once rather than every epoch
            if history:
                trial.set_user_attr("history", history_rows(history))
                trial.set_user_attr("seconds_per_epoch", history[-1].seconds / len(history))
            trial.set_user_attr("peak_memory_bytes", dev.peak_memory_bytes(self.device))
        if reason is not None:
            # outside the except block: the traceback (and the tensors its frames hold) is gone
            del model
            dev.release_memory(self.device)
            trial.set_user_attr("fail_reason", reason)
            raise TrialOutOfMemory(reason)
        return result.final.eval_accuracy
