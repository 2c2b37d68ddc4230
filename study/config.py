"""Configuration as data: training hyperparameters, a study's fixed settings, one candidate.

Every class here is a frozen dataclass with one docstring per field (its help text: the
`study run` flags are generated from these fields, see `study.cli`), validated on
construction with an error that names the field. Nothing here imports the training engine.

A study's fixed settings are part of its identity: they are stored as study user attributes
and a resumed study must be run with the same ones (a conflict is refused, never mixed).

Why one file over 600 lines: it is data, not logic, each field with its one-line docstring;
the flags, the stored identities and the upgrades of older stores are made from these
classes, and one file keeps every setting's name, default and check in one place.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from study.errors import ConfigError

IMAGE_DATASETS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
"""The image datasets: the names the command line and the stored settings use, and their
titles (also torchvision's class names)."""

FIDELITIES = ("plan", "fixed")
"""How an image study spends its budget: rungs fitted to it (`study.plan`), or every trial at
the space's max_epochs."""
PRECISIONS = ("auto", "fp32")
"""auto: bf16 autocast for image models where the device has it natively; fp32: never."""

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "onecycle")


def require(ok: bool, name: str, value: Any, message: str) -> None:
    """The one validation helper: raise a ConfigError naming the field and showing the value."""
    if not ok:
        raise ConfigError(f"{name}: {message} (got {value!r})", field=name)


def required_successes(share: float, seeds: int) -> int:
    """The one rule: seeds out of `seeds` that must learn f at the required `share` (at least
    one; a share that is a whole number of seeds up to float rounding needs exactly that)."""
    return max(1, math.ceil(share * seeds - 1e-9))


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


MAX_SEED = 2**63 - 1
SEED_RANGE = f"must be an integer from 0 to {MAX_SEED}"
MAX_EPOCHS = 10_000_000
"""Most epochs a Boolean trial may draw."""
MAX_IMAGE_EPOCHS = 10_000
MAX_SEEDS = 10_000
"""Most initialisation seeds per Boolean trial (each is a network trained in full)."""
MAX_WIDTH = 65_536
MAX_LAYERS = 32


def is_seed(value: Any) -> bool:
    """A seed torch's generators accept."""
    return is_int(value) and 0 <= value <= MAX_SEED


def reject_unknown_fields(cls: type, values: Mapping[str, Any], what: str = "setting") -> None:
    """Raise a ConfigError naming the first key of `values` that is not a field of `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown {what}; known: {sorted(known)}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right below it), read from the class source.

    Python keeps no attribute docstrings at run time; this is what makes a field's docstring
    its help text, so that a setting is written once.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


S = TypeVar("S", bound="Settings")


class Settings:
    """Shared behaviour of the settings dataclasses: a JSON-able identity, typed round trip."""

    WHAT = "setting"
    """What a field is called in the error for an unknown one."""
    RENAMED: ClassVar[dict[str, str]] = {}
    """Old field names -> their names now: stored settings of older stores still read."""

    @classmethod
    def upgrade(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` (stored settings) with renamed fields under their names now."""
        return {cls.RENAMED.get(k, k): v for k, v in values.items()}

    def identity(self) -> dict[str, Any]:
        """JSON-able dict stored with the study; a resumed run must match it."""
        values = asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls: type[S], values: Mapping[str, Any]) -> S:
        """Build from a mapping (stored settings); unknown keys are an error naming the key."""
        values = cls.upgrade(values)
        reject_unknown_fields(cls, values, cls.WHAT)
        types = {f.name: f.type for f in fields(cls)}  # type: ignore[arg-type]
        converted = {
            k: tuple(v) if "tuple" in str(types[k]) and isinstance(v, list) else v
            for k, v in values.items()
        }
        return cls(**converted)

    def replace(self: S, **changes: Any) -> S:
        """A copy with some fields changed (validated again)."""
        return type(self).from_dict({**self.identity(), **changes})


