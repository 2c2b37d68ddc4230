"""Datasets as device-resident tensors: the seeded Boolean function and FashionMNIST/MNIST.

Data is read once per process and moved to the device once. Trials index into the
resident tensors; images stay uint8 and are normalised per batch on the device, so no
per-sample Python transform sits in the training path.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from study.config import IMAGE_DATASETS, cache_dir
from study.errors import DataError

# ----------------------------------------------------------------------------------------------
# The random Boolean function f: {0,1}^n -> {0,1}^m


@dataclass(frozen=True)
class BooleanFunction:
    """The whole truth table of a random Boolean function, on one device."""

    inputs: Tensor
    """All 2^n input bit vectors as float32, shape (2^n, n); bit k of row i is (i >> k) & 1."""
    targets: Tensor
    """Uniform random target bits as float32, shape (2^n, m)."""
    function_seed: int
    """Seed of the generator the targets were drawn from: part of a study's identity."""

    @property
    def input_bits(self) -> int:
        return self.inputs.shape[1]

    @property
    def output_bits(self) -> int:
        return self.targets.shape[1]

    def task(self) -> Task:
        """Train on the truth table and evaluate on the whole truth table (full-table loss)."""
        return Task(
            name=f"boolean-{self.input_bits}to{self.output_bits}-seed{self.function_seed}",
            kind="binary",
            train_inputs=self.inputs,
            train_targets=self.targets,
            eval_inputs=self.inputs,
            eval_targets=self.targets,
        )


def boolean_function(
    input_bits: int = 8,
    function_seed: int = 0,
    output_bits: int | None = None,
    device: torch.device | str = "cpu",
) -> BooleanFunction:
    """The seeded random Boolean function: same seed, same function, on every device.

    Inputs are all 2^n bit vectors in the tutorial's order (`make_binary_array`); targets are
    drawn on the CPU from a generator seeded with `function_seed`, then moved to `device`.
    """
    if not 1 <= input_bits <= 20:
        raise DataError(f"input_bits: must be between 1 and 20, got {input_bits}")
    output_bits = input_bits if output_bits is None else output_bits
    if output_bits < 1:
        raise DataError(f"output_bits: must be at least 1, got {output_bits}")
    rows = torch.arange(2**input_bits)
    inputs = ((rows[:, None] >> torch.arange(input_bits)) & 1).float()
    generator = torch.Generator(device="cpu").manual_seed(function_seed)
    targets = torch.randint(0, 2, (2**input_bits, output_bits), generator=generator).float()
    return BooleanFunction(inputs.to(device), targets.to(device), function_seed)


# ----------------------------------------------------------------------------------------------
# What the trainer consumes


@dataclass(frozen=True)
class Task:
    """Device-resident training and evaluation tensors plus how to turn a batch into input."""

    name: str
    kind: Literal["binary", "multiclass"]
    """binary: multi-label bits, BCE on logits; multiclass: class index, cross-entropy."""
    train_inputs: Tensor
    train_targets: Tensor
    eval_inputs: Tensor
    eval_targets: Tensor
    pixel_mean: float | None = None
    """For uint8 images: mean of pixel/255 over the training set, subtracted per batch."""
    pixel_std: float | None = None
    """For uint8 images: std of pixel/255 over the training set, divided per batch."""

    def __post_init__(self) -> None:
        if len(self.train_inputs) != len(self.train_targets):
            raise DataError(f"{self.name}: train inputs and targets differ in length")
        if len(self.eval_inputs) != len(self.eval_targets):
            raise DataError(f"{self.name}: eval inputs and targets differ in length")

    @property
    def device(self) -> torch.device:
        return self.train_inputs.device

    @property
    def train_size(self) -> int:
        return len(self.train_inputs)

    def prepare(self, inputs: Tensor) -> Tensor:
        """A batch of stored inputs as float network input (on the device, no Python loop)."""
        if inputs.dtype != torch.uint8:
            return inputs
        return normalize_images(inputs, self.pixel_mean or 0.0, self.pixel_std or 1.0)


