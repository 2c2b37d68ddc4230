"""FashionMNIST (or MNIST) with a multilayer perceptron: which training and which profile?

Question: the validation accuracy of the best MLP: hidden profile (1 to 4 layers), dropout,
and the training of the shared image space (`_training`: SGD-Nesterov or AdamW, cosine or
one-cycle with warm-up, label smoothing, random crop, flip and erasing, a weight average,
test-time flip); the tutorial's 512-512 network trained by hand is its baseline.

- Objective: accuracy on a seeded validation split of the 60k training images (maximise),
  reported every epoch so that the pruner can stop weak trials. The test set is used only
  by `study export`, once, for the chosen configuration.
- Resource: epochs; every trial is scheduled for `max_epochs` (`min_epochs`: the pruner's
  smallest rung).
- Fixed: the dataset, the split (`split_seed`, `validation_size`), the training seed.
"""

from __future__ import annotations

import optuna

from search_spaces._training import plain_training, suggest_training
from study.config import ImageCandidate, ImageSettings

NAME = "fashion-mlp"
KIND = "image"
DIRECTION = "maximize"
MIN_WIDTH, MAX_WIDTH = 32, 1024


def base_settings() -> ImageSettings:
    return ImageSettings(min_epochs=3, max_epochs=27)


def suggest(trial: optuna.trial.BaseTrial, settings: ImageSettings) -> ImageCandidate:
    layers = trial.suggest_int("layers", 1, 4)
    profile = [
        trial.suggest_int(f"width_{i}", MIN_WIDTH, MAX_WIDTH, log=True) for i in range(layers)
    ]
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    architecture = {"type": "mlp", "hidden_layer_profile": profile, "dropout": dropout}
    return ImageCandidate(architecture, suggest_training(trial, settings))


def baseline(settings: ImageSettings) -> dict:
    """The first trial of a new study: the tutorial's 512-512 network with a sound training
    (AdamW, cosine schedule, dropout) and none of the extras, so that the search is measured
    against it."""
    return {
        "layers": 2,
        "width_0": 512,
        "width_1": 512,
        "dropout": 0.2,
        **plain_training("adamw", 1e-3, 1e-4),
    }
