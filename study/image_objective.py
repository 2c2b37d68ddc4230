"""The Optuna objective of the image studies (FashionMNIST, MNIST).

An image study maximises the validation accuracy after a trial's last epoch, reported after
every epoch to the study's pruner. `export.py` retrains the chosen configuration with the same
`prepare_model` and stores its history with `history_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

import optuna
import torch

from study import device as dev
from study import interrupt
from study.config import ImageSettings
from study.errors import TrialFailed, first_line
from study.models import count_parameters
from study.trainer import EpochMetrics, train


class TrialOutOfMemory(TrialFailed):
    """A trial's model did not fit in device memory: that trial fails, the study goes on."""


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
        settings: ImageSettings,
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
        self.progress: Callable[[str], None] | None = None
        """Told after every epoch (epoch k of E, validation accuracy, seconds per epoch)."""

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
        trial.set_user_attr("engine", "sequential")
        trial.set_user_attr("threads", torch.get_num_threads() if self.device.type == "cpu" else 1)
        history: list[EpochMetrics] = []

        def on_epoch(metrics: EpochMetrics) -> None:
            history.append(metrics)
            if self.progress is not None:
                self.progress(
                    f"trial {trial.number}: epoch {metrics.epoch}/{candidate.train.epochs}, "
                    f"val {metrics.eval_accuracy:.4f}, "
                    f"{metrics.seconds / metrics.epoch:.1f} s/epoch"
                )
            if metrics.epoch < candidate.train.epochs:
                interrupt.check(trial)  # after the last epoch the trial is done: it is kept
            trial.report(metrics.eval_accuracy, metrics.epoch)
            # the last epoch is done anyway: a trial that got there completes
            if metrics.epoch < candidate.train.epochs and trial.should_prune():
                raise optuna.TrialPruned(
                    f"validation accuracy {metrics.eval_accuracy:.4f} after epoch "
                    f"{metrics.epoch} is below what the study's pruner keeps at that epoch"
                )

        reason = None
        try:
            result = train(model, self.task, candidate.train, on_epoch)
        except torch.cuda.OutOfMemoryError as error:
            reason = f"device out of memory: {first_line(error)}"
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
        if result.divergence is not None:
            trial.set_user_attr("fail_reason", str(result.divergence))
            raise TrialFailed(str(result.divergence))  # the study's `catch` fails it, goes on
        return result.final.eval_accuracy
