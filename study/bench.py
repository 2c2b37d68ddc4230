"""Benchmarks that print ratios measured side by side in one run (never timed tests).

`trainer`: the tutorial's FashionMNIST MLP (784-512-512-10, SGD lr 1e-3, batch 64) for one
epoch, trained (a) with the tutorial's pipeline (torchvision `ToTensor` transform per sample,
`DataLoader`, its `training_loop` and `testing_loop`) and (b) with the project's trainer on
device-resident uint8 tensors. Both train on the same 60k images and evaluate on the same
10k test images; only training and evaluation are timed (data reading and a warm-up are not).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
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
    optimiser = torch.optim.SGD(net.parameters(), lr=1e-3)
    return _timed_script_epoch(net, train_dataloader, test_dataloader, optimiser, device)


def _timed_script_epoch(net, train_loader, test_loader, optimiser, device) -> tuple[float, float]:
    """One epoch of the tutorial's own training loop and its test pass, timed: the plain
    `DataLoader` + `nn.Module` side of the trainer and CNN benchmarks."""
    loss_fn = nn.CrossEntropyLoss()
    dev.synchronize(device)
    start = time.perf_counter()
    net.train()
    tutorial_training_loop(train_loader, net, loss_fn, optimiser, device)
    accuracy = tutorial_testing_loop(test_loader, net, device)
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
# The CNN epoch: a plain PyTorch script against the project's trainer, on the same network

CNN_BASELINE = {
    "type": "cnn",
    "blocks": [
        {"channels": 32, "kernel_size": 3, "batch_norm": True, "pool": "max"},
        {"channels": 64, "kernel_size": 3, "batch_norm": True, "pool": "max"},
    ],
    "head_width": 128,
    "dropout": 0.3,
}
"""The fashion-cnn study's baseline network (its first trial)."""


def _cnn_config(**changes) -> TrainConfig:
    """The baseline's training: AdamW lr 2e-3, weight decay 1e-4, cosine, batch 128, 1 epoch."""
    return TrainConfig(optimizer="adamw", learning_rate=2e-3, weight_decay=1e-4,
                       lr_schedule="cosine", batch_size=128, epochs=1, **changes)  # fmt: skip


