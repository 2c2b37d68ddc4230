"""The shared, GPU-aware training loop: one function for every study.

`train(model, task, config, on_epoch)` trains on device-resident tensors (batches are index
slices of one tensor, no DataLoader) and returns a `TrainResult`. It knows nothing of Optuna:
an adapter turns `on_epoch` into `trial.report` / `should_prune`. The loop runs on the device
the task's tensors live on.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from study import device as dev
from study.augment import augment
from study.config import OPTIMIZERS, TrainConfig
from study.data import Task
from study.models import count_parameters

__all__ = [
    "OPTIMIZERS",
    "Divergence",
    "EpochMetrics",
    "History",
    "TrainConfig",
    "TrainResult",
    "train",
]


@dataclass(frozen=True)
class EpochMetrics:
    """What the trainer knows after one epoch; passed to `on_epoch` and kept in the history."""

    epoch: int
    """1-based epoch number."""
    train_loss: float
    """The tutorial's number: mean of the mini-batch losses during the epoch (train mode)."""
    eval_loss: float
    """Loss over the whole evaluation set in eval mode (the full truth table for Boolean)."""
    eval_accuracy: float
    """Bit accuracy (Boolean) or class accuracy (images) on the evaluation set, 0..1."""
    train_accuracy: float | None
    """Running accuracy over the epoch's mini-batches (images only; None for Boolean)."""
    seconds: float
    """Wall-clock training time so far, evaluation included, in seconds."""
    learning_rate: float
    """Learning rate at the end of the epoch."""


class History(Sequence[EpochMetrics]):
    """A Boolean run's per-epoch metrics as float32 columns: 16 bytes an epoch instead of an
    object, for populations of thousands of networks trained for tens of thousands of epochs.
    Reads as a sequence of `EpochMetrics`, made on access."""

    __slots__ = ("_accuracy", "_eval", "_seconds", "_train", "learning_rate")

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        self._train, self._eval = array("f"), array("f")
        self._accuracy, self._seconds = array("f"), array("f")

    def append(self, train_loss: float, eval_loss: float, accuracy: float, seconds: float) -> None:
        self._train.append(train_loss)
        self._eval.append(eval_loss)
        self._accuracy.append(accuracy)
        self._seconds.append(seconds)

    def __len__(self) -> int:
        return len(self._eval)

    def _row(self, i: int) -> EpochMetrics:
        return EpochMetrics(
            epoch=i + 1,
            train_loss=self._train[i],
            eval_loss=self._eval[i],
            eval_accuracy=self._accuracy[i],
            train_accuracy=None,
            seconds=self._seconds[i],
            learning_rate=self.learning_rate,
        )

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        return self._row(range(len(self))[index])

    def best_eval_loss(self) -> float:
        return min(self._eval, default=math.inf)

    def best_eval_accuracy(self) -> float:
        return max(self._accuracy, default=0.0)

    def best_train_loss(self) -> float:
        return min(self._train, default=math.inf)


@dataclass(frozen=True)
class Divergence:
    """Why a run stopped early: its loss turned NaN or infinite. Both trainers (one network at a
    time, and a population) report it this way; the run's history ends before that epoch."""

    epoch: int
    """The epoch whose loss was not finite (1-based)."""
    value: float
    """The offending loss value (nan, inf or -inf)."""

    def __str__(self) -> str:
        return f"non-finite training loss ({self.value}) in epoch {self.epoch}"


