"""Boolean width, several hidden layers: what is the least total w_2 that learns f?

Question: the smallest total number of hidden ReLU neurons w_2, spread over 2 to 4 hidden
layers, with which a network learns the same random Boolean function {0,1}^8 -> {0,1}^8 to
a full-table mean BCE of at most 0.001 (all bits right), for the required share of seeds.

- Scientific: the number of hidden layers and the width of each (neurons = sum of widths).
- Nuisance: Adam's learning rate (log scale), the batch size, and the epoch budget up to the
  study's cap (training stops at the target).
- Fixed: as in `boolean_shallow` (function, target, cap, seeds r, required share, Adam, fp32).
"""

from __future__ import annotations

import optuna

from study.config import BooleanCandidate, BooleanSettings

NAME = "boolean-deep"
KIND = "boolean"


def base_settings() -> BooleanSettings:
    """Defaults of this study; the CLI overrides single fields."""
    return BooleanSettings(min_width=1, max_width=128, min_layers=2, max_layers=4)


def suggest(trial: optuna.trial.BaseTrial, settings: BooleanSettings) -> BooleanCandidate:
    """Sample one candidate: a depth, a width per layer, and the training budget."""
    layers = trial.suggest_int("layers", settings.min_layers, settings.max_layers)
    profile = tuple(
        trial.suggest_int(f"width_{i}", settings.min_width, settings.max_width, log=True)
        for i in range(layers)
    )
    learning_rate = trial.suggest_float(
        "learning_rate", settings.min_learning_rate, settings.max_learning_rate, log=True
    )
    batch_size = trial.suggest_categorical("batch_size", list(settings.batch_sizes))
    epochs = trial.suggest_int("epochs", settings.min_epochs, settings.max_epochs, log=True)
    return BooleanCandidate(profile, learning_rate, batch_size, epochs)