def _plain_cnn_epoch(root: Path, device: torch.device, seed: int) -> tuple[float, float]:
    """One epoch as a plain script writes it: torchvision's dataset with a per-sample
    `ToTensor`, a shuffling `DataLoader`, the model in PyTorch's default memory format, fp32,
    then the test set; (seconds, test accuracy)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    from study.config import ImageCandidate

    training_data = datasets.FashionMNIST(str(root), train=True, transform=ToTensor())
    test_data = datasets.FashionMNIST(str(root), train=False, transform=ToTensor())
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(training_data, batch_size=128, shuffle=True, generator=generator)
    test_loader = DataLoader(test_data, batch_size=128)
    config = _cnn_config(seed=seed)
    with dev.seeded(seed):
        net = ImageCandidate(CNN_BASELINE, config).build((1, 28, 28), 10).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    return _timed_script_epoch(net, train_loader, test_loader, optimiser, device)


def _trainer_cnn_epoch(
    dataset, device: torch.device, seed: int, compiled: bool = False, **changes
) -> tuple[float, float]:
    """One epoch of the same network and training through the project's trainer (channels
    last, device-resident uint8 images); `changes` to the training (e.g. mixed precision);
    `compiled`: the model through `torch.compile` (its compilation timed too: a study compiles
    every trial's model anew)."""
    from study.config import ImageCandidate
    from study.image_objective import prepare_model

    config = _cnn_config(seed=seed, **changes)
    candidate = ImageCandidate(CNN_BASELINE, config)
    with dev.seeded(seed):
        net = prepare_model(candidate, dataset.image_shape, dataset.num_classes, device)
    result = train(torch.compile(net) if compiled else net, dataset.final_task(), config)
    return result.seconds, result.final.eval_accuracy


def cnn_epoch_seconds(data_dir: str | None, threads: int, **changes) -> float:
    """Seconds of one trainer epoch after a warm-up one, on `threads` threads (for the
    processes `bench_cnn` starts side by side)."""
    torch.set_num_threads(threads)
    dataset = load_image_dataset("fashion-mnist", prepare_raw_files("fashion-mnist", data_dir))
    _trainer_cnn_epoch(dataset, torch.device("cpu"), 0, **changes)
    return _trainer_cnn_epoch(dataset, torch.device("cpu"), 1, **changes)[0]


def bench_cnn(
    data_dir: Path | str | None = None,
    device_name: str = "auto",
    repeats: int = 2,
    log=print,
) -> dict[str, float]:
    """The fashion-cnn baseline network for one epoch on the 60k training images, then the 10k
    test images: (a) a plain script (DataLoader, fp32, default memory format) against the
    project's trainer (b) in fp32 and channels_last, (c) with bf16 autocast where the device
    has native bf16; interleaved, `repeats` times each, medians; warm-ups not timed. Then, on
    the CPU, whether two cores serve one process with 2 threads or two with 1 thread better."""
    device = dev.resolve_device(device_name)
    root = prepare_raw_files("fashion-mnist", data_dir)
    dataset = load_image_dataset("fashion-mnist", root, device=device)
    variants = {
        "(a) plain script, fp32": lambda seed: _plain_cnn_epoch(root, device, seed),
        "(b) trainer, fp32, channels_last": lambda seed: _trainer_cnn_epoch(
            dataset, device, seed, mixed_precision=False
        ),
        "(c) trainer, bf16 autocast, channels_last": lambda seed: _trainer_cnn_epoch(
            dataset, device, seed
        ),
        "(d) (c) with torch.compile": lambda seed: _trainer_cnn_epoch(
            dataset, device, seed, compiled=True
        ),
    }
    try:
        variants["(d) (c) with torch.compile"](0)
    except Exception as error:  # no compiler here, or a backend that cannot compile this
        log(f"torch.compile unavailable here: {type(error).__name__}: {error}"[:200])
        del variants["(d) (c) with torch.compile"]
    for run in variants.values():  # warm-up (allocator, kernels, first-touch): not timed
        run(0)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    accuracy: dict[str, float] = {}
    for repeat in range(repeats):
        for name, run in variants.items():
            taken, accuracy[name] = run(repeat + 1)
            seconds[name].append(taken)
            log(f"repeat {repeat + 1}/{repeats}: {name}: {taken:.1f} s")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    log(
        f"device: {dev.describe(device)}; torch {torch.__version__}; {torch.get_num_threads()} "
        f"threads; bf16 native: {dev.bf16_native(device.type)}"
    )
    log("fashion-cnn baseline CNN (32-64 conv, BN, head 128), AdamW, batch 128, 1 epoch on 60k "
        "+ test on 10k")  # fmt: skip
    plain = medians["(a) plain script, fp32"]
    for name, value in medians.items():
        log(f"  {name:<44} {value:6.1f} s/epoch   test accuracy {accuracy[name]:.2%}   "
            f"{plain / value:4.1f}x")  # fmt: skip
    ratios = {f"seconds[{k}]": v for k, v in medians.items()}
    if device.type == "cpu" and (os.cpu_count() or 1) >= 2:
        ratios.update(_threads_or_processes(data_dir, log))
    return ratios


def _threads_or_processes(data_dir, log) -> dict[str, float]:
    """Epochs per minute on two cores: one process with 2 threads against two processes with
    one thread each, side by side (each after its own warm-up)."""
    code = (
        "import sys; from study.bench import cnn_epoch_seconds; "
        "print(cnn_epoch_seconds(sys.argv[1] or None, int(sys.argv[2])))"
    )

    def epochs(threads: int, processes: int) -> float:
        command = [sys.executable, "-c", code, str(data_dir or ""), str(threads)]
        running = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                   for _ in range(processes)]  # fmt: skip
        taken = [float(p.communicate()[0].strip().splitlines()[-1]) for p in running]
        return sum(60.0 / t for t in taken)

    one, two = epochs(2, 1), epochs(1, 2)
    log(f"  two cores: one process with 2 threads {one:.2f} epochs/min; two processes with 1 "
        f"thread each {two:.2f} epochs/min in all ({two / one:.2f}x)")  # fmt: skip
    return {"epochs_per_minute[1 process x 2 threads]": one,
            "epochs_per_minute[2 processes x 1 thread]": two}  # fmt: skip


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


