"""Export the best model of an image study and classify images with it.

`export_model` retrains the best trial's configuration on all training images, evaluates it
once on the test set and writes `model.pt` (state_dict), `config.json` (everything needed to
rebuild it) and `metrics.json` (the test accuracy) under `results/<study>/`. `predict` loads
them and classifies test images by index or PNG/JPEG files, as the tutorial does.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optuna.artifacts import upload_artifact

from study import device as dev
from study.config import ImageCandidate, ImageSettings
from study.data import load_image_dataset, normalize_images
from study.errors import ConfigError, DataError, StudyError, first_line
from study.image_objective import history_rows, prepare_model
from study.storage import artifact_store, default_out
from study.studies import (
    BASELINE_EXPORT_ATTR,
    EXPORT_ATTR,
    baseline_trial,
    best_feasible,
    load,
    run_seconds,
    store_attr,
    stored_attrs,
)
from study.trainer import evaluate, train

MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.pt", "config.json", "metrics.json"


@dataclass(frozen=True)
class Export:
    """Where an export went and what it measured."""

    directory: Path
    trial: int
    validation_accuracy: float
    test_accuracy: float
    """Of the saved model (the first training seed)."""
    test_loss: float
    seconds: float
    """Retraining and testing the saved model (the first seed), as `export_seconds`."""
    test_accuracy_seeds: tuple[float, ...] = ()
    """One per training seed (the first is the saved model's)."""

    @property
    def test_accuracy_mean(self) -> float:
        return sum(self.test_accuracy_seeds) / len(self.test_accuracy_seeds)


def export_model(
    name: str,
    storage: str,
    out_dir: Path | str | None = None,
    device: str = "auto",
    data_dir: Path | str | None = None,
    command: str | None = None,
    log=print,
    seeds: int = 1,
    baseline: bool = False,
    study_seconds: float | None = None,
) -> Export:
    """Retrain the best configuration of study `name` (or, with `baseline`, its enqueued
    baseline) on all training images with `seeds` training seeds, and test each once; save the
    first seed's weights, the config and the metrics in `out_dir` and in the store's
    artifacts. Seeds already exported for the same trial are read back, not retrained."""
    study, info = load(name, storage, kind="image", command="export")
    settings = info.settings
    trial = _chosen(study, name, baseline)
    candidate = ImageCandidate.from_dict(trial.user_attrs["config"])
    target = dev.resolve_device(device)
    dataset = load_image_dataset(
        settings.dataset,
        data_dir,
        device=target,
        validation_size=settings.validation_size,
        split_seed=settings.split_seed,
    )
    out = Path(out_dir) if out_dir is not None else default_out(name)
    attr = BASELINE_EXPORT_ATTR if baseline else EXPORT_ATTR
    earlier = stored_attrs(study).get(attr) or {}
    if earlier.get("trial") != trial.number or not earlier.get("artifacts"):
        earlier = {}  # another trial (or none) was exported: start afresh
    done = dict(zip(earlier.get("seeds", []), earlier.get("test_accuracy_seeds", []), strict=True))
    wanted = [settings.seed + k for k in range(seeds)]
    log(
        f"{name}: retraining trial {trial.number} (validation accuracy {trial.value:.4f}) on "
        f"all {len(dataset.train_images) + len(dataset.validation_images)} training images "
        f"with seeds {[s for s in wanted if s not in done]}: {candidate.describe()}"
    )
    first = None
    for seed in wanted:
        if seed not in done:
            retrained = retrain(candidate, dataset, seed, target)
            done[seed] = retrained.test_accuracy
            if seed == wanted[0]:
                first = retrained
    if first is None:  # the first seed's model was exported before: keep its files
        fetch_export_record(study, storage, attr, out)
        earlier = json.loads((out / METRICS_FILE).read_text())
    metrics = _metrics(study, trial, dataset, wanted, done, earlier, first, command, study_seconds)
    config = _config(name, trial.number, settings, dataset, candidate)
    _save(study, storage, out, first.model if first else None, config, metrics, attr)
    return Export(out, trial.number, trial.value, metrics["test_accuracy"],
                  metrics["test_loss"], metrics["export_seconds"],
                  tuple(metrics["test_accuracy_seeds"]))  # fmt: skip


def _chosen(study, name: str, baseline: bool):
    """The trial to export: the best complete one, or the study's enqueued baseline."""
    if not baseline:
        best = best_feasible(study)
        if best is None:
            raise ConfigError(f"study {name!r} has no complete trial yet; run it first")
        return best
    trial = baseline_trial(study)
    if trial is None:
        raise ConfigError(f"study {name!r} has no complete baseline trial to export")
    return trial


@dataclass(frozen=True)
class _Retrained:
    model: torch.nn.Module
    result: Any
    test_loss: float
    test_accuracy: float
    seconds: float


def retrain(candidate: ImageCandidate, dataset, seed: int, target) -> _Retrained:
    """Train `candidate` with training seed `seed` on all training images; test it once."""
    config = candidate.train.replace(seed=seed)
    with dev.seeded(seed):
        model = prepare_model(candidate, dataset.image_shape, dataset.num_classes, target)
    started = time.perf_counter()
    result = train(model, dataset.full_training_task(), config)
    # the one and only look at the test set (as the search evaluated: same flip, same precision)
    test_loss, test_accuracy = evaluate(
        model,
        dataset.final_task(),
        mixed_precision=config.mixed_precision,
        test_time_flip=config.test_time_flip,
    )
    return _Retrained(model, result, test_loss, test_accuracy, time.perf_counter() - started)


SAVED = ("test_accuracy", "test_loss", "parameters", "epochs", "export_seconds", "device",
         "history")  # fmt: skip
"""What metrics.json says of the saved model (the first seed's)."""


def _metrics(study, trial, dataset, wanted, done, earlier, first, command, study_seconds) -> dict:
    """metrics.json: the saved model's test accuracy and history, every seed's accuracy and
    their mean, the wall times, and the search against its baseline (validation)."""
    accuracies = [done[s] for s in wanted]
    base = baseline_trial(study)
    baseline = base.value if base is not None else None
    saved = (
        {
            "test_accuracy": first.test_accuracy,
            "test_loss": first.test_loss,
            "parameters": first.result.parameters,
            "epochs": first.result.epochs_run,
            "export_seconds": round(first.seconds, 2),
            "device": first.result.device,
            "history": history_rows(first.result.history),
        }
        if first is not None
        else {k: earlier[k] for k in SAVED if k in earlier}
    )
    best = best_feasible(study)
    return {
        "trial": trial.number,
        **saved,
        "seconds": saved.get("export_seconds"),
        "validation_accuracy_in_search": trial.value,
        "test_images": len(dataset.test_images),
        "seeds": wanted,
        "test_accuracy_seeds": accuracies,
        "test_accuracy_mean": sum(accuracies) / len(accuracies),
        "study_seconds": study_seconds if study_seconds is not None else run_seconds(study),
        "baseline_validation_accuracy": baseline,
        "best_validation_accuracy": best.value if best is not None else None,
        "best_is_baseline": bool(best is not None and best.user_attrs.get("baseline")),
        "command": command,
    }


def _config(name: str, trial: int, settings, dataset, candidate: ImageCandidate) -> dict:
    """config.json: what rebuilds the model and prepares its inputs (`load_exported`)."""
    return {
        "study": name,
        "trial": trial,
        "dataset": settings.dataset,
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes,
        "pixel_mean": dataset.pixel_mean,
        "pixel_std": dataset.pixel_std,
        "settings": settings.identity(),
        **candidate.to_dict(),
    }


def _save(study, storage: str, out: Path, model, config: dict, metrics: dict, attr: str) -> None:
    """The weights (when retrained now), config and metrics into `out`, and the same files into
    Optuna's artifact store, attached to the study (Optuna refuses to change a finished trial;
    the record names the trial): the dashboard shows them and `study predict NAME` reads them
    from there."""
    out.mkdir(parents=True, exist_ok=True)
    if model is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out / MODEL_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    store = artifact_store(storage)
    artifacts = {
        name: upload_artifact(
            artifact_store=store, file_path=str(out / name), study_or_trial=study
        )
        for name in (MODEL_FILE, CONFIG_FILE, METRICS_FILE)
    }
    record = {k: v for k, v in metrics.items() if k != "history"}
    superseded = (stored_attrs(study).get(attr) or {}).get("artifacts") or {}
    store_attr(study, attr, {**record, "artifacts": artifacts})
    for artifact_id in superseded.values():  # the files of the export this one replaces
        with contextlib.suppress(Exception):  # already gone
            store.remove(artifact_id)


def fetch_export(name: str, storage: str, into: Path) -> Path:
    """Download study `name`'s exported files from its store's artifact store into `into`."""
    study, _ = load(name, storage, kind="image", command="predict")
    return fetch_export_record(study, storage, EXPORT_ATTR, into)


def fetch_export_record(study, storage: str, attr: str, into: Path) -> Path:
    """Download the files of the export recorded under `attr` into `into`."""
    from optuna.artifacts import download_artifact

    name = study.study_name
    record = stored_attrs(study).get(attr) or {}
    artifacts = record.get("artifacts")
    if not artifacts:
        raise ConfigError(
            f"study {name!r} has no exported model in its store; run `study export {name}` "
            "first (or pass --dir with the exported files)"
        )
    store = artifact_store(storage)
    into.mkdir(parents=True, exist_ok=True)
    for filename, artifact_id in artifacts.items():
        target = into / filename
        target.unlink(missing_ok=True)
        try:
            download_artifact(artifact_store=store, file_path=str(target), artifact_id=artifact_id)
        except Exception as error:  # the store's files were moved or deleted
            raise DataError(
                f"{name}: exported {filename} missing from the artifact store ({error})"
            ) from None
    return into


def load_exported(directory: Path | str, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The exported model (eval mode, on `device`) and its config."""
    directory = Path(directory)
    config_path, model_path = directory / CONFIG_FILE, directory / MODEL_FILE
    if not config_path.is_file() or not model_path.is_file():
        raise ConfigError(
            f"{directory}: no exported model ({CONFIG_FILE} and {MODEL_FILE}); "
            "run `study export NAME` first"
        )
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise DataError(
            f"{config_path}: {config_path.stat().st_size:,} bytes is not an export config (at "
            f"most {MAX_CONFIG_BYTES:,}); export again"
        )
    try:
        config = json.loads(config_path.read_text())
        candidate = ImageCandidate.from_dict(config)
        classes = [str(c) for c in config["class_names"]]
        shape = tuple(int(d) for d in config["image_shape"])
        num_classes = int(config["num_classes"])
        ImageSettings.from_dict(config["settings"])
        float(config["pixel_mean"]), float(config["pixel_std"])
        if len(shape) != 3 or min(shape) < 1 or max(shape) > 4096 or num_classes != len(classes):
            raise ValueError("image_shape, num_classes and class_names do not fit together")
        with torch.device("meta"):  # sized first, without memory: a hostile width is refused
            size = sum(p.numel() for p in candidate.build(shape, num_classes).parameters())
        if size > MAX_EXPORT_PARAMETERS:
            raise ValueError(f"{size:,} parameters (at most {MAX_EXPORT_PARAMETERS:,})")
        model = candidate.build(shape, num_classes)
    except (ValueError, KeyError, TypeError, AttributeError, StudyError, RecursionError,
            OverflowError, MemoryError, RuntimeError) as error:  # fmt: skip
        # RuntimeError, MemoryError: a network too large to build in this machine's memory
        raise DataError(
            f"{config_path}: not a usable export config ({type(error).__name__}: "
            f"{first_line(error)}); export again"
        ) from None
    try:  # weights only: a model file never runs code (a hostile pickle is refused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the refusal below says what matters
            state = torch.load(model_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # unpickling, zip and shape errors come in many types
        raise DataError(
            f"{model_path}: not a usable model for {CONFIG_FILE} ({type(error).__name__}: "
            f"{first_line(error)}); export again"
        ) from None
    target = dev.resolve_device(device)
    return model.to(target).eval(), config


MAX_IMAGE_PIXELS = 40_000_000
"""Largest picture `predict` reads (a 40-megapixel photo); anything larger is refused before
it is decoded, so that a huge or hostile file cannot exhaust memory."""
MAX_IMAGE_SIDE = 1024
"""A picture's longest side is scaled down to this (keeping its shape) before it is padded
to a square: a 40,000,000 x 1 strip would otherwise become a 40M x 40M square."""
MAX_EXPORT_PARAMETERS = 200_000_000
"""Largest network `predict` builds from a config (800 MB of float32 weights)."""
MAX_CONFIG_BYTES = 1_000_000
"""Largest `config.json` `predict` reads (an export's is a few kilobytes)."""


def read_image_file(path: Path | str, shape: tuple[int, int]) -> torch.Tensor:
    """A PNG/JPEG as a (H, W) uint8 tensor in the dataset's style: light object on dark.

    Greyscale, padded to a square with its border colour, resized; a picture with a light
    background (a photo, a drawing on paper) is inverted.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"{path}: {opened.width}x{opened.height} pixels is too large (at most "
                    f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels); scale it down first"
                )
            image = opened.convert("L")
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{path}: no such image file") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: refused, too large to decode ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({first_line(error)})") from None
    if min(image.size) < 1:
        raise DataError(f"{path}: the image is empty")
    if max(image.size) > MAX_IMAGE_SIDE:  # a thin strip would pad to a huge square
        scale = MAX_IMAGE_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).float().mean()
    if border > 127:
        image = ImageOps.invert(image)
        border = 255 - border
    side = max(image.size)
    square = Image.new("L", (side, side), int(border))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    resized = square.resize((shape[1], shape[0]), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(resized, dtype=np.uint8))


@torch.no_grad()
def predict(
    directory: Path | str,
    indices: list[int] | None = None,
    files: list[Path | str] | None = None,
    data_dir: Path | str | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Classify test images by index and/or image files with an exported model.

    Returns one dict per image: source, predicted, actual (None for files), probability.
    """
    model, config = load_exported(directory, device)
    classes = config["class_names"]
    images, actual, sources = [], [], []
    if indices:
        settings = ImageSettings.from_dict(config["settings"])
        dataset = load_image_dataset(
            settings.dataset,
            data_dir,
            validation_size=settings.validation_size,
            split_seed=settings.split_seed,
        )
        n = len(dataset.test_images)
        for index in indices:
            if not 0 <= index < n:
                raise ConfigError(f"index: test images are numbered 0..{n - 1}, got {index}")
            images.append(dataset.test_images[index].cpu())
            actual.append(classes[int(dataset.test_labels[index])])
            sources.append(f"test image {index}")
    for path in files or []:
        images.append(read_image_file(path, tuple(config["image_shape"][1:])))
        actual.append(None)
        sources.append(str(path))
    if not images:
        raise ConfigError("predict: give test image indices and/or image files")
    target = next(model.parameters()).device
    x = normalize_images(torch.stack(images).to(target), config["pixel_mean"], config["pixel_std"])
    probabilities = model(x).float().softmax(1)
    best = probabilities.argmax(1).tolist()
    return [
        {
            "source": source,
            "predicted": classes[k],
            "actual": truth,
            "probability": float(probabilities[i, k]),
        }
        for i, (source, k, truth) in enumerate(zip(sources, best, actual, strict=True))
    ]


def prediction_line(row: dict[str, Any]) -> str:
    """The tutorial's line, with the source and the model's confidence."""
    text = f'Predicted: "{row["predicted"]}"'
    if row["actual"] is not None:
        text += f', Actual: "{row["actual"]}"'
    return f"{text}  ({row['source']}, p={row['probability']:.2f})"
