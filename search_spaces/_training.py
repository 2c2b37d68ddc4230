"""The training hyperparameters shared by the image spaces (FashionMNIST, MNIST).

What wins at small compute, as a space: SGD with Nesterov momentum beside AdamW (each with its
own learning-rate and weight-decay range, under its own parameter names, so that TPE never
mixes their densities), cosine or one-cycle decay after a linear warm-up, label smoothing,
augmentation (random crop, flip, random erasing), an average of the weights and test-time
flip. The epoch count is not searched: it is the study's resource (`max_epochs`), the same
for every trial, so that a pruner compares trials at the same point of the same schedule.
"""

from __future__ import annotations

import optuna

from study.config import ImageSettings, TrainConfig

OPTIMIZERS = ("sgd", "adamw")
LEARNING_RATES = {"sgd": (0.02, 0.4), "adamw": (3e-4, 6e-3)}
"""Peak learning rate, log scale: SGD (Nesterov, momentum 0.9) and AdamW live apart."""
WEIGHT_DECAYS = {"sgd": (1e-5, 2e-3), "adamw": (1e-4, 0.2)}
"""L2 for SGD (coupled), decoupled for AdamW: different scales, log scale."""
BATCH_SIZES = (128, 256)
"""Batches of 512 take a quarter of the steps of 128 in an epoch: too few in 18 epochs."""
SCHEDULES = ("cosine", "onecycle")
EMA_HORIZONS = (0.0, 0.02, 0.08)
"""Span of the weight average as a share of the run's steps (0: none): at 18 epochs of batch
128 (7,000 steps) 0.02 and 0.08 are per-step decays of about 0.993 and 0.998, and they mean the
same at the 2 epochs of a planned study's first rung (a fixed decay of 0.998 would average
that short run's first, untrained weights in)."""


def suggest_training(trial: optuna.trial.BaseTrial, settings: ImageSettings) -> TrainConfig:
    """Optimiser, learning rate and weight decay (log), schedule and warm-up, batch size,
    label smoothing, augmentation, weight average and test-time flip; `max_epochs` epochs."""
    optimizer = trial.suggest_categorical("optimizer", list(OPTIMIZERS))
    return TrainConfig(
        optimizer=optimizer,
        learning_rate=trial.suggest_float(f"lr_{optimizer}", *LEARNING_RATES[optimizer], log=True),
        weight_decay=trial.suggest_float(f"wd_{optimizer}", *WEIGHT_DECAYS[optimizer], log=True),
        nesterov=optimizer == "sgd",
        lr_schedule=trial.suggest_categorical("lr_schedule", list(SCHEDULES)),
        warmup_fraction=trial.suggest_float("warmup_fraction", 0.0, 0.3),
        batch_size=trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
        epochs=settings.max_epochs,
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.15),
        crop_padding=trial.suggest_int("crop_padding", 0, 2),
        flip=trial.suggest_categorical("flip", [False, True]),
        erase_probability=trial.suggest_float("erase_probability", 0.0, 0.4),
        ema_horizon=trial.suggest_categorical("ema_horizon", list(EMA_HORIZONS)),
        test_time_flip=trial.suggest_categorical("test_time_flip", [False, True]),
        seed=settings.seed,
    )


def plain_training(optimizer: str, learning_rate: float, weight_decay: float) -> dict:
    """A baseline's training as params of this space: cosine decay without warm-up, batch 128,
    and none of the extras (no smoothing, augmentation, average or flip)."""
    return {
        "optimizer": optimizer,
        f"lr_{optimizer}": learning_rate,
        f"wd_{optimizer}": weight_decay,
        "lr_schedule": "cosine",
        "warmup_fraction": 0.0,
        "batch_size": 128,
        "label_smoothing": 0.0,
        "crop_padding": 0,
        "flip": False,
        "erase_probability": 0.0,
        "ema_horizon": 0.0,
        "test_time_flip": False,
    }
