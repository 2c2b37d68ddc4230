"""Shared helpers and fixtures: a tiny Boolean study (settings, flags, a runner), the `study`
command as a subprocess, tiny IDX datasets written by the tests, and isolated data and cache
directories (no test reads or writes the user's ~/.cache)."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from study.data import IDX_FILES

# ----------------------------------------------------------------------------------------------
# a tiny Boolean study: a 3-bit function that small networks learn in a few hundred epochs

TINY = {
    "input_bits": 3,
    "output_bits": 3,
    "max_width": 12,
    "max_epochs": 1500,
    "seeds": 2,
    "min_learning_rate": 5e-2,
    "max_learning_rate": 2e-1,
    "batch_sizes": (8,),
}


def tiny_study(tmp_path, trials, **kwargs):
    """A tiny boolean-shallow study in tmp_path/studies.db, run to `trials` in total."""
    from study.runner import run_study

    return run_study(
        "boolean-shallow",
        trials=trials,
        storage=f"sqlite:///{tmp_path / 'studies.db'}",
        sampler_seed=0,
        device="cpu",
        settings=TINY,
        quiet=True,
        **kwargs,
    )


TINY_ARGS = [
    "--input-bits",
    "3",
    "--output-bits",
    "3",
    "--max-width",
    "12",
    "--max-epochs",
    "1500",
    "--seeds",
    "2",
    "--quiet",
    "--device",
    "cpu",
    "--sampler-seed",
    "0",
    "--min-learning-rate",
    "0.05",
    "--max-learning-rate",
    "0.2",
    "--batch-sizes",
    "8",
]


def cli(*args, cwd=None, env=None, timeout=600):
    """The `study` command in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


# ----------------------------------------------------------------------------------------------
# IDX datasets


def write_idx(path: Path | str, array: torch.Tensor) -> Path:
    """Write a uint8 tensor as an IDX file (gzip when the name ends in .gz)."""
    path = Path(path)
    data = array.to(torch.uint8).contiguous()
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim()) + struct.pack(
        f">{data.dim()}I", *data.shape
    )
    payload = header + data.numpy().tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 28x28 uint8 images: class c lights a 6x6 block at a class-specific place."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    labels = labels[torch.randperm(count, generator=g)]
    images = torch.randint(0, 60, (count, 28, 28), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        row, col = 2 + 8 * (c // 4), 2 + 6 * (c % 4)
        images[i, row : row + 6, col : col + 6] = 220
    return images, labels.to(torch.uint8)


def write_fake_dataset(
    directory: Path, train: int = 300, test: int = 100, gz: bool = False, seed: int = 0
) -> Path:
    """Write the four IDX files of a tiny dataset into `directory` (plain or .gz)."""
    train_x, train_y = make_images(train, seed)
    test_x, test_y = make_images(test, seed + 1)
    suffix = ".gz" if gz else ""
    for name, array in zip(IDX_FILES, (train_x, train_y, test_x, test_y), strict=True):
        write_idx(directory / f"{name}{suffix}", array)
    return directory


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path_factory, monkeypatch) -> Path:
    """Never touch the user's ~/.cache: each test gets its own default data directory."""
    path = tmp_path_factory.mktemp("data-default")
    monkeypatch.setenv("STUDY_DATA_DIR", str(path))
    # a run sets its precision in the environment (for its workers): no test inherits another's
    monkeypatch.delenv("STUDY_PRECISION", raising=False)
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_dir(tmp_path_factory) -> Path:
    """The native kernel is built into a cache of this test session (shared by its
    subprocesses, which inherit the variables), never into the user's ~/.cache; and built with
    every compiler warning an error."""
    import os

    from study import native

    path = tmp_path_factory.mktemp("cache")
    saved = {k: os.environ.get(k) for k in ("STUDY_CACHE_DIR", "STUDY_NATIVE_STRICT")}
    os.environ["STUDY_CACHE_DIR"] = str(path)
    os.environ["STUDY_NATIVE_STRICT"] = "1"
    native.load.cache_clear()
    yield path
    native.load.cache_clear()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def fake_mnist_dir(tmp_path) -> Path:
    """A directory holding a tiny MNIST-format dataset as .gz IDX files."""
    return write_fake_dataset(tmp_path / "mnist-files", gz=True)
