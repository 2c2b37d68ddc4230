"""Configuration as data: the fixed settings of a study and one sampled candidate.

A study's fixed settings are part of its identity: they are stored as study user attributes
and a resumed study must be run with the same ones (a conflict is refused, never mixed).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

from study.errors import ConfigError, reject_unknown_fields
from study.trainer import TrainConfig


@dataclass(frozen=True)
class BooleanSettings:
    """Fixed settings of a Boolean width study (the question and its training budget)."""

    input_bits: int = 8
    """n: the function maps {0,1}^n to {0,1}^m; the truth table has 2^n rows."""
    output_bits: int = 8
    """m: output bits per row."""
    function_seed: int = 0
    """Seed of the random function f: part of the study's identity."""
    target_loss: float = 1e-3
    """f is learned when the full-table mean BCE is at most this (and every bit is right)."""
    max_epochs: int = 2000
    """Epoch cap: the largest training budget a trial may draw (it stops early at the target)."""
    seeds: int = 3
    """r: independent initialisation seeds trained per trial."""
    required_share: float = 1.0
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
    """Lower bound of the (log-scale) learning-rate range of Adam."""
    max_learning_rate: float = 5e-2
    """Upper bound of the (log-scale) learning-rate range of Adam."""
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    """Mini-batch sizes the search may choose from (rows of the truth table per step)."""
    prune: bool = True
    """Stop a seed's training once the target is out of reach within its budget (see
    `study.objectives.TargetUnreachable`), and a trial once the required share is."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {message} (got {getattr(self, name)!r})")

        need(1 <= self.input_bits <= 16, "input_bits", "must be between 1 and 16")
        need(self.output_bits >= 1, "output_bits", "must be at least 1")
        need(self.function_seed >= 0, "function_seed", "must be >= 0")
        need(0 < self.target_loss < 1, "target_loss", "must be in (0, 1)")
        need(self.max_epochs >= 1, "max_epochs", "must be at least 1")
        need(self.seeds >= 1, "seeds", "must be at least 1")
        need(0 < self.required_share <= 1, "required_share", "must be in (0, 1]")
        need(self.min_width >= 1, "min_width", "must be at least 1")
        need(
            self.max_width >= self.min_width,
            "max_width",
            f"must be >= min_width={self.min_width} (inverted width bounds)",
        )
        need(self.min_layers >= 1, "min_layers", "must be at least 1")
        need(
            self.max_layers >= self.min_layers,
            "max_layers",
            f"must be >= min_layers={self.min_layers}",
        )
        need(self.min_learning_rate > 0, "min_learning_rate", "must be positive")
        need(
            self.max_learning_rate >= self.min_learning_rate,
            "max_learning_rate",
            f"must be >= min_learning_rate={self.min_learning_rate}",
        )
        need(
            len(self.batch_sizes) > 0 and all(b >= 1 for b in self.batch_sizes),
            "batch_sizes",
            "must be a non-empty list of positive sizes",
        )

    @property
    def required_successes(self) -> int:
        """Seeds out of `seeds` that must learn f."""
        return self.required_of(self.seeds)

    def required_of(self, seeds: int) -> int:
        """Seeds out of `seeds` that must learn f at the required share (at least one)."""
        return max(1, math.ceil(self.required_share * seeds - 1e-9))

    @property
    def min_epochs(self) -> int:
        """Smallest epoch budget a trial may draw (a quarter of the cap)."""
        return max(1, self.max_epochs // 4)

    def identity(self) -> dict[str, Any]:
        """JSON-able dict stored with the study; a resumed run must match it."""
        values = asdict(self)
        values["batch_sizes"] = list(self.batch_sizes)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BooleanSettings:
        reject_unknown_fields(cls, values)
        values = dict(values)
        if "batch_sizes" in values:
            values["batch_sizes"] = tuple(values["batch_sizes"])
        return cls(**values)

    def replace(self, **changes: Any) -> BooleanSettings:
        return BooleanSettings.from_dict({**self.identity(), **changes})


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

    @property
    def neurons(self) -> int:
        """Hidden neurons: the sum of the hidden widths."""
        return sum(self.hidden_layer_profile)

    def parameters(self, input_bits: int, output_bits: int) -> int:
        """Trainable parameters of the ReLU network with this profile."""
        widths = [input_bits, *self.hidden_layer_profile, output_bits]
        return sum((a + 1) * b for a, b in itertools.pairwise(widths))

    def train_config(self, settings: BooleanSettings, seed: int) -> TrainConfig:
        """Adam on the full truth table, fp32, stopping at the target loss."""
        return TrainConfig(
            optimizer="adam",
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            epochs=self.epochs,
            seed=seed,
            target_loss=settings.target_loss,
            mixed_precision=False,
        )

    def describe(self) -> str:
        profile = "-".join(str(w) for w in self.hidden_layer_profile)
        return (
            f"[{profile}] lr={self.learning_rate:.3g} batch={self.batch_size} epochs={self.epochs}"
        )


# ----------------------------------------------------------------------------------------------
# Image classification studies (FashionMNIST, MNIST)

IMAGE_DATASETS = ("fashion-mnist", "mnist")


@dataclass(frozen=True)
class ImageSettings:
    """Fixed settings of an image study: the data, its split and the epoch range searched."""

    dataset: str = "fashion-mnist"
    """fashion-mnist or mnist."""
    validation_size: int = 10_000
    """Training images held out for validation (the search's objective)."""
    split_seed: int = 0
    """Seed of the train/validation split: part of the study's identity."""
    min_epochs: int = 4
    """Fewest epochs a trial may draw."""
    max_epochs: int = 30
    """Most epochs a trial may draw (the pruner stops weak trials earlier)."""
    seed: int = 0
    """Training seed (initial weights, shuffling, dropout); the same for every trial, so
    that trials differ by their configuration only."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {message} (got {getattr(self, name)!r})")

        need(self.dataset in IMAGE_DATASETS, "dataset", f"must be one of {IMAGE_DATASETS}")
        need(self.validation_size >= 1, "validation_size", "must be at least 1")
        need(self.split_seed >= 0, "split_seed", "must be >= 0")
        need(self.min_epochs >= 1, "min_epochs", "must be at least 1")
        need(
            self.max_epochs >= self.min_epochs,
            "max_epochs",
            f"must be >= min_epochs={self.min_epochs}",
        )
        need(self.seed >= 0, "seed", "must be >= 0")

    def identity(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageSettings:
        reject_unknown_fields(cls, values)
        return cls(**values)

    def replace(self, **changes: Any) -> ImageSettings:
        return ImageSettings.from_dict({**self.identity(), **changes})


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
        )
        return ConvNet(spec, image_shape, num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageCandidate:
        return cls(dict(values["architecture"]), TrainConfig.from_dict(values["train"]))

    def describe(self) -> str:
        a, t = self.architecture, self.train
        if self.is_cnn:
            blocks = "-".join(
                f"{b['channels']}c{b['kernel_size']}{'bn' if b['batch_norm'] else ''}"
                f"{'' if b['pool'] == 'none' else b['pool'][0] + 'p'}"
                for b in a["blocks"]
            )
            arch = f"CNN [{blocks}] head {a['head_width']}"
        else:
            arch = "MLP [" + "-".join(str(w) for w in a["hidden_layer_profile"]) + "]"
        return (
            f"{arch} dropout {a.get('dropout', 0.0):.2f}; {t.optimizer} lr {t.learning_rate:.3g} "
            f"({t.lr_schedule}) batch {t.batch_size} epochs {t.epochs} wd {t.weight_decay:.2g}"
        )
