"""FashionMNIST (or MNIST) with a convolutional network, the tutorial's "challenge of the day".

Question: the validation accuracy of the best CNN: conv blocks (count, channels, kernel size,
batch norm, pooling), dense head width, dropout, and the training hyperparameters of the MLP
space (optimiser, learning rate, schedule, batch size, epochs, weight decay).

- Objective: accuracy on a seeded validation split of the training images (maximise),
  reported every epoch for the pruner. The test set is used only by `study export`.
- Fixed: the dataset, the split, the epoch range (smaller than the MLP's: a CNN epoch costs
  4-10x more on a CPU), the training seed.
"""

from __future__ import annotations

import optuna

from search_spaces._training import suggest_training
from study.config import ImageCandidate, ImageSettings

NAME = "fashion-cnn"
KIND = "image"
DIRECTION = "maximize"
CHANNELS = (16, 32, 64)
HEAD_WIDTHS = (0, 64, 128, 256)


def base_settings() -> ImageSettings:
    return ImageSettings(min_epochs=6, max_epochs=15)


def suggest(trial: optuna.trial.BaseTrial, settings: ImageSettings) -> ImageCandidate:
    count = trial.suggest_int("blocks", 1, 3)
    batch_norm = trial.suggest_categorical("batch_norm", [True, False])
    pool = trial.suggest_categorical("pool", ["max", "avg"])
    blocks = [
        {
            "channels": trial.suggest_categorical(f"channels_{i}", list(CHANNELS)),
            "kernel_size": trial.suggest_categorical(f"kernel_size_{i}", [3, 5]),
            "batch_norm": batch_norm,
            "pool": pool,
        }
        for i in range(count)
    ]
    architecture = {
        "type": "cnn",
        "blocks": blocks,
        "head_width": trial.suggest_categorical("head_width", list(HEAD_WIDTHS)),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
    }
    return ImageCandidate(architecture, suggest_training(trial, settings))


def baseline(settings: ImageSettings) -> dict:
    """The first trial of a new study: a textbook two-block CNN (32 and 64 channels, 3x3,
    batch norm, max pooling, a 128-wide head) with AdamW and a cosine schedule."""
    return {
        "blocks": 2,
        "batch_norm": True,
        "pool": "max",
        "channels_0": 32,
        "kernel_size_0": 3,
        "channels_1": 64,
        "kernel_size_1": 3,
        "head_width": 128,
        "dropout": 0.3,
        "optimizer": "adamw",
        "learning_rate_adam": 2e-3,
        "lr_schedule": "cosine",
        "batch_size": 128,
        "epochs": max(settings.min_epochs, min(settings.max_epochs, 15)),
        "weight_decay": 1e-4,
    }
