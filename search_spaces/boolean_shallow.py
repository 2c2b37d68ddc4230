"""Boolean width, one hidden layer: what is the least width w_1 that learns f?

Question: the smallest number of hidden ReLU neurons w_1 with which a one-hidden-layer
network learns a random Boolean function f: {0,1}^8 -> {0,1}^8 to a full-table mean BCE of
at most 0.001 (all 2048 bits right), for the required share of initialisation seeds.

- Scientific: the hidden width (neurons = width).
- Nuisance (tuned so every width gets a fair chance): Adam's learning rate (log scale), the
  batch size, and the epoch budget up to the study's cap (training stops at the target).
- Fixed: the function (`function_seed`), the target loss, the epoch cap, the seeds per trial
  r and the required share, Adam, fp32, the full truth table as both training and test set.
"""

from __future__ import annotations

import optuna

from study.config import BooleanCandidate, BooleanSettings

NAME = "boolean-shallow"
KIND = "boolean"


def base_settings() -> BooleanSettings:
    """Defaults of this study; the CLI overrides single fields."""
    return BooleanSettings(min_width=1, max_width=256, min_layers=1, max_layers=1)


def suggest(trial: optuna.trial.BaseTrial, settings: BooleanSettings) -> BooleanCandidate:
    """Sample one candidate: a width and its training budget."""
    width = trial.suggest_int("width", settings.min_width, settings.max_width, log=True)
    learning_rate = trial.suggest_float(
        "learning_rate", settings.min_learning_rate, settings.max_learning_rate, log=True
    )
    batch_size = trial.suggest_categorical("batch_size", list(settings.batch_sizes))
    epochs = trial.suggest_int("epochs", settings.min_epochs, settings.max_epochs, log=True)
    return BooleanCandidate((width,), learning_rate, batch_size, epochs)
