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
from pathlib import Path

import torch
from torch import nn

from study import device as dev
from study.config import TrainConfig
from study.data import load_image_dataset, prepare_raw_files
from study.models import DeepNeuralNet
from study.trainer import train


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


# ----------------------------------------------------------------------------------------------
# Boolean: the tutorial's loop vs the sequential trainer vs the population trainer


def _tutorial_boolean_trial(fn, width: int, lr: float, batch: int, epochs: int, seed: int):
    """One trial exactly as the tutorial runs it: DataLoader, Sigmoid + BCELoss, Adam, and
    its `train` (training_loop, then testing_loop over the same data, every epoch)."""
    from torch.utils.data import DataLoader, TensorDataset

    device = fn.inputs.device
    with dev.seeded(seed):
        net = DeepNeuralNet(fn.input_bits, [width], fn.output_bits, nn.Sigmoid()).to(device)
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(fn.inputs.cpu(), fn.targets.cpu())
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=generator)
    loss_fn = nn.BCELoss()
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    least = None
    for _ in range(epochs):
        net.train()
        mean_loss = tutorial_training_loop(loader, net, loss_fn, optimiser, device)
        correct = count = 0
        with torch.no_grad():  # the tutorial's Boolean testing_loop
            for X, y in loader:
                X, y = X.to(device), y.to(device)
                correct += torch.count_nonzero(torch.round(net(X)) == y).item()
                count += y.numel()
        least = mean_loss if least is None or mean_loss < least else least
    return least, correct / count


def bench_boolean(
    trials: int = 32,
    epochs: int = 250,
    batch: int = 4,
    learning_rate: float = 5e-3,
    device_name: str = "auto",
    log=print,
) -> dict[str, float]:
    """Train the same configurations three ways in one run; print trials/second and ratios.

    Widths are log-spaced from 16 to 256, one seed each, no early stop (every run does all
    `epochs`, as the tutorial does). All three run on one thread on the CPU.
    """
    from study.config import BooleanCandidate
    from study.data import boolean_function
    from study.models import build_boolean_net
    from study.population import Member, train_population

    device = dev.resolve_device(device_name)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    fn = boolean_function(8, 0, device=device)
    widths = [round(16 * 16 ** (i / max(1, trials - 1))) for i in range(trials)]
    candidates = [BooleanCandidate((w,), learning_rate, batch, epochs) for w in widths]

    def network(c: BooleanCandidate, seed: int) -> nn.Module:
        return build_boolean_net(c.hidden_layer_profile, fn.input_bits, fn.output_bits, seed)

    def member(c: BooleanCandidate, seed: int) -> Member:
        return Member(c.hidden_layer_profile, c.train_config(seed, None))  # no early stop

    # warm-up, not timed: one short run through each path
    warm = BooleanCandidate((16,), learning_rate, batch, 2)
    _tutorial_boolean_trial(fn, 16, learning_rate, batch, 2, 0)
    train(network(warm, 0), fn.task(), warm.train_config(0, None))
    train_population([member(warm, 0)], fn)

    timings: dict[str, float] = {}
    final_losses: dict[str, list[float]] = {}
    dev.synchronize(device)
    start = time.perf_counter()
    final_losses["tutorial"] = [
        _tutorial_boolean_trial(fn, w, learning_rate, batch, epochs, seed)[0]
        for seed, w in enumerate(widths)
    ]
    dev.synchronize(device)
    timings["tutorial"] = time.perf_counter() - start
    log(f"(a) tutorial loop: {timings['tutorial']:.1f} s for {trials} trials")

    start = time.perf_counter()
    sequential = []
    for seed, c in enumerate(candidates):
        sequential.append(train(network(c, seed), fn.task(), c.train_config(seed, None)))
    dev.synchronize(device)
    timings["sequential"] = time.perf_counter() - start
    final_losses["sequential"] = [r.final.train_loss for r in sequential]
    log(f"(b) sequential trainer: {timings['sequential']:.1f} s for {trials} trials")

    start = time.perf_counter()
    population = train_population([member(c, seed) for seed, c in enumerate(candidates)], fn)
    dev.synchronize(device)
    timings["population"] = time.perf_counter() - start
    final_losses["population"] = [r.final.train_loss for r in population]
    log(f"(c) population trainer: {timings['population']:.1f} s for {trials} trials")
    torch.set_num_threads(threads)

    rate = {k: trials / v for k, v in timings.items()}
    log(f"device: {dev.describe(device)} (1 thread on CPU); torch {torch.__version__}")
    log(
        f"{trials} trials, widths 16..256, {epochs} epochs, batch {batch}, Adam lr {learning_rate}"
    )
    for key, label in [
        ("tutorial", "(a) tutorial loop"),
        ("sequential", "(b) sequential"),
        ("population", "(c) population"),
    ]:
        log(
            f"  {label:<20} {rate[key]:8.3f} trials/s   median final running loss "
            f"{statistics.median(final_losses[key]):.3g}"
        )
    log(
        f"  (b)/(a) {rate['sequential'] / rate['tutorial']:.1f}x   "
        f"(c)/(a) {rate['population'] / rate['tutorial']:.1f}x   "
        f"(c)/(b) {rate['population'] / rate['sequential']:.1f}x"
    )
    return {
        "tutorial_trials_per_second": rate["tutorial"],
        "sequential_trials_per_second": rate["sequential"],
        "population_trials_per_second": rate["population"],
        "population_vs_tutorial": rate["population"] / rate["tutorial"],
        **{f"{k}_median_final_loss": statistics.median(v) for k, v in final_losses.items()},
    }