# ----------------------------------------------------------------------------------------------
# Training hyperparameters of one run (the trainer's input)


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Hyperparameters of one training run; validated on construction."""

    optimizer: str = "adam"
    """One of sgd (with momentum), adam, adamw, rmsprop (torch's defaults otherwise)."""
    learning_rate: float = 1e-3
    """Step size (peak value when a schedule is used)."""
    batch_size: int = 64
    """Samples per optimiser step; the last batch of an epoch may be smaller."""
    epochs: int = 10
    """Passes over the training data (an upper bound when `target_loss` is set)."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for adamw)."""
    momentum: float = 0.9
    """Momentum of sgd and rmsprop; unused by adam/adamw."""
    nesterov: bool = False
    """Nesterov momentum (sgd only)."""
    lr_schedule: str = "constant"
    """constant; cosine: per-step cosine decay from `learning_rate` to 0 over all epochs;
    onecycle: per-step linear decay from `learning_rate` to 0 (both after the warm-up)."""
    warmup_fraction: float = 0.0
    """Share of all steps over which the rate first rises linearly from 0 (any schedule)."""
    lr_floor: float = 0.0
    """Share of `learning_rate` a decaying schedule (cosine, onecycle) ends at instead of 0."""
    label_smoothing: float = 0.0
    """Share of each target's probability spread evenly over the classes (image tasks)."""
    crop_padding: int = 0
    """Augmentation: shift each training image by up to this many pixels each way (zero fill)."""
    flip: bool = False
    """Augmentation: flip half the training images left to right."""
    erase_probability: float = 0.0
    """Augmentation: chance that a training image gets a random rectangle (2-25% of its area,
    aspect 0.3-3.3) set to black (random erasing)."""
    ema_decay: float = 0.0
    """Per-step decay of an exponential moving average of the weights, which are evaluated and
    kept at the end instead of the raw ones (0: off)."""
    ema_horizon: float = 0.0
    """The weight average's span as a share of all training steps, instead of `ema_decay`: the
    decay is 1 - 1 / (share x steps), so that the average means the same at 2 epochs as at 18
    (a planned study's rungs); 0: off."""
    test_time_flip: bool = False
    """Evaluate on each image and its mirror image, averaging the predictions (validation and
    test alike)."""
    seed: int = 0
    """Seed of the shuffling order and of dropout; initial weights are seeded by the caller."""
    target_loss: float | None = None
    """Stop once the evaluation loss is at or below this value and, for bit targets, every bit
    of the table is right (None: run all epochs)."""
    mixed_precision: bool = True
    """bf16 autocast for image models on CUDA and on CPUs with native bf16 arithmetic
    (AVX512-BF16, AMX); Boolean nets always use fp32."""
    eval_batch_size: int = 8192
    """Samples per forward pass when evaluating (memory only; no effect on results)."""

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            require(ok, name, getattr(self, name), message)

        check(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        check(
            is_number(self.learning_rate) and 0 < self.learning_rate < 10,
            "learning_rate",
            "must be in (0, 10)",
        )
        check(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "must be >= 1")
        check(is_int(self.epochs) and self.epochs >= 1, "epochs", "must be >= 1")
        check(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            "must be >= 0",
        )
        check(is_number(self.momentum) and 0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {LR_SCHEDULES}")
        check(isinstance(self.nesterov, bool) and (not self.nesterov or self.optimizer == "sgd"),
              "nesterov", "is sgd's (true or false)")  # fmt: skip
        for name in ("warmup_fraction", "lr_floor", "label_smoothing", "erase_probability"):
            value = getattr(self, name)
            check(is_number(value) and 0 <= value < 1, name, "must be in [0, 1)")
        check(is_int(self.crop_padding) and 0 <= self.crop_padding <= 8, "crop_padding",
              "must be an integer from 0 to 8")  # fmt: skip
        check(is_number(self.ema_decay) and 0 <= self.ema_decay < 1, "ema_decay",
              "must be in [0, 1)")  # fmt: skip
        check(is_number(self.ema_horizon) and 0 <= self.ema_horizon <= 1, "ema_horizon",
              "must be in [0, 1]")  # fmt: skip
        check(not (self.ema_decay and self.ema_horizon), "ema_horizon",
              "give ema_decay or ema_horizon, not both")  # fmt: skip
        for name in ("flip", "test_time_flip"):
            check(isinstance(getattr(self, name), bool), name, "must be true or false")
        check(is_seed(self.seed), "seed", SEED_RANGE)
        check(
            self.target_loss is None or (is_number(self.target_loss) and self.target_loss > 0),
            "target_loss",
            "must be a positive number or None",
        )
        check(isinstance(self.mixed_precision, bool), "mixed_precision", "must be true or false")
        check(
            is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
            "eval_batch_size",
            "must be >= 1",
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys are an error naming the key."""
        reject_unknown_fields(cls, values, "training setting")
        return cls(**values)

    @property
    def augments(self) -> bool:
        """Any augmentation of the training batches."""
        return bool(self.crop_padding or self.flip or self.erase_probability)


# ----------------------------------------------------------------------------------------------
# Boolean width studies

BOOLEAN_OPTIMIZER = "adam"
"""Every Boolean network trains with Adam (torch's betas and eps, no weight decay), in fp32."""


@dataclass(frozen=True)
class BooleanSettings(Settings):
    """Fixed settings of a Boolean width study (the question and its training budget)."""

    RENAMED: ClassVar[dict[str, str]] = {"required_share": "required_rate"}  # the frontier's

    input_bits: int = 8
    """n: the function maps {0,1}^n to {0,1}^m; the truth table has 2^n rows."""
    output_bits: int = 8
    """m: output bits per row."""
    function_seed: int = 0
    """Seed of the random Boolean function f: part of the study's identity."""
    target_loss: float = 1e-3
    """f is learned when the full-table mean BCE is at most this (and every bit is right)."""
    max_epochs: int = 2000
    """Epoch cap: the largest training budget a trial may draw (it stops early at the target)."""
    seeds: int = 3
    """r: independent initialisation seeds trained per trial."""
    required_rate: float = 1.0
    """Share of the r seeds that must learn f for the configuration to count as learning f."""
    min_width: int = 1
    """Smallest width of a hidden layer in the search space."""
    max_width: int = 256
    """Largest width of a hidden layer in the search space."""
    min_layers: int = 1
    """Fewest hidden layers in the search space."""
    max_layers: int = 1
    """Most hidden layers in the search space."""
    min_learning_rate: float = 2e-3
    """Lower end of the (log-scale) range of Adam's learning rate."""
    max_learning_rate: float = 5e-2
    """Upper end of the (log-scale) range of Adam's learning rate."""
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    """Mini-batch sizes the search may choose from (rows of the truth table per step)."""
    prune: bool = True
    """Stop a seed once the target is out of reach within its budget, and a trial once the
    required share is (--no-prune trains every seed to its budget)."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            require(ok, name, getattr(self, name), message)

        need(is_int(self.input_bits) and 1 <= self.input_bits <= 16, "input_bits",
             "must be an integer from 1 to 16")  # fmt: skip
        need(is_int(self.output_bits) and 1 <= self.output_bits <= 64, "output_bits",
             "must be an integer from 1 to 64")  # fmt: skip
        need(is_seed(self.function_seed), "function_seed", SEED_RANGE)
        need(is_number(self.target_loss) and 0 < self.target_loss < 1, "target_loss",
             "must be in (0, 1)")  # fmt: skip
        need(is_int(self.max_epochs) and 1 <= self.max_epochs <= MAX_EPOCHS, "max_epochs",
             f"must be an integer from 1 to {MAX_EPOCHS}")  # fmt: skip
        need(is_int(self.seeds) and 1 <= self.seeds <= MAX_SEEDS, "seeds",
             f"must be an integer from 1 to {MAX_SEEDS}")  # fmt: skip
        need(is_number(self.required_rate) and 0 < self.required_rate <= 1, "required_rate",
             "must be in (0, 1]")  # fmt: skip
        need(is_int(self.min_width) and self.min_width >= 1, "min_width", "must be at least 1")
        need(
            is_int(self.max_width) and self.min_width <= self.max_width <= MAX_WIDTH,
            "max_width",
            f"must be an integer from min_width={self.min_width} to {MAX_WIDTH} "
            "(inverted width bounds?)",
        )
        need(is_int(self.min_layers) and self.min_layers >= 1, "min_layers", "must be at least 1")
        need(
            is_int(self.max_layers) and self.min_layers <= self.max_layers <= MAX_LAYERS,
            "max_layers",
            f"must be an integer from min_layers={self.min_layers} to {MAX_LAYERS}",
        )
        need(is_number(self.min_learning_rate) and 0 < self.min_learning_rate < 10,
             "min_learning_rate", "must be in (0, 10)")  # fmt: skip
        need(
            is_number(self.max_learning_rate)
            and self.min_learning_rate <= self.max_learning_rate < 10,
            "max_learning_rate",
            f"must be >= min_learning_rate={self.min_learning_rate} and below 10",
        )
        need(
            isinstance(self.batch_sizes, tuple)
            and len(self.batch_sizes) > 0
            and all(is_int(b) and 1 <= b <= 2**16 for b in self.batch_sizes),
            "batch_sizes",
            "must be a non-empty list of sizes from 1 to 65536",
        )
        need(isinstance(self.prune, bool), "prune", "must be true or false")

    @property
    def required_successes(self) -> int:
        """Seeds out of `seeds` that must learn f."""
        return self.required_of(self.seeds)

    def required_of(self, seeds: int) -> int:
        """Seeds out of `seeds` that must learn f at the required share (`required_successes`)."""
        return required_successes(self.required_rate, seeds)

    @property
    def min_epochs(self) -> int:
        """Smallest epoch budget a trial may draw (a quarter of the cap)."""
        return max(1, self.max_epochs // 4)


def mlp_parameters(
    input_width: int, hidden_layer_profile: Sequence[int], output_width: int
) -> int:
    """Trainable parameters (weights and biases) of a dense ReLU network with this profile."""
    widths = [input_width, *hidden_layer_profile, output_width]
    return sum((a + 1) * b for a, b in itertools.pairwise(widths))


@dataclass(frozen=True)
class BooleanCandidate:
    """One point of a Boolean search space: an architecture and its training budget."""

    hidden_layer_profile: tuple[int, ...]
    """Hidden widths, input side first."""
    learning_rate: float
    """Adam step size."""
    batch_size: int
    """Truth-table rows per step."""
    epochs: int
    """Epoch budget (training stops early at the target)."""
    lr_schedule: str = "constant"
    """constant, cosine or onecycle: per-step decay from the learning rate over the budget."""
    warmup_fraction: float = 0.0
    """Share of the budget's steps over which the rate first rises linearly from 0."""
    lr_floor: float = 0.0
    """Share of the learning rate a decaying schedule ends at (0: decays to 0)."""

    @property
    def neurons(self) -> int:
        """Hidden neurons: the sum of the hidden widths."""
        return sum(self.hidden_layer_profile)

    def parameters(self, input_bits: int, output_bits: int) -> int:
        """Trainable parameters of the ReLU network with this profile."""
        return mlp_parameters(input_bits, self.hidden_layer_profile, output_bits)

    def train_config(self, seed: int, target_loss: float | None) -> TrainConfig:
        """Adam on the full truth table, fp32, stopping at the target loss."""
        return TrainConfig(
            optimizer=BOOLEAN_OPTIMIZER,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            epochs=self.epochs,
            lr_schedule=self.lr_schedule,
            warmup_fraction=self.warmup_fraction,
            lr_floor=self.lr_floor,
            seed=seed,
            target_loss=target_loss,
            mixed_precision=False,
        )

    def describe(self) -> str:
        profile = "-".join(str(w) for w in self.hidden_layer_profile)
        schedule = "" if self.lr_schedule == "constant" else f" {self.lr_schedule}"
        schedule += f" warm-up {self.warmup_fraction:.2f}" * bool(self.warmup_fraction)
        schedule += f" floor {self.lr_floor:.2f}" * bool(self.lr_floor)
        return (
            f"[{profile}] lr={self.learning_rate:.3g}{schedule} batch={self.batch_size} "
            f"epochs={self.epochs}"
        )


# ----------------------------------------------------------------------------------------------
# Image classification studies (FashionMNIST, MNIST)


@dataclass(frozen=True)
class ImageSettings(Settings):
    """Fixed settings of an image study: the data, its split and the epoch range searched."""

    dataset: str = "fashion-mnist"
    """fashion-mnist or mnist (a study run on mnist is stored as mnist-* by default)."""
    validation_size: int = 10_000
    """Training images held out for validation (the search's objective)."""
    split_seed: int = 0
    """Seed of the train/validation split: part of the study's identity."""
    min_epochs: int = 4
    """Fewest epochs a trial may draw."""
    max_epochs: int = 30
    """Most epochs a trial may draw (the pruner stops weak trials earlier)."""
    seed: int = 0
    """Training seed (initial weights, shuffling, dropout), the same for every trial, so
    that trials differ by their configuration only."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            require(ok, name, getattr(self, name), message)

        need(self.dataset in IMAGE_DATASETS, "dataset", f"must be one of {list(IMAGE_DATASETS)}")
        need(is_int(self.validation_size) and self.validation_size >= 1, "validation_size",
             "must be at least 1")  # fmt: skip
        need(is_seed(self.split_seed), "split_seed", SEED_RANGE)
        need(is_int(self.min_epochs) and self.min_epochs >= 1, "min_epochs", "must be at least 1")
        need(
            is_int(self.max_epochs) and self.min_epochs <= self.max_epochs <= MAX_IMAGE_EPOCHS,
            "max_epochs",
            f"must be an integer from min_epochs={self.min_epochs} to {MAX_IMAGE_EPOCHS}",
        )
        need(is_seed(self.seed), "seed", SEED_RANGE)


SETTINGS_OF_KIND: dict[str, type[Settings]] = {"boolean": BooleanSettings, "image": ImageSettings}
"""The settings class of each kind of study."""


@dataclass(frozen=True)
class ImageCandidate:
    """One point of an image search space: an architecture (MLP or CNN) and its training.

    `architecture` is plain JSON-able data, so that an exported model can be rebuilt from its
    config file: {"type": "mlp", "hidden_layer_profile": [...], "dropout": p} or
    {"type": "cnn", "blocks": [{"channels", "kernel_size", "batch_norm", "pool"}, ...],
    "head_width": w, "dropout": p}.
    """

    architecture: dict[str, Any]
    train: TrainConfig

    def __post_init__(self) -> None:
        kind = self.architecture.get("type")
        if kind not in ("mlp", "cnn"):
            raise ConfigError(f"architecture: type must be mlp or cnn, got {kind!r}")

    @property
    def is_cnn(self) -> bool:
        return self.architecture["type"] == "cnn"

    def build(self, image_shape: tuple[int, int, int], num_classes: int):
        """The network of this candidate (on the CPU; the trainer moves it)."""
        from study.models import ConvBlock, ConvNet, ConvNetSpec, DeepNeuralNet

        a = self.architecture
        if not self.is_cnn:
            width = math.prod(image_shape)
            return DeepNeuralNet(
                width, a["hidden_layer_profile"], num_classes, dropout=a.get("dropout", 0.0)
            )
        spec = ConvNetSpec(
            blocks=tuple(ConvBlock(**block) for block in a["blocks"]),
            head_width=a["head_width"],
            dropout=a.get("dropout", 0.0),
            global_pool=a.get("global_pool", False),
        )
        return ConvNet(spec, image_shape, num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "train": asdict(self.train)}

    def replace_epochs(self, epochs: int) -> ImageCandidate:
        """The same network and training for `epochs` epochs (its schedule stretched)."""
        return ImageCandidate(self.architecture, self.train.replace(epochs=epochs))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageCandidate:
        return cls(dict(values["architecture"]), TrainConfig.from_dict(values["train"]))

    def describe(self) -> str:
        a, t = self.architecture, self.train
        if self.is_cnn:
            blocks = "-".join(
                f"{b['channels']}c{b['kernel_size']}{'bn' if b['batch_norm'] else ''}"
                f"{'' if b['pool'] == 'none' else b['pool'][0] + 'p'}"
                f"{'+res' if b.get('residual') else ''}"
                for b in a["blocks"]
            )
            pooled = " gap" if a.get("global_pool") else ""
            arch = f"CNN [{blocks}]{pooled} head {a['head_width']}"
        else:
            arch = "MLP [" + "-".join(str(w) for w in a["hidden_layer_profile"]) + "]"
        schedule = t.lr_schedule + (f" warm-up {t.warmup_fraction:.2f}" * bool(t.warmup_fraction))
        extras = [
            "nesterov" * t.nesterov,
            f"label smoothing {t.label_smoothing:.2f}" * bool(t.label_smoothing),
            f"crop {t.crop_padding}" * bool(t.crop_padding),
            "flip" * t.flip,
            f"erase {t.erase_probability:.2f}" * bool(t.erase_probability),
            f"ema {t.ema_decay:g}" * bool(t.ema_decay),
            f"ema over {t.ema_horizon:.0%} of the steps" * bool(t.ema_horizon),
            "test-time flip" * t.test_time_flip,
        ]
        extra = "".join(f", {e}" for e in extras if e)
        return (
            f"{arch} dropout {a.get('dropout', 0.0):.2f}; {t.optimizer} lr {t.learning_rate:.3g} "
            f"({schedule}) batch {t.batch_size} epochs {t.epochs} wd {t.weight_decay:.2g}{extra}"
        )


# ----------------------------------------------------------------------------------------------
# How one `study run` runs (not part of a study's identity)

RUNS_DIR = Path("results") / "runs"
"""Where a user's own runs go by default: the working store and every report, export and
certification written without --out. Git ignores it (its own .gitignore), so no command run
with its defaults changes a committed file; the committed reference runs live beside it."""
DEFAULT_STORAGE = f"sqlite:///{RUNS_DIR.as_posix()}/studies.db"
MAX_TRIALS = 1_000_000
MAX_POPULATION = 65_536
"""Most trials one population may ask at once (each is r networks in memory)."""
WORKER_MEMORY_BYTES = 1_500_000_000
"""What one worker process may need (torch, a dataset on the device, its models): bounds
--workers by this machine's memory."""
MAX_TIMEOUT_SECONDS = 10**8
MAX_THREADS = 1024
MAX_NAME_LENGTH = 100
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""What a new study may be called: a letter or digit, then letters, digits, '.', '_', '-', at
most MAX_NAME_LENGTH in all. A name is never a path ('/', '..', a newline); where a stored
study of another origin has such a name, `study.storage.default_out` maps it to one."""


def is_study_name(name: Any) -> bool:
    """Whether `name` is a name a new study may take (STUDY_NAME, MAX_NAME_LENGTH)."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_NAME_LENGTH
        and STUDY_NAME.fullmatch(name) is not None
    )


def cache_dir() -> Path:
    """Where the tool keeps what it builds and unpacks (the native kernel, datasets):
    $STUDY_CACHE_DIR, else $XDG_CACHE_HOME/study, else ~/.cache/study."""
    if os.environ.get("STUDY_CACHE_DIR"):
        return Path(os.environ["STUDY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "study"


def max_workers() -> int:
    """Worker processes this machine can hold: 4 per core, and no more than its memory allows."""
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 4 * cores * WORKER_MEMORY_BYTES
    return max(1, min(4 * cores, memory // WORKER_MEMORY_BYTES))


@dataclass(frozen=True)
class RunOptions(Settings):
    """How one run of a study runs: where, how long, how many processes. The `study run` flags
    are generated from these fields (their docstrings are the help)."""

    WHAT = "run option"

    trials: int
    """Total number of finished trials the study should have (a resumed study counts its own)."""
    storage: str = DEFAULT_STORAGE
    """Optuna storage URL (the command line: default $STUDY_STORAGE, else this SQLite file,
    made where you stand); PostgreSQL for many machines."""
    study_name: str | None = None
    """Name in the storage (default: the study's name; an image study on MNIST: mnist-*):
    letters, digits, '.', '_' and '-', at most 100; it also names the default output directory
    results/runs/NAME."""
    sampler: str | None = None
    """Optuna's sampler: tpe (the default), random, qmc, cmaes or gp; stored with the study."""
    pruner: str | None = None
    """Image studies: quartile (default), median, hyperband, successive-halving or none (a
    planned study: none, its rungs are its pruning); Boolean studies: target-unreachable
    (default) or none; stored with the study."""
    fidelity: str | None = None
    """Image studies: plan (the default with --timeout: successive halving over epochs, its
    rungs fitted to the budget and to an epoch's measured cost here; see study/plan.py) or
    fixed (every trial trains the space's max_epochs; the default without --timeout); stored
    with the study."""
    precision: str = "auto"
    """Image models: auto (bf16 autocast where the device has native bf16, else fp32) or fp32
    (never bf16: on a CPU with native bf16, the stand-in for one without)."""
    sampler_seed: int | None = None
    """Seed of the sampler (worker i samples with this seed + i)."""
    timeout: float | None = None
    """Time budget of this run in seconds: no trial starts after it, a running one stops at its
    next epoch and is re-queued for the next run."""
    population: int | None = None
    """Boolean studies: ask K trials at once and train them (with their seeds) as one
    population."""
    workers: int = 1
    """Processes on the same storage (one per GPU when several are visible)."""
    threads: int | None = None
    """CPU threads of a population (default: this machine's cores, shared among workers)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    data_dir: str | None = None
    """Image studies: the directory with the IDX files."""
    quiet: bool = False
    """No progress: no bar on a terminal, no line per finished trial elsewhere."""
    verbose: bool = False
    """Optuna's own log lines too (each trial's start and result, the sampler's notes)."""
    export: bool = False
    """Image studies: then export the best configuration (`study export`); with a timeout the
    budget covers both: no trial starts once the time left is what exporting the best trial so
    far needs (its measured seconds per epoch)."""
    export_dir: str | None = None
    """Where --export writes (default results/runs/NAME)."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            require(ok, name, getattr(self, name), message)

        def optional(name: str, low: float, high: float, number=is_int) -> None:
            value = getattr(self, name)
            need(value is None or (number(value) and low <= value <= high), name,
                 f"must be from {low} to {high}")  # fmt: skip

        need(is_int(self.trials) and 1 <= self.trials <= MAX_TRIALS, "trials",
             f"must be an integer from 1 to {MAX_TRIALS}")  # fmt: skip
        need(isinstance(self.storage, str) and bool(self.storage), "storage", "must be a URL")
        need(
            self.study_name is None or is_study_name(self.study_name),
            "study_name",
            f"must be 1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
        )
        optional("population", 1, MAX_POPULATION)
        limit = max_workers()
        need(is_int(self.workers) and 1 <= self.workers <= limit, "workers",
             f"must be an integer from 1 to {limit} on this machine ({os.cpu_count()} cores; "
             "each worker is a process with its own torch and data)")  # fmt: skip
        optional("sampler_seed", 0, 2**32 - self.workers)  # worker i samples with seed + i
        optional("timeout", 1e-9, MAX_TIMEOUT_SECONDS, is_number)
        optional("threads", 1, MAX_THREADS)
        need(isinstance(self.device, str), "device", "must be a device name")
        need(isinstance(self.quiet, bool), "quiet", "must be true or false")
        need(isinstance(self.verbose, bool), "verbose", "must be true or false")
        need(isinstance(self.export, bool), "export", "must be true or false")
        need(self.export_dir is None or isinstance(self.export_dir, str), "export_dir",
             "must be a directory")  # fmt: skip
        need(self.fidelity in (None, *FIDELITIES), "fidelity",
             f"must be one of {', '.join(FIDELITIES)}")  # fmt: skip
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")


# ----------------------------------------------------------------------------------------------
# The budget frontier (study.frontier): its cells and how thoroughly each is answered

MAX_FRONTIER_DEPTH = 4
MAX_BUDGET = 1_000_000
MAX_FRONTIER_NEURONS = 512
"""Widest network (total hidden neurons) a frontier cell may search."""
RECHECK_SEED = 9_000_000
"""`study frontier recheck` trains on seeds RECHECK_SEED + i by default: no run of the frontier
trains on them (its selection seeds are 2,000,000 + i, its held-out blocks start at 3,000,000
and a cell would need more than 500 confirmation blocks to reach this one)."""
RECHECK_ENGINES = ("sequential", "population")
"""What `study frontier recheck` trains with: the sequential trainer (one network at a time, in
worker processes) or the population engine the frontier states its answers with (every seed of
an answer at once)."""


@dataclass(frozen=True)
class FrontierCell(Settings):
    """One point of the frontier: a function, a depth and an epoch budget."""

    function_seed: int = 0
    """Seed of the random Boolean function f."""
    depth: int = 1
    """Hidden layers; a width's neurons are spread evenly over them."""
    budget: int = 2000
    """Epoch budget of every network trained in the cell (it stops early at the target)."""

    def __post_init__(self) -> None:
        require(is_seed(self.function_seed), "function_seed", self.function_seed, SEED_RANGE)
        require(is_int(self.depth) and 1 <= self.depth <= MAX_FRONTIER_DEPTH, "depth",
                self.depth, f"must be from 1 to {MAX_FRONTIER_DEPTH}")  # fmt: skip
        require(is_int(self.budget) and 1 <= self.budget <= MAX_BUDGET, "budget", self.budget,
                f"must be from 1 to {MAX_BUDGET}")  # fmt: skip

    @property
    def name(self) -> str:
        """The cell's study (its width, held-out and confirmation evaluations)."""
        return f"frontier-f{self.function_seed}-d{self.depth}-b{self.budget}"

    @property
    def recipe_name(self) -> str:
        """The cell's recipe study."""
        return self.name + "-recipe"

    def profile(self, neurons: int) -> tuple[int, ...]:
        """`neurons` spread evenly over the cell's layers (the first ones take the rest)."""
        base, rest = divmod(neurons, self.depth)
        return tuple(base + (1 if i < rest else 0) for i in range(self.depth))


PLAN_BOUNDS = {
    "recipe_trials": (1, 1000),
    "recipe_seeds": (1, 100),
    "selection_seeds": (1, 1000),
    "heldout_seeds": (20, 10_000),
    "confirmation_seeds": (20, 10_000),
    "stated_seeds": (20, 100_000),
    "method": (2, 3),
}
"""The range of each count of a `FrontierPlan`."""


@dataclass(frozen=True)
class FrontierPlan(Settings):
    """How thoroughly each stage of a cell works; the defaults are those of the reference runs.
    Stored with the cell: a resumed cell runs with its stored plan."""

    recipe_trials: int = 48
    """Recipes Optuna tries per cell (the first `cell_engine.RECIPE_STARTUP` at random or from
    neighbouring cells, the rest guided by TPE)."""
    recipe_seeds: int = 4
    """Selection seeds per recipe."""
    selection_seeds: int = 10
    """Selection seeds per width of the width search."""
    heldout_seeds: int = 24
    """Held-out seeds per width of the success curve (at least 20)."""
    confirmation_seeds: int = 96
    """Fresh held-out seeds of the confirmation block of the stated width (at least 20)."""
    required_rate: float = 0.9
    """A width learns f when at least this share of its seeds does."""
    probe_neurons: int | None = None
    """Width of the recipe search (default: a width near the cell's expected boundary)."""
    stated_seeds: int = 192
    """Method 3: held-out seeds (from at least two blocks, failed blocks included) a width must
    have been trained on before it is stated or refused (`study.stating_rule`)."""
    stated_margin: float = 0.05
    """Method 3: the exact one-sided 95% lower bound of a stated width's pooled rate is at least
    `required_rate` less this."""
    method: int = 3
    """How a cell is answered: 3, a fitted success curve, then confirmation blocks at the chosen
    width until every held-out seed it was trained on, pooled, states it or refuses it under
    `study.stating_rule`, every stage on the cell's own seeds (`answers.stage_seeds`); 2 (cells
    stored before 2026-12-08, resumed as they were), one confirmation block of seeds shared by
    every cell. Cells stored by method 1 (blocks of 24 seeds, no curve) keep their stored
    answers but are not resumed."""

    def __post_init__(self) -> None:
        for name, (low, high) in PLAN_BOUNDS.items():
            value = getattr(self, name)
            require(is_int(value) and low <= value <= high, name, value,
                    f"must be from {low} to {high}")  # fmt: skip
        require(is_number(self.required_rate) and 0 < self.required_rate <= 1, "required_rate",
                self.required_rate, "must be in (0, 1]")  # fmt: skip
        require(is_number(self.stated_margin) and 0 <= self.stated_margin < self.required_rate,
                "stated_margin", self.stated_margin, "must be in [0, required_rate)")  # fmt: skip
        require(
            self.probe_neurons is None
            or (is_int(self.probe_neurons) and 1 <= self.probe_neurons <= MAX_FRONTIER_NEURONS),
            "probe_neurons",
            self.probe_neurons,
            f"must be from 1 to {MAX_FRONTIER_NEURONS}",
        )

    def required(self, seeds: int) -> int:
        """Seeds out of `seeds` that must learn f (`required_successes`)."""
        return required_successes(self.required_rate, seeds)

    def identity(self) -> dict[str, Any]:
        """As stored; a plan of method 2 without the fields only method 3 reads (as its cells
        stored it)."""
        values = super().identity()
        if self.method < 3:
            del values["stated_seeds"], values["stated_margin"]
        return values


@dataclass(frozen=True)
class FrontierGrid(Settings):
    """The cells one `study frontier run` answers, budget by budget."""

    function_seeds: tuple[int, ...] = (0,)
    """Functions (their seeds)."""
    depths: tuple[int, ...] = (1, 2, 3, 4)
    """Hidden layers."""
    budgets: tuple[int, ...] = (2000, 16000, 64000)
    """Epoch budgets."""

    def __post_init__(self) -> None:
        axes = {
            "function_seeds": (is_seed, f"integers from 0 to {MAX_SEED}"),
            "depths": (lambda d: is_int(d) and 1 <= d <= MAX_FRONTIER_DEPTH,
                       f"integers from 1 to {MAX_FRONTIER_DEPTH}"),
            "budgets": (lambda b: is_int(b) and 1 <= b <= MAX_BUDGET,
                        f"integers from 1 to {MAX_BUDGET}"),
        }  # fmt: skip
        for name, (ok, what) in axes.items():
            value = getattr(self, name)
            require(isinstance(value, tuple) and len(value) > 0 and all(map(ok, value)), name,
                    value, f"must be a non-empty list of {what}")  # fmt: skip

    def cells(self) -> list[FrontierCell]:
        """Every cell, in the order they are run: budgets first, then depths, then functions."""
        return [
            FrontierCell(seed, depth, budget)
            for budget in self.budgets
            for depth in self.depths
            for seed in self.function_seeds
        ]