@dataclass(frozen=True)
class TrainResult:
    """Everything one training run produced."""

    history: Sequence[EpochMetrics]
    """One entry per epoch run (a `History` for population members)."""
    parameters: int
    """Trainable parameter count of the model."""
    device: str
    """Where it ran, e.g. "cpu" or "cuda:0 (NVIDIA H200)"."""
    seconds: float
    """Wall-clock seconds of the whole run (all epochs, evaluation included)."""
    reached_target: bool
    """True when `target_loss` was set and reached (all bits right too, for bit targets)."""
    stopped_by_callback: bool = False
    """True when `on_epoch` asked to stop before the budget or the target was reached."""
    peak_memory_bytes: int | None = None
    """Peak device memory allocated during the run (CUDA only)."""
    divergence: Divergence | None = None
    """Set when the loss turned NaN/inf: the run stopped there (never silently kept)."""
    engine: str = "sequential"
    """What trained it: sequential (this loop), native (the population's C kernel) or torch
    (the population's batched tensors)."""
    threads: int = 1
    """CPU threads the engine ran on (torch's intra-op threads, or the kernel's)."""

    @property
    def engine_text(self) -> str:
        """E.g. "native kernel, 2 threads"."""
        name = {"native": "native kernel", "torch": "torch population"}.get(self.engine, "")
        return f"{name or self.engine}, {self.threads} thread{'s' if self.threads > 1 else ''}"

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def best_eval_loss(self) -> float:
        """Least evaluation loss over the epochs (inf when none finished)."""
        if isinstance(self.history, History):
            return self.history.best_eval_loss()
        return min((m.eval_loss for m in self.history), default=math.inf)

    @property
    def best_eval_accuracy(self) -> float:
        if isinstance(self.history, History):
            return self.history.best_eval_accuracy()
        return max((m.eval_accuracy for m in self.history), default=0.0)

    @property
    def best_train_loss(self) -> float:
        """Least running (tutorial-style) loss over the epochs (inf when none finished)."""
        if isinstance(self.history, History):
            return self.history.best_train_loss()
        return min((m.train_loss for m in self.history), default=math.inf)

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / max(1, self.epochs_run)


EpochCallback = Callable[[EpochMetrics], bool | None]
"""Called after each epoch; returning True stops the run cleanly (the result is kept)."""


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named in the config."""
    lr, wd = config.learning_rate, config.weight_decay
    # fused kernels: one launch per step for all parameters (CPU and CUDA), same arithmetic
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=wd,
            fused=True,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=wd, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=wd, fused=True)
    return torch.optim.RMSprop(parameters, lr=lr, momentum=config.momentum, weight_decay=wd)


def loss_function(kind: str) -> Callable[..., Tensor]:
    """Mean BCE on logits for bit targets; cross-entropy for class targets."""
    if kind == "binary":
        return F.binary_cross_entropy_with_logits
    return F.cross_entropy


def _correct(kind: str, logits: Tensor, targets: Tensor) -> Tensor:
    """Number of correct bits (binary) or samples (multiclass), as a device tensor (no sync)."""
    if kind == "binary":
        return ((logits > 0) == (targets > 0.5)).sum()
    return (logits.argmax(1) == targets).sum()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    batch_size: int = 8192,
    mixed_precision: bool = False,
    test_time_flip: bool = False,
) -> tuple[float, float]:
    """(mean loss, accuracy) over the task's evaluation set, in eval mode. With
    `test_time_flip`, each image's prediction averages it and its mirror image (the loss is
    that of the averaged probabilities)."""
    model.eval()
    loss_fn = loss_function(task.kind)
    device = task.device
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    total_correct = torch.zeros((), device=device, dtype=torch.int64)
    n = len(task.eval_inputs)
    for start in range(0, n, batch_size):
        x = task.prepare(task.eval_inputs[start : start + batch_size])
        y = task.eval_targets[start : start + batch_size]
        with dev.autocast(device, mixed_precision):
            logits = model(x).float()
            if test_time_flip:
                pair = torch.stack([logits, model(x.flip(-1)).float()])
                logits = torch.logsumexp(pair.log_softmax(-1), dim=0) - math.log(2.0)
        total_loss += loss_fn(logits, y, reduction="sum")
        total_correct += _correct(task.kind, logits, y)
    per_sample = task.eval_targets[0].numel()
    # .item(): host sync, once per evaluation
    return (total_loss / n / per_sample).item(), total_correct.item() / (n * per_sample)


def target_met(kind: str, metrics: EpochMetrics, target_loss: float | None) -> bool:
    """The success criterion: loss at or below target (and 100% bit accuracy for bit targets).

    A mean BCE of 0.001 over 2048 bits still admits one wrong bit (ln 2 / 2048 < 0.001), hence
    the accuracy condition.
    """
    if target_loss is None or metrics.eval_loss > target_loss:
        return False
    return kind != "binary" or metrics.eval_accuracy == 1.0


def _scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step schedule: a linear warm-up over `warmup_fraction` of the steps, then
    constant, cosine or linear (onecycle) decay to `lr_floor` x the rate at the last step."""
    if config.lr_schedule == "constant" and not config.warmup_fraction:
        return None
    total = config.epochs * steps_per_epoch
    warm = round(config.warmup_fraction * total)
    decay = {
        "constant": lambda t: 1.0,
        "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
        "onecycle": lambda t: 1.0 - t,
    }[config.lr_schedule]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        decayed = decay(min(step - warm, total - warm) / max(1, total - warm))
        if config.lr_schedule == "constant":
            return decayed
        return config.lr_floor + (1.0 - config.lr_floor) * decayed

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Average:
    """An exponential moving average of a model's weights (its BN statistics copied), kept in
    a copy of the model that is evaluated in place of the raw weights. Its decay grows from
    0.1 to `decay` over the first steps, so that it does not remember the initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model)
        self.decay, self.steps = decay, 0
        self.average = [p.detach() for p in self.model.parameters()]
        self.current = [p.detach() for p in model.parameters()]
        self.buffers = list(zip(self.model.buffers(), model.buffers(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        """After each optimiser step (one fused operation for all parameters)."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.average, self.current, 1.0 - decay)

    @torch.no_grad()
    def ready(self) -> nn.Module:
        """The averaged model, with the current BN statistics, for evaluation."""
        for mine, theirs in self.buffers:
            mine.copy_(theirs)
        return self.model


