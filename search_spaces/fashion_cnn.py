"""FashionMNIST (or MNIST) with a convolutional network, the tutorial's "challenge of the day".

Question: the validation accuracy of the best small CNN this machine can train in the
study's budget: 2 or 3 conv blocks (each conv -> batch norm -> ReLU -> 2x2 max pool, then
optionally a residual unit of two more convolutions), their widths, the head (a dense layer
or none; flattened pixels or a global average), dropout, and the training of the shared
image space (`_training`: SGD-Nesterov or AdamW, cosine or one-cycle with warm-up, label
smoothing, random crop, flip and erasing, a weight average, test-time flip).

- Objective: accuracy on a seeded validation split of the training images (maximise),
  reported every epoch for the pruner. The test set is used only by `study export`.
- Resource: epochs; every trial is scheduled for `max_epochs`, and a multi-fidelity pruner
  stops the weak ones early (`min_epochs` is its smallest rung).
- Fixed: the dataset, the split, the training seed.
"""

from __future__ import annotations

import optuna

from search_spaces._training import plain_training, suggest_training
from study.config import ImageCandidate, ImageSettings

NAME = "fashion-cnn"
KIND = "image"
DIRECTION = "maximize"
WIDTHS = ((16, 24, 32, 48), (32, 48, 64, 96), (64, 96, 128))
"""Channels each block may have (first, second, third)."""
HEAD_WIDTHS = (0, 128, 256)


def base_settings() -> ImageSettings:
    return ImageSettings(min_epochs=3, max_epochs=18)


def suggest(trial: optuna.trial.BaseTrial, settings: ImageSettings) -> ImageCandidate:
    count = trial.suggest_int("blocks", 2, 3)
    residual = trial.suggest_categorical("residual", [False, True])
    blocks = [
        {
            "channels": trial.suggest_categorical(f"channels_{i}", list(WIDTHS[i])),
            "kernel_size": 3,
            "batch_norm": True,
            "pool": "max",
            "residual": residual and i > 0,  # residual units at 14x14 and below
        }
        for i in range(count)
    ]
    architecture = {
        "type": "cnn",
        "blocks": blocks,
        "head_width": trial.suggest_categorical("head_width", list(HEAD_WIDTHS)),
        "global_pool": trial.suggest_categorical("global_pool", [False, True]),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
    }
    return ImageCandidate(architecture, suggest_training(trial, settings))


def baseline(settings: ImageSettings) -> dict:
    """The first trial of a new study: the textbook two-block CNN (32 and 64 channels, 3x3,
    batch norm, max pooling, a 128-wide head, dropout 0.3) with AdamW and a cosine schedule,
    none of the extras: what a user would type by hand, and what the search must beat."""
    return {
        "blocks": 2,
        "residual": False,
        "channels_0": 32,
        "channels_1": 64,
        "head_width": 128,
        "global_pool": False,
        "dropout": 0.3,
        **plain_training("adamw", 2e-3, 1e-4),
    }