def _boolean_setup(device_name: str):
    """The device, f and the caller's thread count of a Boolean benchmark; from here on torch
    runs on one thread (the caller restores the count)."""
    from study.data import boolean_function

    device = dev.resolve_device(device_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return device, boolean_function(8, 0, device=device), threads


def _population_variants(device: torch.device, threads: int) -> list[tuple[str, str, int]]:
    """(label, engine, threads) of the population runs a benchmark times side by side."""
    from study import native

    if device.type != "cpu":
        return [("torch engine", "torch", 1)]
    variants = []
    if native.load() is not None:
        variants.append(("native kernel, 1 thread", "native", 1))
        if threads > 1:
            variants.append((f"native kernel, {threads} threads", "native", threads))
    variants.append(("torch engine, 1 thread", "torch", 1))
    return variants


def _timed(device: torch.device, work):
    """(seconds, what `work()` returned), the device synchronised on both sides."""
    dev.synchronize(device)
    start = time.perf_counter()
    value = work()
    dev.synchronize(device)
    return time.perf_counter() - start, value


def _no_early_stop(c, seed: int):
    """A population member that trains all its epochs, as the tutorial does."""
    from study.population import Member

    return Member(c.hidden_layer_profile, c.train_config(seed, None))


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
    `epochs`, as the tutorial does). (a) and (b) run on one thread; (c), the population, runs
    with each of its engines: the native kernel on one thread and on every core, and the
    torch engine on one thread (on CUDA: the torch engine with CUDA graphs).
    """
    from study.config import BooleanCandidate
    from study.models import build_boolean_net
    from study.population import train_population

    device, fn, threads = _boolean_setup(device_name)
    widths = [round(16 * 16 ** (i / max(1, trials - 1))) for i in range(trials)]
    candidates = [BooleanCandidate((w,), learning_rate, batch, epochs) for w in widths]
    variants = _population_variants(device, os.cpu_count() or 1)

    def sequential(c: BooleanCandidate, seed: int):
        net = build_boolean_net(c.hidden_layer_profile, fn.input_bits, fn.output_bits, seed)
        return train(net, fn.task(), c.train_config(seed, None))

    # warm-up, not timed: one short run through each path (and the kernel's build)
    warm = BooleanCandidate((16,), learning_rate, batch, 2)
    _tutorial_boolean_trial(fn, 16, learning_rate, batch, 2, 0)
    sequential(warm, 0)
    for _, engine, n in variants:
        train_population([_no_early_stop(warm, 0)], fn, engine=engine, threads=n)

    timings: dict[str, float] = {}
    final_losses: dict[str, list[float]] = {}
    timings["tutorial"], results = _timed(device, lambda: [
        _tutorial_boolean_trial(fn, w, learning_rate, batch, epochs, seed)
        for seed, w in enumerate(widths)
    ])  # fmt: skip
    final_losses["tutorial"] = [least for least, _ in results]
    log(f"(a) tutorial loop: {timings['tutorial']:.1f} s for {trials} trials")
    timings["sequential"], results = _timed(
        device, lambda: [sequential(c, seed) for seed, c in enumerate(candidates)]
    )
    final_losses["sequential"] = [r.final.train_loss for r in results]
    log(f"(b) sequential trainer: {timings['sequential']:.1f} s for {trials} trials")
    members = [_no_early_stop(c, seed) for seed, c in enumerate(candidates)]
    for label, engine, n in variants:
        timings[label], results = _timed(
            device, lambda e=engine, n=n: train_population(members, fn, engine=e, threads=n)
        )
        final_losses[label] = [r.final.train_loss for r in results]
        log(f"(c) population, {label}: {timings[label]:.1f} s for {trials} trials")
    torch.set_num_threads(threads)
    workload = (
        f"{trials} trials, widths 16..256, {epochs} epochs, batch {batch}, Adam lr {learning_rate}"
    )
    populations = [label for label, _, _ in variants]
    return _boolean_ratios(device, workload, timings, final_losses, populations, log)


def _boolean_ratios(device, workload, timings, final_losses, populations, log) -> dict:
    """Print (and return) trials per second and the ratios of `bench_boolean`."""
    trials = len(final_losses["tutorial"])
    rate = {k: trials / v for k, v in timings.items()}
    log(f"device: {dev.describe(device)} ({os.cpu_count() or 1} cores); torch {torch.__version__}")
    log(workload)
    for key in timings:
        label = {"tutorial": "(a) tutorial loop", "sequential": "(b) sequential"}.get(
            key, f"(c) {key}"
        )
        log(
            f"  {label:<36} {rate[key]:8.3f} trials/s   median final running loss "
            f"{statistics.median(final_losses[key]):.3g}"
        )
    log(f"  (b)/(a) {rate['sequential'] / rate['tutorial']:.1f}x")
    for label in populations:
        log(
            f"  (c)/(a) {rate[label] / rate['tutorial']:6.1f}x   (c)/(b) "
            f"{rate[label] / rate['sequential']:6.1f}x   population: {label}"
        )
    best = populations[0]
    return {
        "tutorial_trials_per_second": rate["tutorial"],
        "sequential_trials_per_second": rate["sequential"],
        "population_trials_per_second": rate[best],
        "population_vs_tutorial": rate[best] / rate["tutorial"],
        "tutorial_median_final_loss": statistics.median(final_losses["tutorial"]),
        "sequential_median_final_loss": statistics.median(final_losses["sequential"]),
        "population_median_final_loss": statistics.median(final_losses[best]),
        **{f"seconds[{k}]": v for k, v in timings.items()},
    }


def _peak_resident_bytes() -> int | None:
    """This process's peak resident memory (Linux VmHWM), or None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bench_long(
    members: int = 64,
    epochs: int = 4000,
    batch: int = 8,
    learning_rate: float = 3e-3,
    sequential_members: int = 2,
    device_name: str = "auto",
    log=print,
) -> dict[str, float]:
    """The long-budget workload: `members` networks of widths 48..96 for `epochs` epochs
    (no early stop), as member-epochs per second of the sequential trainer (measured on
    `sequential_members` of them) and of the population, side by side in one run; then the
    memory a population needs per 1,000 members."""
    from study.config import BooleanCandidate
    from study.models import build_boolean_net
    from study.population import train_population

    device, fn, threads = _boolean_setup(device_name)
    cores = os.cpu_count() or 1
    widths = [round(48 + 48 * i / max(1, members - 1)) for i in range(members)]
    candidates = [BooleanCandidate((w,), learning_rate, batch, epochs) for w in widths]
    population = [_no_early_stop(c, seed) for seed, c in enumerate(candidates)]
    variants = _population_variants(device, cores)
    for _, engine, n in variants:  # warm-up and build, not timed
        train_population(population[:1], fn, engine=engine, threads=n)

    def sequential() -> None:
        for seed, c in enumerate(candidates[:sequential_members]):
            net = build_boolean_net(c.hidden_layer_profile, fn.input_bits, fn.output_bits, seed)
            train(net, fn.task(), c.train_config(seed, None))

    rates = {"sequential": sequential_members * epochs / _timed(device, sequential)[0]}
    log(
        f"(b) sequential trainer: {rates['sequential']:.0f} member-epochs/s "
        f"({sequential_members} members x {epochs} epochs)"
    )
    for label, engine, n in variants:
        seconds, _ = _timed(
            device, lambda e=engine, n=n: train_population(population, fn, engine=e, threads=n)
        )
        rates[label] = members * epochs / seconds
        log(
            f"(c) population, {label}: {rates[label]:.0f} member-epochs/s "
            f"({members} members x {epochs} epochs)"
        )
    torch.set_num_threads(threads)
    log(f"device: {dev.describe(device)} ({cores} cores); torch {torch.__version__}")
    log(
        f"{members} members, widths 48..96, batch {batch}, Adam lr {learning_rate}, "
        f"{epochs} epochs, no early stop"
    )
    return _long_ratios(device, rates, variants, batch, learning_rate, log)


