"""The Boolean benches (ratios measured side by side in one run, never timed tests).

`boolean`: the tutorial's loop against the sequential trainer against the population trainer
(native kernel on one and two threads, torch engine) on the same 32 trials; `long`: the
frontier's long-budget workload, member-epochs per second and memory per 1,000 members;
`step`: the candidates for one population step (eager, torch.compile, native kernel).
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
from study.bench import tutorial_training_loop
from study.models import DeepNeuralNet
from study.trainer import train

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
        "from study.bench_population import _peak_resident_bytes\n"
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