class _Parts:
    """What a training run's state is made of, saved after an epoch and restored to go on."""

    def __init__(self, model, optimizer, scheduler, shuffle, augment_rng, average, history):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.shuffle, self.augment_rng, self.average = shuffle, augment_rng, average
        self.history: list[EpochMetrics] = history

    def snapshot(self, epoch: int, device: torch.device) -> dict:
        """The state after `epoch`: tensors and plain data only (torch.load(weights_only=True)
        reads it back), on the CPU."""
        average = self.average
        state = {
            "epoch": epoch,
            "seconds": self.history[-1].seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "average": None
            if average is None
            else {"model": average.model.state_dict(), "steps": average.steps},
            "shuffle": self.shuffle.get_state(),
            "augment": self.augment_rng.get_state(),
            "rng": torch.get_rng_state(),
            "device_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": [asdict(m) for m in self.history],
        }
        return _to_cpu(state)

    def restore(self, state: dict, device: torch.device) -> tuple[int, float]:
        """Load a snapshot; returns the epoch to go on with and the seconds trained so far."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            self.average.model.load_state_dict(state["average"]["model"])
            self.average.steps = state["average"]["steps"]
        self.shuffle.set_state(state["shuffle"])
        self.augment_rng.set_state(state["augment"])
        torch.set_rng_state(state["rng"])
        if state.get("device_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["device_rng"], device)
        self.history.extend(EpochMetrics(**row) for row in state["history"])
        return state["epoch"] + 1, float(state["seconds"])


def _to_cpu(value):
    """A copy of a nested state with every tensor on the CPU (a checkpoint file's content)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _mixed(config: TrainConfig, task: Task) -> bool:
    """bf16 autocast where asked and the task is an image task (Boolean nets stay fp32)."""
    return config.mixed_precision and task.kind == "multiclass"


def _train_epoch(
    model: nn.Module,
    task: Task,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    order: Tensor,
    augment_rng: torch.Generator,
    average: _Average | None,
) -> tuple[Tensor, Tensor]:
    """One pass over the training set in `order`, a batch an index slice (augmented as the
    config says); returns the summed batch losses and (image tasks) the correct predictions,
    as device tensors (no sync)."""
    device, loss_fn, batch = task.device, loss_function(task.kind), config.batch_size
    mixed = _mixed(config, task)
    smoothing = {"label_smoothing": config.label_smoothing} if config.label_smoothing else {}
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, task.train_size, batch):
        idx = order[start : start + batch]
        inputs = task.train_inputs[idx]
        if config.augments:
            inputs = augment(inputs, config, augment_rng)
        x = task.prepare(inputs)
        y = task.train_targets[idx]
        with dev.autocast(device, mixed):
            logits = model(x)
        loss = loss_fn(logits.float(), y, **smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if average is not None:
            average.update()
        loss_sum += loss.detach()
        if task.kind == "multiclass":  # the running training accuracy of image tasks
            correct += _correct(task.kind, logits.detach(), y)
    return loss_sum, correct


StopCallback = Callable[[BaseException, Callable[[], dict]], None]
"""Called when `on_epoch` raises, with the error and a function that returns the training state
after that epoch (a checkpoint: `train(..., resume=state)` goes on from there)."""


def train(
    model: nn.Module,
    task: Task,
    config: TrainConfig,
    on_epoch: EpochCallback | None = None,
    *,
    resume: dict | None = None,
    on_stop: StopCallback | None = None,
) -> TrainResult:
    """Train `model` on `task` as `config` says; return the per-epoch history and totals.

    `on_epoch` is called after every epoch with its metrics; it may return True to stop the
    run cleanly, or raise (an Optuna adapter raises `TrialPruned`); when it raises, `on_stop`
    may take a checkpoint, and `resume` (a checkpoint of the same model and config) goes on
    after its epoch exactly as the run would have gone on: the same weights, optimiser, schedule,
    weight average, shuffling, augmentation and dropout draws. A NaN/inf loss stops the run with
    `result.divergence` set; that epoch is not in the history. (One screen on purpose: set-up,
    then the epoch loop's phases in order, read top to bottom.)
    """
    device = task.device
    model.to(device)
    mixed = _mixed(config, task)
    optimizer = make_optimizer(model.parameters(), config)
    n = task.train_size
    steps_per_epoch = math.ceil(n / config.batch_size)
    scheduler = _scheduler(optimizer, config, steps_per_epoch)
    shuffle = dev.generator_for(device, config.seed)
    augment_rng = dev.generator_for(device, (config.seed + 1) % 2**63)
    decay = config.ema_decay
    if config.ema_horizon:  # a span that is a share of the run, whatever its length
        decay = max(0.0, 1.0 - 1.0 / (config.ema_horizon * config.epochs * steps_per_epoch))
    average = _Average(model, decay) if decay else None
    evaluated = average.model if average is not None else model
    track_train_accuracy = task.kind == "multiclass"
    history: list[EpochMetrics] = []
    reached = stopped = False
    divergence = None
    dev.reset_peak_memory(device)
    parts = _Parts(model, optimizer, scheduler, shuffle, augment_rng, average, history)
    # dropout draws from the global RNG: fork it so the run is reproducible and side-effect free
    with dev.seeded(config.seed):
        first, before = parts.restore(resume, device) if resume is not None else (1, 0.0)
        dev.synchronize(device)
        started = time.perf_counter() - before  # a resumed run's clock goes on from its own
        for epoch in range(first, config.epochs + 1):
            # --- train: one pass in a seeded random order, batches are index slices
            order = torch.randperm(n, generator=shuffle, device=shuffle.device).to(device)
            loss_sum, correct = _train_epoch(
                model, task, config, optimizer, scheduler, order, augment_rng, average
            )
            # --- evaluate on the whole evaluation set (the full truth table for Boolean)
            if average is not None:
                average.ready()
            eval_loss, eval_accuracy = evaluate(
                evaluated, task, config.eval_batch_size, mixed, config.test_time_flip
            )
            train_loss = (loss_sum / steps_per_epoch).item()  # host sync, once per epoch
            if not (math.isfinite(train_loss) and math.isfinite(eval_loss)):
                bad = train_loss if not math.isfinite(train_loss) else eval_loss
                divergence = Divergence(epoch, bad)
                break
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=train_loss,
                eval_loss=eval_loss,
                eval_accuracy=eval_accuracy,
                train_accuracy=correct.item() / n if track_train_accuracy else None,
                seconds=time.perf_counter() - started,
                learning_rate=optimizer.param_groups[0]["lr"],
            )
            history.append(metrics)
            # --- stop early once the target is met (the study's success criterion)
            if target_met(task.kind, metrics, config.target_loss):
                reached = True
                break
            try:
                if on_epoch is not None and on_epoch(metrics):
                    stopped = True
                    break
            except BaseException as error:
                if on_stop is not None:
                    on_stop(error, functools.partial(parts.snapshot, epoch, device))
                raise
    if average is not None:  # the weights kept are the averaged ones
        model.load_state_dict(average.ready().state_dict())
    dev.synchronize(device)
    return TrainResult(
        history=history,
        parameters=count_parameters(model),
        device=dev.describe(device),
        seconds=time.perf_counter() - started,
        reached_target=reached,
        stopped_by_callback=stopped,
        peak_memory_bytes=dev.peak_memory_bytes(device),
        divergence=divergence,
        threads=torch.get_num_threads() if device.type == "cpu" else 1,
    )