def _long_ratios(device, rates: dict[str, float], variants, batch, learning_rate, log) -> dict:
    """Print (and return) the ratios of `bench_long`, and the memory per 1,000 members."""
    for label, _, _ in variants:
        log(
            f"  population / sequential per member-epoch: "
            f"{rates[label] / rates['sequential']:6.1f}x   ({label})"
        )
    memory = _memory_per_thousand(device, variants[0][1], batch, learning_rate)
    log(
        f"  memory per 1,000 members (widths 48..96): {memory / 2**20:.1f} MiB of training "
        "state, plus 16 bytes per member and epoch of history (64 MiB per 1,000 members at "
        "4,000 epochs)"
    )
    return {
        **{f"member_epochs_per_second[{k}]": v for k, v in rates.items()},
        "bytes_per_thousand_members": memory,
    }


def _memory_per_thousand(device: torch.device, engine: str, batch: int, lr: float) -> float:
    """Peak memory added by training 1,000 members for 10 epochs: device memory on CUDA,
    peak resident memory on the CPU (measured in a fresh process, so that nothing else in
    this one counts)."""
    if device.type == "cuda":
        from study.config import BooleanCandidate
        from study.data import boolean_function
        from study.population import Member, train_population

        fn = boolean_function(8, 0, device=device)
        members = [
            Member(
                (48 + 48 * i // 999,), BooleanCandidate((48,), lr, batch, 10).train_config(i, None)
            )
            for i in range(1000)
        ]
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_population(members, fn, engine=engine)
        return float(torch.cuda.max_memory_allocated(device) - before)
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from study.bench import _peak_resident_bytes\n"
        "from study.config import BooleanCandidate\n"
        "from study.data import boolean_function\n"
        "from study.population import Member, train_population\n"
        "fn = boolean_function(8, 0)\n"
        f"members = [Member((48 + 48 * i // 999,), BooleanCandidate((48,), {lr}, {batch}, 10)"
        ".train_config(i, None)) for i in range(1000)]\n"
        "base = _peak_resident_bytes()\n"
        f"train_population(members[:1], fn, engine={engine!r})\n"
        "base = _peak_resident_bytes()\n"
        f"train_population(members, fn, engine={engine!r})\n"
        "print(_peak_resident_bytes() - base)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return float("nan")
    return float(done.stdout.strip().splitlines()[-1])


def bench_step(
    members: int = 32, width: int = 100, batch: int = 4, device_name: str = "cpu", log=print
) -> dict[str, float]:
    """The candidates for a faster population step, side by side on one group of `members`
    one-hidden-layer networks of `width`, on one thread: the torch engine's eager step (the
    hand-written backward and fused Adam), the same step written as one function and compiled
    with `torch.compile` (Inductor; compile time reported apart), and the native kernel (whose
    epoch also evaluates the whole table, an upper bound on its step). Microseconds per step
    of the whole group."""
    from study import native
    from study.config import BooleanCandidate
    from study.population import Member, _Group

    device, fn, threads = _boolean_setup(device_name)
    config = BooleanCandidate((width,), 5e-3, batch, 1)
    group_members = [Member((width,), config.train_config(s, None)) for s in range(members)]
    group = _Group(group_members, list(range(members)), fn)
    n = len(fn.inputs)
    orders = torch.stack([torch.randperm(n, generator=g) for g in group.generators]).to(device)
    x, y = fn.inputs[orders], fn.targets[orders]
    slices = [(x[:, s : s + batch], y[:, s : s + batch]) for s in range(0, n, batch)]

    def timed(step, repeats: int = 5) -> float:
        for xs, ys in slices:  # warm-up
            step(xs, ys)
        seconds, _ = _timed(device, lambda: [step(xs, ys) for _ in range(repeats)
                                             for xs, ys in slices])  # fmt: skip
        return seconds / (repeats * len(slices)) * 1e6

    results = {"eager": timed(group.train_step)}
    log(f"torch engine, eager step:     {results['eager']:8.1f} us/step")
    compiled_step, compile_seconds = _compiled_step(group, slices[0])
    results["compiled"] = timed(compiled_step)
    log(
        f"torch.compile (Inductor):     {results['compiled']:8.1f} us/step "
        f"(compiling took {compile_seconds:.0f} s)"
    )
    if device.type == "cpu" and native.load() is not None:
        results["native"] = _native_step(fn, members, width, batch, len(slices))
        log(f"native kernel (with eval):    {results['native']:8.1f} us/step")
    torch.set_num_threads(threads)
    log(
        f"{members} members of width {width}, batch {batch}, one thread, "
        f"{dev.describe(device)}; torch {torch.__version__}"
    )
    return results


def _functional_step(xs, ys, w1, b1, w2, b2, moments, count, lr):
    """One population step of one-hidden-layer members as a single function (for
    `torch.compile`): forward, the written-out backward, Adam."""
    from torch.nn import functional as F

    z = torch.baddbmm(b1, xs, w1)
    h = z.clamp_min(0)
    logits = torch.baddbmm(b2, h, w2)
    loss = F.binary_cross_entropy_with_logits(logits, ys, reduction="none").mean(dim=(1, 2))
    g2 = (torch.sigmoid(logits) - ys) / (ys.shape[1] * ys.shape[2])
    g1 = torch.where(z > 0, torch.bmm(g2, w2.transpose(1, 2)), 0.0)
    grads = (
        torch.bmm(xs.transpose(1, 2), g1),
        g1.sum(dim=1, keepdim=True),
        torch.bmm(h.transpose(1, 2), g2),
        g2.sum(dim=1, keepdim=True),
    )
    count += 1
    for p, gr, (m, v) in zip((w1, b1, w2, b2), grads, moments, strict=True):
        m.lerp_(gr, 0.1)
        v.mul_(0.999).addcmul_(gr, gr, value=0.001)
        p.sub_(lr * (m / (1 - 0.9**count)) / ((v / (1 - 0.999**count)).sqrt() + 1e-8))
    return loss


def _compiled_step(group, first: tuple[torch.Tensor, torch.Tensor]):
    """`_functional_step` compiled on copies of the group's parameters: (step, compile
    seconds), the first call (which compiles) timed apart."""
    (w1, b1), (w2, b2) = ((w.clone(), b.clone()) for w, b in group.layers())
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in (w1, b1, w2, b2)]
    lr = group.lr.clone().view(-1, 1, 1)
    count = torch.zeros((), device=lr.device)
    compiled = torch.compile(_functional_step, dynamic=False)
    start = time.perf_counter()
    compiled(*first, w1, b1, w2, b2, moments, count, lr)
    compile_seconds = time.perf_counter() - start

    def step(xs, ys):
        return compiled(xs, ys, w1, b1, w2, b2, moments, count, lr)

    return step, compile_seconds


