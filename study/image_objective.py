"""The Optuna objective of the image studies (FashionMNIST, MNIST).

An image study maximises the validation accuracy after a trial's last epoch, reported after
every epoch to the study's pruner. `export.py` retrains the chosen configuration with the same
`prepare_model` and stores its history with `history_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import ModuleType

import optuna
import torch

from study import checkpoints, interrupt
from study import device as dev
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
        rungs: Sequence[int] | None = None,
        storage: str | None = None,
    ) -> None:
        from study.data import load_image_dataset

        self.space = space
        self.settings = settings
        self.rungs = tuple(rungs) if rungs else None
        """A planned study's rungs (epochs); None: every trial trains `max_epochs`."""
        self.storage = storage
        """The store's URL: a trial stopped by the time budget keeps its checkpoint in the
        store's artifacts (None: no checkpoints)."""
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

    def _settings_of(self, trial: optuna.Trial) -> ImageSettings:
        """The settings a trial is suggested with: a planned trial's epochs are its rung's."""
        if self.rungs is None:
            return self.settings
        from study.plan import RUNG_ATTR

        rung = int(trial.user_attrs.get(RUNG_ATTR, 0))
        if RUNG_ATTR not in trial.user_attrs:
            trial.set_user_attr(RUNG_ATTR, rung)  # a new configuration starts at rung 0
        epochs = self.rungs[min(rung, len(self.rungs) - 1)]
        return self.settings.replace(
            max_epochs=epochs, min_epochs=min(self.settings.min_epochs, epochs)
        )

    def __call__(self, trial: optuna.Trial) -> float:
        candidate = self.space.suggest(trial, self._settings_of(trial))
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
        trial.set_user_attr("precision", dev.precision_name(self.device))
        history: list[EpochMetrics] = []
        resume, resumed_from = checkpoints.load(self.storage, trial)
        if resume is not None:  # a trial stopped by a time budget goes on where it stopped
            history.extend(EpochMetrics(**row) for row in resume["history"])
            for metrics in history:
                trial.report(metrics.eval_accuracy, metrics.epoch)
            trial.set_user_attr("resumed_after_epoch", resume["epoch"])

        def keep(error: BaseException, snapshot) -> None:
            stop = interrupt.stop_of(error)
            if stop is not None and stop.requeue and self.storage is not None:
                checkpoints.save(self.storage, trial, snapshot())

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
            result = train(
                model, self.task, candidate.train, on_epoch, resume=resume, on_stop=keep
            )
        except torch.cuda.OutOfMemoryError as error:
            reason = f"device out of memory: {first_line(error)}"
        finally:
            # however the trial ends (complete, pruned, interrupted, failed): what it learned,
            # written once rather than every epoch
            if history:
                trial.set_user_attr("history", history_rows(history))
                trial.set_user_attr("seconds_per_epoch", history[-1].seconds / len(history))
            trial.set_user_attr("peak_memory_bytes", dev.peak_memory_bytes(self.device))
            # the checkpoint it went on from is spent (a stop again saved a newer one)
            checkpoints.discard(self.storage, resumed_from)
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


def baseline_candidate(space: ModuleType, settings: ImageSettings):
    """The space's baseline as a candidate (its first sample at random where it has none)."""
    if hasattr(space, "baseline"):
        return space.suggest(optuna.trial.FixedTrial(space.baseline(settings)), settings)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return space.suggest(study.ask(), settings)


def calibrate(
    space: ModuleType,
    settings: ImageSettings,
    dataset,
    device: torch.device,
    worker_threads: int,
    export_threads: int,
    started: float,
):
    """What an epoch of the space's baseline costs here, for a trial (search split, a worker's
    threads) and for the export (all training images, all threads): a few timed optimiser
    steps and a timed evaluation of part of the validation set, each after untimed warm-up
    steps, scaled to a whole epoch. Returns `plan.Costs`."""
    import time
    from dataclasses import replace

    from study.plan import CALIBRATION_STEPS, WARMUP_STEPS, Costs
    from study.trainer import evaluate

    candidate = baseline_candidate(space, settings)
    threads = torch.get_num_threads()

    def rate(task, threads_now: int) -> float:
        if device.type == "cpu":
            torch.set_num_threads(threads_now)
        config = candidate.train.replace(epochs=1, lr_schedule="constant", warmup_fraction=0.0)
        with dev.seeded(settings.seed):
            model = prepare_model(candidate, dataset.image_shape, dataset.num_classes, device)
        batch = config.batch_size
        probe = min(len(task.eval_inputs), 2048)

        def part(steps: int, evaluated: int):
            size = min(task.train_size, steps * batch)
            return replace(
                task,
                train_inputs=task.train_inputs[:size],
                train_targets=task.train_targets[:size],
                eval_inputs=task.eval_inputs[:evaluated],
                eval_targets=task.eval_targets[:evaluated],
            )

        def timed(work) -> float:
            dev.synchronize(device)
            begin = time.perf_counter()
            work()
            dev.synchronize(device)
            return time.perf_counter() - begin

        train(model, part(WARMUP_STEPS, probe), config)  # untimed: allocations, kernels chosen
        # an eighth of an epoch of distinct images (a few steps over the same ones stay in the
        # cache and ran 20% fast), next to no evaluation
        steps = math.ceil(task.train_size / batch)
        chunk = part(max(CALIBRATION_STEPS, steps // 8), 1)
        per_chunk = timed(lambda: train(model, chunk, config))
        probing = part(1, probe)
        flags = (config.eval_batch_size, config.mixed_precision, config.test_time_flip)
        evaluation = timed(lambda: evaluate(model, probing, *flags))
        used = math.ceil(chunk.train_size / batch)
        return per_chunk * steps / used + evaluation * len(task.eval_inputs) / probe

    try:
        trial_rate = rate(dataset.search_task(), worker_threads)
        export_rate = rate(dataset.full_training_task(), export_threads)
    finally:
        if device.type == "cpu":
            torch.set_num_threads(threads)
    return Costs(trial_rate, export_rate, time.time() - started)
