"""Benchmarks that print ratios measured side by side in one run (never timed tests).

`trainer`: the tutorial's FashionMNIST MLP (784-512-512-10, SGD lr 1e-3, batch 64) for one
epoch, trained (a) with the tutorial's pipeline (torchvision `ToTensor` transform per sample,
`DataLoader`, its `training_loop` and `testing_loop`) and (b) with the project's trainer on
device-resident uint8 tensors. Both train on the same 60k images and evaluate on the same
10k test images; only training and evaluation are timed (data reading and a warm-up are not).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from study import device as dev
from study.data import load_image_dataset, prepare_raw_files
from study.models import DeepNeuralNet
from study.trainer import TrainConfig, train


# ----------------------------------------------------------------------------------------------
# The tutorial's own loop, kept as it is written there (verbosity off), as the baseline.
def tutorial_training_loop(dataloader, net, loss_fn, optimiser, device) -> float:
    acc_loss = 0
    acc_count = 0
    for X, y in dataloader:
        X = X.to(device)
        y = y.to(device)
        pred = net(X)
        loss_val = loss_fn(pred, y)
        acc_loss += loss_val.item()
        acc_count += 1
        optimiser.zero_grad()
        loss_val.backward()
        optimiser.step()
    return acc_loss / acc_count


def tutorial_testing_loop(dataloader, net, device) -> float:
    size = len(dataloader.dataset)
    net.eval()
    correct = 0
    with torch.no_grad():
        for X, y in dataloader:
            X, y = X.to(device), y.to(device)
            pred = net(X)
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()
    return correct / size


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, start_dim=0)


@dataclass(frozen=True)
class EpochTiming:
    pipeline: str
    seconds: list[float]
    test_accuracy: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _tutorial_epoch(root: Path, device: torch.device, seed: int) -> tuple[float, float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import Compose, Lambda, ToTensor

    transform = Compose([ToTensor(), Lambda(_flatten)])
    training_data = datasets.FashionMNIST(str(root), train=True, transform=transform)
    test_data = datasets.FashionMNIST(str(root), train=False, transform=transform)
    train_dataloader = DataLoader(training_data, batch_size=64)
    test_dataloader = DataLoader(test_data, batch_size=64)
    with dev.seeded(seed):
        net = DeepNeuralNet(28 * 28, [512, 512], 10).to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimiser = torch.optim.SGD(net.parameters(), lr=1e-3)
    dev.synchronize(device)
    start = time.perf_counter()
    net.train()
    tutorial_training_loop(train_dataloader, net, loss_fn, optimiser, device)
    accuracy = tutorial_testing_loop(test_dataloader, net, device)
    dev.synchronize(device)
    return time.perf_counter() - start, accuracy


def _trainer_epoch(dataset, device: torch.device, seed: int) -> tuple[float, float]:
    with dev.seeded(seed):
        net = DeepNeuralNet(28 * 28, [512, 512], 10)
    # the tutorial's settings: plain SGD (no momentum), lr 1e-3, batch 64, one epoch, fp32
    config = TrainConfig(
        optimizer="sgd",
        learning_rate=1e-3,
        momentum=0.0,
        batch_size=64,
        epochs=1,
        seed=seed,
        mixed_precision=False,
    )
    result = train(net, dataset.final_task(), config)
    return result.seconds, result.final.eval_accuracy


def bench_trainer(
    data_dir: Path | str | None = None,
    device_name: str = "auto",
    repeats: int = 3,
    log=print,
) -> dict[str, float]:
    """Time one epoch of each pipeline `repeats` times, interleaved; print and return ratios."""
    device = dev.resolve_device(device_name)
    root = prepare_raw_files("fashion-mnist", data_dir)
    dataset = load_image_dataset("fashion-mnist", root, device=device)
    # warm-up (allocator, kernels, first-touch): not timed
    _trainer_epoch(dataset, device, seed=0)
    tutorial, project = [], []
    tutorial_acc = project_acc = 0.0
    for repeat in range(repeats):
        seconds, tutorial_acc = _tutorial_epoch(root, device, seed=repeat)
        tutorial.append(seconds)
        seconds, project_acc = _trainer_epoch(dataset, device, seed=repeat)
        project.append(seconds)
        log(
            f"repeat {repeat + 1}/{repeats}: tutorial {tutorial[-1]:.2f} s/epoch, "
            f"trainer {project[-1]:.2f} s/epoch"
        )
    t_med, p_med = statistics.median(tutorial), statistics.median(project)
    log(
        f"device: {dev.describe(device)}; torch {torch.__version__}; threads "
        f"{torch.get_num_threads()}"
    )
    log("FashionMNIST MLP 784-512-512-10, SGD lr 1e-3, batch 64, 1 epoch on 60k + test on 10k")
    log(
        f"  tutorial pipeline (ToTensor + DataLoader): {t_med:.2f} s/epoch (median of "
        f"{repeats}), test accuracy {tutorial_acc:.2%}"
    )
    log(
        f"  project trainer (device-resident tensors): {p_med:.2f} s/epoch (median of "
        f"{repeats}), test accuracy {project_acc:.2%}"
    )
    log(f"  speed-up: {t_med / p_med:.1f}x")
    return {"tutorial_seconds": t_med, "trainer_seconds": p_med, "ratio": t_med / p_med}