def _native_step(fn, members: int, width: int, batch: int, steps_per_epoch: int) -> float:
    """Microseconds per step of the native kernel on one thread (its epochs include the
    evaluation of the whole table)."""
    from study.config import BooleanCandidate
    from study.population import train_population

    epochs = 5
    candidate = BooleanCandidate((width,), 5e-3, batch, epochs)
    population = [_no_early_stop(candidate, s) for s in range(members)]
    train_population(population[:1], fn, engine="native")  # warm-up
    seconds, _ = _timed(
        torch.device("cpu"), lambda: train_population(population, fn, engine="native", threads=1)
    )
    return seconds / (epochs * steps_per_epoch) * 1e6


def bench_pruners(
    minutes: float = 15.0,
    repeats: int = 2,
    pruners: tuple[str, ...] = ("median", "hyperband"),
    data_dir: Path | str | None = None,
    log=print,
    study: str = "fashion-mlp",
) -> dict[str, list[float]]:
    """An image study under the same time budget with each pruner, side by side: in each
    repetition the pruners' studies run at the same time (one process and one thread each,
    same sampler seed), on fresh stores; prints the best validation accuracy each reached."""
    best: dict[str, list[float]] = {p: [] for p in pruners}
    searched: dict[str, list[float]] = {p: [] for p in pruners}
    trials: dict[str, list[int]] = {p: [] for p in pruners}
    for repeat in range(repeats):
        for pruner, (top, found, finished, pruned) in _pruners_side_by_side(
            study, pruners, repeat, minutes, data_dir
        ).items():
            best[pruner].append(top)
            searched[pruner].append(found)
            trials[pruner].append(finished)
            log(
                f"repeat {repeat + 1}/{repeats}, {pruner}: best validation accuracy "
                f"{top:.4f} (searched trials only: {found:.4f}) after {finished} trials "
                f"({pruned} pruned)"
            )
    log(
        f"{study}, {minutes:g} minutes per study, sampler seeds 0..{repeats - 1}, one "
        "thread each, the pruners side by side"
    )
    for pruner in pruners:
        log(
            f"  {pruner:<20} best validation accuracy {statistics.mean(best[pruner]):.4f} "
            f"(runs: {', '.join(f'{v:.4f}' for v in best[pruner])}); searched trials only "
            f"{statistics.mean(searched[pruner]):.4f} "
            f"(runs: {', '.join(f'{v:.4f}' for v in searched[pruner])}); trials: "
            f"{', '.join(map(str, trials[pruner]))}"
        )
    ranked = sorted(
        pruners,
        key=lambda p: (statistics.mean(best[p]), _nan_low(statistics.mean(searched[p]))),
        reverse=True,
    )
    log(f"  better: {ranked[0]} (best accuracy, then searched trials only)")
    return best


