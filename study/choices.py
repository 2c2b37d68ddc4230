"""The samplers and pruners a study may run with, by name (`study run --sampler/--pruner`).

The choice is stored with the study (user attribute `run`) and shown in its report; a resumed
study keeps it, and a flag that contradicts it is refused.
"""

from __future__ import annotations

import optuna

from study.config import ImageSettings
from study.errors import ConfigError
from study.studies import stored_attrs

SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp")
"""tpe: multivariate, grouped TPE with constant liar (the default); random; qmc (scrambled
Sobol); cmaes and gp model the parameters every trial has (the rest of a conditional space is
sampled at random)."""
IMAGE_PRUNERS = ("median", "quartile", "hyperband", "successive-halving", "none")
"""median: stops a trial below the median of finished trials at the same epoch; quartile: only
below their lowest quarter, for spaces whose best trials start slow (augmentation, a high
learning rate) and would lose to plain ones at an early epoch; hyperband and successive halving:
the multi-fidelity pruners on epochs; none."""
BOOLEAN_PRUNERS = ("target-unreachable", "none")
"""A Boolean trial's fate is its own distance to a fixed target: the rule `TargetUnreachable`
(study.boolean_trial) or nothing."""
DEFAULT_SAMPLER = "tpe"
DEFAULT_PRUNERS = {"image": "quartile", "boolean": "target-unreachable"}
"""For new studies. Image: measured on today's fashion-mlp space at equal wall time (`study bench
pruners --study fashion-mlp --pruners median,quartile,hyperband --minutes 15 --repeats 3`, the
three side by side on the 2-core CPU, results/bench/pruners-cpu.txt): the best searched trial
(the enqueued baseline excluded) reached 0.9001/0.9005/0.8945 with the quartile rule against
0.8873/0.9005/0.8945 with the median pruner and 0.8850/0.9005/0.8945 with Hyperband: never
worse in a repetition, better in one. No pruner's search beat the baseline (0.9020) in 15
minutes, so the margin is small; the quartile rule is also what the one-hour fashion-cnn
reference run used. Studies stored before the choices existed keep median (`BEFORE_CHOICES`)."""
KEEP_PERCENT = {"median": 50.0, "quartile": 75.0}
"""The share of finished trials' values at an epoch that a trial must reach to go on."""
RUN_ATTR = "run"
REDUCTION_FACTOR = 3
"""Successive halving and Hyperband keep a third of the trials at each rung."""
BEFORE_CHOICES = {"image": "median", "boolean": "target-unreachable"}
"""What a study stored before the choice existed ran with (TPE and these pruners)."""


def stored_run(study: optuna.Study, kind: str) -> dict:
    """The sampler and pruner (and an image study's fidelity) a stored study runs with."""
    before = {"sampler": "tpe", "pruner": BEFORE_CHOICES[kind]}
    if kind == "image":
        before["fidelity"] = "fixed"  # studies stored before plans existed
    return {**before, **stored_attrs(study).get(RUN_ATTR, {})}


def pruners_for(kind: str) -> tuple[str, ...]:
    return IMAGE_PRUNERS if kind == "image" else BOOLEAN_PRUNERS


def check(sampler: str | None, pruner: str | None, kind: str) -> None:
    """One line for a sampler or pruner the study's kind does not have."""
    if sampler is not None and sampler not in SAMPLERS:
        raise ConfigError(f"sampler: must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if pruner is not None and pruner not in pruners_for(kind):
        raise ConfigError(
            f"pruner: a {kind} study takes one of {', '.join(pruners_for(kind))}, got {pruner!r}"
        )


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler called `name`, seeded."""
    if name == "tpe":  # grouped: the deep and image spaces are conditional on a layer count
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=8
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(
            seed=seed, scramble=True, warn_independent_sampling=False
        )
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=8, warn_independent_sampling=False
        )
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=8)


def make_image_pruner(name: str, settings: ImageSettings) -> optuna.pruners.BasePruner:
    """The pruner called `name` for an image study. Epochs are its resource: every trial is
    scheduled for `max_epochs`, and `min_epochs` is the first rung of the multi-fidelity
    pruners (successive halving and Hyperband, reduction factor 3: rungs at min, 3 min, 9 min,
    ... epochs; Hyperband runs floor(log3(max / min)) + 1 brackets)."""
    low, high = settings.min_epochs, settings.max_epochs
    if name in ("median", "quartile"):
        # waits for 4 finished trials, judges from epoch `min_epochs` on, and judges epoch k
        # only when at least 3 finished trials reached it; keeps the top half or three quarters
        return optuna.pruners.PercentilePruner(
            KEEP_PERCENT[name], n_startup_trials=4, n_warmup_steps=low, n_min_trials=3
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=low, max_resource=high, reduction_factor=REDUCTION_FACTOR
        )
    if name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=low, reduction_factor=REDUCTION_FACTOR, min_early_stopping_rate=0
        )
    return optuna.pruners.NopPruner()


def rungs(settings: ImageSettings) -> list[int]:
    """The epochs at which the multi-fidelity pruners judge a trial (successive halving)."""
    found, epoch = [], settings.min_epochs
    while epoch < settings.max_epochs:
        found.append(epoch)
        epoch *= REDUCTION_FACTOR
    return [*found, settings.max_epochs]
