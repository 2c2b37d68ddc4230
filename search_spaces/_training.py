"""The training hyperparameters shared by the image spaces (FashionMNIST, MNIST)."""

from __future__ import annotations

import optuna

from study.config import ImageSettings, TrainConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
# SGD (momentum 0.9) and the Adam family live at different step sizes: one log range each,
# under its own parameter name, so that TPE never mixes their densities.
LEARNING_RATES = {"sgd": (1e-3, 0.3), "adam": (1e-4, 1e-2)}
BATCH_SIZES = (64, 128, 256, 512)


def learning_rate_param(optimizer: str) -> str:
    """The parameter name of the learning rate for `optimizer`."""
    return "learning_rate_sgd" if optimizer == "sgd" else "learning_rate_adam"


def suggest_training(trial: optuna.trial.BaseTrial, settings: ImageSettings) -> TrainConfig:
    """Optimiser, learning rate (log), schedule, batch size, epochs and weight decay (log)."""
    optimizer = trial.suggest_categorical("optimizer", list(OPTIMIZERS))
    low, high = LEARNING_RATES["sgd" if optimizer == "sgd" else "adam"]
    learning_rate = trial.suggest_float(learning_rate_param(optimizer), low, high, log=True)
    return TrainConfig(
        optimizer=optimizer,
        learning_rate=learning_rate,
        lr_schedule=trial.suggest_categorical("lr_schedule", ["constant", "cosine"]),
        batch_size=trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
        epochs=trial.suggest_int("epochs", settings.min_epochs, settings.max_epochs),
        weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        seed=settings.seed,
    )
