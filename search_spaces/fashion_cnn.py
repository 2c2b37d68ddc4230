"""FashionMNIST (or MNIST) with a convolutional network, the tutorial's "challenge of the day":
which small CNN and which training reach the best validation accuracy in the budget?

Question: the validation accuracy of the best small CNN this machine can train in the
study's budget: 2 or 3 conv blocks (each conv -> batch norm -> ReLU -> 2x2 max pool, then
optionally a residual unit of two more convolutions), their widths, the head (a dense layer
or none, on the flattened pixels), dropout, and the training of the shared image space
(`_training`: SGD-Nesterov or AdamW, cosine or one-cycle with warm-up, label smoothing,
random crop, flip and erasing, a weight average, test-time flip).

The ranges are those an hour of this 2-core CPU can use (results/summary.md, FashionMNIST).
In the first reference run, on a wider space, every trial with a global average over the
final maps stood 1-12 points below the baseline at epoch 9; batches of 512 (94 steps an
epoch, against 375 at 128) left their best trial below it; and 96-channel blocks at 14x14
cost 50-70 s an epoch on one thread, so that such a trial could not finish in the hour.
Those are out: the head reads the flattened maps, batches are 128 or 256, and widths stop
at 64 channels at 14x14.
"""

from __future__ import annotations

import optuna

from search_spaces._training import plain_training, suggest_training
from study.config import ImageCandidate, ImageSettings

NAME = "fashion-cnn"
KIND = "image"
DIRECTION = "maximize"
WIDTHS = ((16, 32), (32, 48, 64), (64, 128))
"""Channels each block may have (first, second, third)."""
HEAD_WIDTHS = (0, 128)


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
        "global_pool": False,
        "dropout": trial.suggest_float("dropout", 0.0, 0.3),
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
        "dropout": 0.3,
        **plain_training("adamw", 2e-3, 1e-4),
    }
