"""Benchmarks that print ratios measured side by side in one run (never timed tests).

`trainer`: the tutorial's FashionMNIST MLP (784-512-512-10, SGD lr 1e-3, batch 64) for one
epoch, trained (a) with the tutorial's pipeline (torchvision `ToTensor` transform per sample,
`DataLoader`, its `training_loop` and `testing_loop`) and (b) with the project's trainer on
device-resident uint8 tensors. Both train on the same 60k images and evaluate on the same
10k test images; only training and evaluation are timed (data reading and a warm-up are not).

Also `cnn` (the fashion-cnn baseline's epoch: a plain script against the trainer), `pruners`
(pruners side by side under one budget) and `claims` (claiming and reaping trials); the
Boolean benches are in `study.bench_population`, the search hour in `study.bench_hour`.
"""

from __future__ import annotations

import contextlib
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
    compiled: bool = True,
) -> dict[str, float]:
    """The fashion-cnn baseline network for one epoch on the 60k training images, then the 10k
    test images: (a) a plain script (DataLoader, fp32, default memory format) against the
    project's trainer (b) in fp32 and channels_last, (c) with bf16 autocast where the device
    has native bf16, (d) (c) through `torch.compile` (unless `compiled` is False: compiling
    takes most of a small run); interleaved, `repeats` times each, medians; warm-ups not timed.
    Then, on the CPU, whether two cores serve one process with 2 threads or two with 1 thread
    better."""
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
        if not compiled:
            raise RuntimeError("left out (compiled=False)")
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


def bench_claims(
    trials: int = 2000, storage: str | None = None, log=print, stop: bool = True
) -> dict[str, float]:
    """Claiming `trials` trials and reaping them once their process is dead, one Optuna call
    per trial against `CHUNK` trials per transaction, on the same kind of store in one run
    (a fresh SQLite file each, or studies on the given `storage`); prints both and the ratio.
    With `stop`, then: how long `study run` takes to end after a SIGTERM in the middle of
    claiming a population of 20,000 (`stop_seconds`; the target is two seconds)."""
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
    if stop:
        ratios["stop_seconds"] = _stop_mid_claim(log)
    return ratios


def _stop_mid_claim(log, population: int = 20_000, after: int = 4096) -> float:
    """Seconds from a SIGTERM, sent once `after` trials of a `population` are claimed, to the
    end of the `study run` process; and what it left (every claimed trial failed)."""
    import signal
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "stop.db"
        size = str(population)
        command = [sys.executable, "-m", "study.cli", "run", "boolean-shallow", "--storage",
                   f"sqlite:///{db}", "--trials", size, "--population", size, "--input-bits",
                   "3", "--output-bits", "3", "--quiet"]  # fmt: skip
        process = subprocess.Popen(command, stderr=subprocess.DEVNULL)

        def states() -> dict[str, int]:
            try:
                with contextlib.closing(sqlite3.connect(db)) as connection:
                    rows = connection.execute("SELECT state, count(*) FROM trials GROUP BY state")
                    return dict(rows.fetchall())
            except sqlite3.OperationalError:  # not made yet
                return {}

        while sum(states().values()) < after:
            if process.poll() is not None:
                raise RuntimeError(f"study run ended (status {process.returncode}) unsignalled")
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        sent = time.perf_counter()
        process.wait()
        taken = time.perf_counter() - sent
        left = states()
    log(f"SIGTERM while claiming a population of {population:,}: the command ended "
        f"{taken:.2f} s after it (status {process.returncode}); trials left: {left}")  # fmt: skip
    return taken