def _pruners_side_by_side(
    study: str, pruners: tuple[str, ...], repeat: int, minutes: float, data_dir
) -> dict[str, tuple[float, float, int, int]]:
    """One repetition: the study once per pruner, all at once on fresh stores; per pruner
    (best accuracy, best of the searched trials, finished trials, pruned trials)."""
    import tempfile

    import optuna

    outcome = {}
    with tempfile.TemporaryDirectory() as tmp:
        processes = {}
        for pruner in pruners:
            command = [sys.executable, "-m", "study.cli", "run", study, "--trials", "1000",
                       "--storage", f"sqlite:///{tmp}/{pruner}.db", "--pruner", pruner,
                       "--sampler-seed", str(repeat), "--timeout", str(minutes * 60), "--quiet",
                       "--fidelity", "fixed",
                       "--device", "cpu"]  # fmt: skip
            command += ["--data-dir", str(data_dir)] if data_dir else []
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            processes[pruner] = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        for pruner, process in processes.items():
            _, err = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"{pruner}: {err.strip().splitlines()[-1]}")
            stored = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp}/{pruner}.db")
            finished = [t for t in stored.trials if t.state.name in ("COMPLETE", "PRUNED")]
            complete = [t for t in finished if t.state.name == "COMPLETE"]
            # the study's first trial is its space's known-good baseline (the same in every
            # run): what the pruner changes is what the search finds besides it
            found = [t.value for t in complete if not t.user_attrs.get("baseline")]
            outcome[pruner] = (
                max((t.value for t in complete), default=float("nan")),
                max(found, default=float("nan")),
                len(finished),
                sum(t.state.name == "PRUNED" for t in finished),
            )
    return outcome