def normalize_images(images: Tensor, mean: float, std: float) -> Tensor:
    """uint8 images (N, H, W) as float network input (N, 1, H, W): (x/255 - mean) / std."""
    x = images.float()
    if x.dim() == 3:  # (N, H, W) greyscale -> (N, 1, H, W)
        x = x.unsqueeze(1)
    # x/255 then (x - mean)/std, fused into one multiply-add
    return x.mul_(1.0 / (255.0 * std)).sub_(mean / std)


# ----------------------------------------------------------------------------------------------
# FashionMNIST and MNIST from their IDX files

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
SPLITS = {"train": "train", "test": "t10k"}
"""Each split and the prefix of its IDX files."""
CLASS_NAMES = {
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(d) for d in range(10)),
}
# Where Debian's packages put the original .gz files (dataset-fashion-mnist).
SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
_HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`, or pass "
    "--data-dir DIR holding the four IDX files",
    "mnist": "pass --data-dir DIR holding the four MNIST IDX files "
    "(train-images-idx3-ubyte[.gz], ...), or run where torchvision can download them",
}


def default_data_dir() -> Path:
    """$STUDY_DATA_DIR, else `cache_dir()`/data (~/.cache/study/data): where raw IDX files are
    unpacked."""
    env = os.environ.get("STUDY_DATA_DIR")
    return Path(env) if env else cache_dir() / "data"


def _dataset_class(name: str):
    from torchvision import datasets

    if name not in IMAGE_DATASETS:
        raise DataError(
            f"dataset: unknown dataset {name!r}; choose from {', '.join(IMAGE_DATASETS)}"
        )
    return getattr(datasets, IMAGE_DATASETS[name])


def _check_idx(path: Path) -> tuple[int, ...]:
    """Validate an uncompressed IDX file's header against its size; return its shape."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(4)
        if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
            raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
        ndim = header[3]
        dims_raw = handle.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header; delete it and fetch the file again")
    shape = struct.unpack(f">{ndim}I", dims_raw)
    count = 1
    for d in shape:
        count *= d
    expected = 4 + 4 * ndim + count
    if size != expected:
        raise DataError(
            f"{path}: truncated or corrupted IDX file ({size} bytes, header says {expected}); "
            "delete it and fetch the file again"
        )
    return shape


def _unpack(source: Path, target: Path) -> None:
    """Copy or gunzip `source` to `target` atomically (never leave half a file behind); two
    processes preparing the same directory at once each write their own partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        if source.suffix == ".gz":
            with gzip.open(source, "rb") as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(source, partial)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"{source}: cannot be read ({error}); delete it and fetch it again"
        ) from None
    partial.replace(target)


def prepare_raw_files(
    name: str, data_dir: Path | str | None = None, download: bool = False
) -> Path:
    """Make the four uncompressed IDX files available under `root/<Class>/raw/`; return root.

    Looks in `data_dir/<Class>/raw/`, in `data_dir` itself (plain or .gz files) and in the
    directory a Debian package installs; unpacks what it finds. With `download`, falls back to
    torchvision's own download. Missing files give one `DataError` line saying how to get them.
    """
    cls = _dataset_class(name)
    if data_dir is not None and not Path(data_dir).is_dir():  # only the default is made
        what = "is not a directory" if Path(data_dir).exists() else "does not exist"
        raise DataError(f"--data-dir {data_dir} {what}; {_HOW_TO_GET[name]}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    raw = root / cls.__name__ / "raw"
    sources = [raw, root, *SYSTEM_DIRS.get(name, ())]
    missing: list[str] = []
    unpacked: list[Path] = []
    for filename in IDX_FILES:
        target = raw / filename
        if target.exists():
            continue
        found = next(
            (
                candidate
                for directory in sources
                for candidate in (directory / filename, directory / f"{filename}.gz")
                if candidate.is_file()
            ),
            None,
        )
        if found is None:
            missing.append(filename)
            continue
        try:
            _unpack(found, target)
        except PermissionError as error:
            raise DataError(f"{raw}: not writable ({error}); pass another --data-dir") from None
        unpacked.append(target)
    if missing and download:
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
            missing = [f for f in IDX_FILES if not (raw / f).exists()]
        except Exception as error:  # network errors come in many types
            raise DataError(
                f"{cls.__name__}: files missing in {root} and download failed "
                f"({type(error).__name__}); {_HOW_TO_GET[name]}"
            ) from None
    if missing:
        raise DataError(
            f"{cls.__name__}: {', '.join(missing)} not found in {root}; {_HOW_TO_GET[name]}"
        )
    try:
        for filename in IDX_FILES:
            _check_idx(raw / filename)
        check_identity(name, root)
    except DataError:
        for path in unpacked:  # what this call unpacked is not the dataset: leave nothing behind
            path.unlink(missing_ok=True)
        raise
    return root


KNOWN_LABELS = {
    ("mnist", "train"): (60_000, (5, 0, 4, 1, 9, 2, 1, 3, 1, 4)),
    ("mnist", "test"): (10_000, (7, 2, 1, 0, 4, 1, 4, 9, 5, 9)),
    ("fashion-mnist", "train"): (60_000, (9, 0, 0, 3, 0, 2, 7, 2, 5, 5)),
    ("fashion-mnist", "test"): (10_000, (9, 2, 1, 1, 6, 1, 4, 6, 5, 7)),
}
"""Fingerprints of the original label files: count and first labels. Recognises the real
datasets (and which split a file is) without refusing anyone's own data in the same format."""


def _fingerprint(path: Path) -> tuple[int, tuple[int, ...]]:
    with path.open("rb") as handle:
        header = handle.read(8)
        first = handle.read(10)
    return int.from_bytes(header[4:8], "big"), tuple(first)


def check_identity(name: str, root: Path) -> None:
    """Refuse files that are recognisably another dataset or the other split: MNIST given as
    FashionMNIST (or the reverse), training files given as test files (or the reverse)."""
    raw = root / IMAGE_DATASETS[name] / "raw"
    labels = {split: raw / f"{prefix}-labels-idx1-ubyte" for split, prefix in SPLITS.items()}
    if labels["train"].read_bytes() == labels["test"].read_bytes():
        raise DataError(f"{raw}: the training and the test label files are the same file")
    for split, path in labels.items():
        found = next((k for k, v in KNOWN_LABELS.items() if v == _fingerprint(path)), None)
        if found is not None and found != (name, split):
            other, other_split = found
            raise DataError(
                f"{path}: these are the {IMAGE_DATASETS[other]} {other_split} labels, not the "
                f"{IMAGE_DATASETS[name]} {split} labels; check the files in {root}"
            )


def check_image_files(
    name: str, data_dir: Path | str | None, validation_size: int
) -> tuple[int, ...]:
    """Before a study is created: the dataset's files are there, are what they claim to be, and
    leave training images beside the validation split. Returns the training images' shape."""
    root = prepare_raw_files(name, data_dir)
    raw = root / IMAGE_DATASETS[name] / "raw"
    shape = _check_idx(raw / "train-images-idx3-ubyte")
    if not 0 < validation_size < shape[0]:
        raise DataError(
            f"validation_size: must be between 1 and {shape[0] - 1} (the dataset has "
            f"{shape[0]} training images), got {validation_size}"
        )
    return shape


@dataclass(frozen=True)
class ImageDataset:
    """FashionMNIST or MNIST on one device: uint8 images, int64 labels, a seeded split."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    validation_images: Tensor
    validation_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    pixel_mean: float
    pixel_std: float
    split_seed: int

    @property
    def class_names(self) -> Sequence[str]:
        return CLASS_NAMES[self.name]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one network input."""
        return (1, *self.train_images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def search_task(self) -> Task:
        """Train on the training part of the split, evaluate on the validation part."""
        return Task(
            f"{self.name}-search",
            "multiclass",
            self.train_images,
            self.train_labels,
            self.validation_images,
            self.validation_labels,
            self.pixel_mean,
            self.pixel_std,
        )

    def full_training_task(self) -> Task:
        """Train on all training images (train + validation part) for a final model; the
        per-epoch evaluation runs on the validation part, now training data (a fit monitor,
        not a held-out score). The test set stays out of it."""
        return Task(
            f"{self.name}-full",
            "multiclass",
            torch.cat([self.train_images, self.validation_images]),
            torch.cat([self.train_labels, self.validation_labels]),
            self.validation_images,
            self.validation_labels,
            self.pixel_mean,
            self.pixel_std,
        )

    def final_task(self) -> Task:
        """Train on all 60k training images, evaluate once on the test set (never in a search)."""
        return Task(
            f"{self.name}-final",
            "multiclass",
            torch.cat([self.train_images, self.validation_images]),
            torch.cat([self.train_labels, self.validation_labels]),
            self.test_images,
            self.test_labels,
            self.pixel_mean,
            self.pixel_std,
        )


def _read_split(cls, root: Path, train: bool) -> tuple[Tensor, Tensor]:
    raw = root / cls.__name__ / "raw"
    prefix = "train" if train else "t10k"
    image_shape = _check_idx(raw / f"{prefix}-images-idx3-ubyte")
    label_shape = _check_idx(raw / f"{prefix}-labels-idx1-ubyte")
    if len(image_shape) != 3 or len(label_shape) != 1 or image_shape[0] != label_shape[0]:
        raise DataError(
            f"{raw}: {prefix} images {image_shape} and labels {label_shape} do not match"
        )
    try:
        dataset = cls(str(root), train=train, download=False)
    except (AssertionError, RuntimeError, ValueError, OSError) as error:
        raise DataError(f"{raw}: cannot read {prefix} files ({error})") from None
    images, labels = dataset.data, dataset.targets.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= 10):
        raise DataError(f"{raw}: {prefix} labels outside 0..9; the label file is corrupted")
    return images, labels


@functools.lru_cache(maxsize=8)
def _load_cpu(name: str, root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cls = _dataset_class(name)
    train_images, train_labels = _read_split(cls, Path(root), train=True)
    test_images, test_labels = _read_split(cls, Path(root), train=False)
    return train_images, train_labels, test_images, test_labels


def load_image_dataset(
    name: str = "fashion-mnist",
    data_dir: Path | str | None = None,
    device: torch.device | str = "cpu",
    validation_size: int = 10_000,
    split_seed: int = 0,
    download: bool = False,
) -> ImageDataset:
    """Read FashionMNIST or MNIST once (torchvision's readers) and move it to `device` once.

    The 60k training images are split into train and validation by a permutation seeded
    with `split_seed`; normalisation constants come from the training part only.
    """
    root = prepare_raw_files(name, data_dir, download=download)
    train_images, train_labels, test_images, test_labels = _load_cpu(name, str(root.resolve()))
    n = len(train_images)
    if not 0 < validation_size < n:
        raise DataError(f"validation_size: must be between 1 and {n - 1}, got {validation_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    valid_idx, train_idx = order[:validation_size], order[validation_size:]
    train_part = train_images[train_idx]
    pixels = train_part.float().div_(255.0)
    mean, std = pixels.mean().item(), pixels.std().item()
    del pixels
    return ImageDataset(
        name=name,
        train_images=train_part.to(device),
        train_labels=train_labels[train_idx].to(device),
        validation_images=train_images[valid_idx].to(device),
        validation_labels=train_labels[valid_idx].to(device),
        test_images=test_images.to(device),
        test_labels=test_labels.to(device),
        pixel_mean=mean,
        pixel_std=max(std, 1e-6),
        split_seed=split_seed,
    )