def _nan_low(value: float) -> float:
    return -1.0 if value != value else value  # NaN (nothing besides the baseline): last


def bench_claims(trials: int = 2000, storage: str | None = None, log=print) -> dict[str, float]:
    """Claiming `trials` trials and reaping them once their process is dead, one Optuna call
    per trial against `CHUNK` trials per transaction, on the same kind of store in one run
    (a fresh SQLite file each, or studies on the given `storage`); prints both and the ratio."""
    import socket
    import tempfile
    import uuid

    import optuna

    from study import claims
    from study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ended = subprocess.Popen(["true"])
    ended.wait()  # a process of this machine that has ended: its trials are reaped at once
    dead = {"host": socket.gethostname(), "pid": ended.pid, "started": "0"}
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        seconds: dict[tuple[str, str], float] = {}
        for way in ("one call per trial", "chunked"):
            url = storage or f"sqlite:///{tmp}/{way.replace(' ', '-')}.db"
            name = f"bench-claims-{uuid.uuid4().hex[:8]}"
            study = optuna.create_study(study_name=name, storage=open_storage(url, create=True))
            batched = way == "chunked"
            started = time.perf_counter()
            asked = claims.claim(study, trials, owner=dead, batched=batched)
            seconds[way, "claim"] = time.perf_counter() - started
            asked[0].suggest_int("x", 0, 9)  # one with parameters: the reap re-queues it
            started = time.perf_counter()
            reaped = claims.reap(study, batched=batched)
            seconds[way, "reap"] = time.perf_counter() - started
            if reaped != trials:
                raise RuntimeError(f"{way}: reaped {reaped} of {trials} trials")
            if storage:
                optuna.delete_study(study_name=name, storage=url)
            log(
                f"{way}: claim {trials} trials {seconds[way, 'claim']:.2f} s, reap them "
                f"{seconds[way, 'reap']:.2f} s"
            )
    for step in ("claim", "reap"):
        ratios[step] = seconds["one call per trial", step] / seconds["chunked", step]
        log(f"{step}: chunked is {ratios[step]:.1f}x faster than one call per trial")
    return ratios
