"""`study bench hour`: the search hour against the baseline trained for the same hour.

One run, on one machine, one step after the other (nothing else should run beside it):

1. **the search hour**: `study run SPACE --timeout 3600 --workers 2 --export` as a user types
   it (a subprocess, timed from its start to its end: study, export and start-up), on a study of
   its own in the bench store (`hour-<precision>-s<sampler seed>-<minutes>m`);
2. two more training seeds of the exported configuration (after the hour), so that its test
   accuracy is a mean over three seeds;
3. **the baseline hour**: the space's baseline trained on all training images for as many
   epochs as fit in the same budget, three seeds, each tested once. What an epoch costs is
   timed on the machine of the run, alone, at all threads, just before the search hour and
   again after the export's seeds (a shared host's speed drifts: this machine's epoch went
   from 11.6 s to 21 s within one day); the epochs are the budget over the mean of the two,
   and a run whose two timings differ by more than `MAX_DRIFT` is marked unsteady. A baseline
   hour is shared by the runs of one CPU and precision whose epochs are within 5% of it. Once
   the epochs are fixed, `--baseline-jobs 2` trains two seeds at a time (one thread each):
   the epochs and seeds trained do not depend on it, only the wall time, which the record
   states.

Each finished step is written to `OUT/hour-cpu.json` at once (one object per run) and a
baseline seed to `OUT/hour-baseline-cpu.json` as it ends, so that a stopped bench goes on where
it stopped; an hour that was cut short is never resumed (its study must be deleted to run it
again). `OUT/hour-cpu.md` is the table of every run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from study.errors import ConfigError, StudyError
from study.studies import stored_attrs

RUNS_FILE, BASELINES_FILE, TABLE_FILE = "hour-cpu.json", "hour-baseline-cpu.json", "hour-cpu.md"
SEEDS = 3
TARGET_TEST_ACCURACY = 0.935
TARGET_GAIN_POINTS = 0.3
MAX_DRIFT = 1.15
"""The baseline's epoch timed before and after a run may differ by this factor at most for the
run to count: the machine's speed drifted more (a shared host), so the hours do not compare."""
SHARE_EPOCHS = 0.05
"""A baseline hour trained for E epochs serves a run that fits E' epochs when |E - E'| <= 5%."""


def cpu_description() -> dict[str, Any]:
    """The CPU model and the flags that decide an epoch's cost (bf16, AVX-512, AVX2)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    shown = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return {"cpu": model, "cpu_flags": shown, "cores": os.cpu_count()}


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: not JSON; move it away to start the bench afresh") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: not a list of runs; move it away to start afresh")
    return data


def _write(path: Path, rows: list[dict]) -> None:
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(rows, indent=2) + "\n")
    scratch.replace(path)


def _keyed(rows: list[dict], key: dict) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def _save(path: Path, rows: list[dict], row: dict) -> None:
    if row not in rows:
        rows.append(row)
    _write(path, rows)


def bench_hour(
    storage: str,
    out: Path,
    space: str = "fashion-cnn",
    precision: str = "auto",
    sampler_seed: int = 0,
    minutes: float = 60.0,
    workers: int = 2,
    data_dir: str | None = None,
    log=print,
    baseline_jobs: int = 1,
    settings: dict[str, Any] | None = None,
) -> dict:
    """Run (or go on with) one bench run; returns its record. `settings` override the space's
    fixed settings (small data in tests); `baseline_jobs` baseline seeds train at a time."""
    from study import device as dev
    from study.export import export_model

    dev.set_precision(precision)
    out.mkdir(parents=True, exist_ok=True)
    runs_path, baselines_path = out / RUNS_FILE, out / BASELINES_FILE
    runs, baselines = _read(runs_path), _read(baselines_path)
    machine = cpu_description()
    used = dev.precision_name(dev.resolve_device("cpu"))
    study_name = f"hour-{used}-s{sampler_seed}-{minutes:g}m"
    key = {"study": space, "cpu": machine["cpu"], "precision": used,
           "sampler_seed": sampler_seed, "minutes": minutes}  # fmt: skip
    run = _keyed(runs, key) or {**key, "study_name": study_name, "storage": storage}
    run.update(machine)
    if "study_seconds" not in run:
        _check_fresh(study_name, storage)
        run["baseline_epoch_seconds"] = [_time_epoch(space, data_dir, settings)]
        log(f"{study_name}: the baseline's epoch before the hour: "
            f"{run['baseline_epoch_seconds'][0]:.1f} s")  # fmt: skip
        _search_hour(run, space, storage, out, precision, workers, data_dir, log, settings)
        _save(runs_path, runs, run)
    if len(run.get("test_accuracy_seeds", [])) < SEEDS:
        log(f"{study_name}: {SEEDS} training seeds of the exported configuration")
        done = export_model(study_name, storage, out / study_name, "cpu", data_dir,
                            seeds=SEEDS, log=log)  # fmt: skip
        run["test_accuracy_seeds"] = list(done.test_accuracy_seeds)
        run["test_accuracy_mean"] = statistics.mean(done.test_accuracy_seeds)
        _save(runs_path, runs, run)
    timed = run.setdefault("baseline_epoch_seconds", [])
    if len(timed) < run.get("epoch_timings", 2):  # and after the hour: the speed may drift
        timed.append(_time_epoch(space, data_dir, settings))
        log(f"{study_name}: the baseline's epoch after the hour: {timed[-1]:.1f} s")
        _save(runs_path, runs, run)
    run["machine_drift"] = round(max(timed) / min(timed), 3)
    epochs = max(1, math.floor(minutes * 60 / statistics.mean(timed)))
    run["baseline_hour_epochs_fitting"] = epochs
    base_key = {k: key[k] for k in ("study", "cpu", "precision", "minutes")}
    base = _near(baselines, base_key, epochs)
    if base is None:
        base = {**base_key, "epochs": epochs, "seeds": [], "test_accuracy_seeds": []}
    if len(base["seeds"]) < SEEDS:
        _baseline_hour(base, space, data_dir, log, settings, baseline_jobs,
                       lambda: _save(baselines_path, baselines, base))  # fmt: skip
    run["baseline_hour_epochs"] = base["epochs"]
    run["baseline_hour_seconds_per_seed"] = base["seconds_per_seed"]
    run["baseline_hour_seed_jobs"] = base.get("seed_jobs", 1)
    run["baseline_hour_test_accuracy_seeds"] = base["test_accuracy_seeds"]
    run["baseline_hour_test_accuracy_mean"] = statistics.mean(base["test_accuracy_seeds"])
    gain = 100 * (run["test_accuracy_mean"] - run["baseline_hour_test_accuracy_mean"])
    run["gain_points"] = round(gain, 3)
    run["targets_met"] = {
        "test_accuracy_at_least_93.5": run["test_accuracy_mean"] >= TARGET_TEST_ACCURACY,
        "best_is_not_the_baseline": not run["best_is_baseline"],
        "beats_the_baseline_hour_by_0.3_points": gain >= TARGET_GAIN_POINTS,
        "within_the_hour": run["command_seconds"] <= minutes * 60,
        "steady_machine": run["machine_drift"] <= MAX_DRIFT,
    }
    _save(runs_path, runs, run)
    (out / TABLE_FILE).write_text(table(runs))
    return run


def _check_fresh(name: str, storage: str) -> None:
    """An hour's study must not exist before the hour: an hour is never resumed."""
    from study.storage import existing_store, study_names

    store = existing_store(storage, heartbeat=False)
    if store is not None and name in study_names(store):
        raise ConfigError(
            f"study {name!r} in {storage} is from an hour that did not finish: an hour is not "
            f"resumed; `study delete {name} --storage {storage}` to run it again"
        )


def _search_hour(run, space, storage, out, precision, workers, data_dir, log, settings) -> None:
    """The user's command, timed as a whole; then what the study and its export recorded."""
    import optuna

    from study.storage import open_storage
    from study.studies import baseline_trial, best_feasible

    name, minutes = run["study_name"], run["minutes"]
    command = [sys.executable, "-m", "study.cli", "run", space, "--trials", "1000",
               "--timeout", f"{minutes * 60:g}", "--workers", str(workers), "--sampler-seed",
               str(run["sampler_seed"]), "--precision", precision, "--export", "--export-dir",
               str(out / name), "--study-name", name, "--storage", storage, "--device", "cpu",
               "--quiet"]  # fmt: skip
    command += ["--data-dir", data_dir] if data_dir else []
    for key, value in (settings or {}).items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    log(f"{name}: the search hour: {' '.join(command[3:])}")
    started = time.time()
    if subprocess.run(command, check=False).returncode != 0:
        raise StudyError(f"{name}: the search hour's command failed (its message is above)")
    run["command_seconds"] = round(time.time() - started, 1)
    metrics = json.loads((out / name / "metrics.json").read_text())
    study = optuna.load_study(study_name=name, storage=open_storage(storage, heartbeat=False))
    best, base = best_feasible(study), baseline_trial(study)
    states = [t.state.name for t in study.trials]
    plans = stored_attrs(study).get("plans") or [{}]
    run.update({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "study_seconds": metrics["study_seconds"],
        "export_seconds": metrics["export_seconds"],
        "trials": {s: states.count(s) for s in sorted(set(states))},
        "rungs": plans[0].get("rungs"),
        "plan": plans[0].get("why"),
        "best_trial": best.number,
        "best_epochs": best.user_attrs["config"]["train"]["epochs"],
        "best_validation_accuracy": best.value,
        "best_is_baseline": bool(best.user_attrs.get("baseline")),
        "baseline_validation_accuracy": base.value if base is not None else None,
        "test_accuracy_seeds": [metrics["test_accuracy"]],
        "commit": _commit(),
    })  # fmt: skip


def _baseline_hour(base: dict, space_name: str, data_dir, log, overrides, jobs: int,
                   save) -> None:  # fmt: skip
    """The baseline trained on all training images for `base["epochs"]`, `SEEDS` seeds, each
    tested once, `jobs` at a time (processes of `cores // jobs` threads each: the epochs are
    fixed by the run's timings, so only the wall time depends on it). `save` is called as each
    seed ends, so that a stopped bench keeps the seeds done."""
    from study import device as dev

    first = get_space_settings(space_name, overrides).seed
    missing = [s for s in range(first, first + SEEDS) if s not in base["seeds"]]
    jobs = max(1, min(jobs, len(missing)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    base["seed_jobs"], base["threads_per_seed"] = jobs, threads
    for seed in missing:
        log(
            f"baseline hour: seed {seed}, {base['epochs']} epochs on all training images"
            + (f" ({jobs} seeds at a time, {threads} thread(s) each)" if jobs > 1 else "")
        )
    precision = dev.precision_name(dev.resolve_device("cpu"))
    args = [(space_name, data_dir, overrides, base["epochs"], seed, threads, precision)
            for seed in missing]  # fmt: skip
    if jobs == 1:
        _record_seeds(base, map(_train_baseline_seed, args), log, save)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_train_baseline_seed, a) for a in args]
        _record_seeds(base, (f.result() for f in as_completed(futures)), log, save)


def _time_epoch(space_name: str, data_dir, overrides) -> float:
    """One whole epoch of the baseline on all training images at all threads (and its test),
    after one untimed epoch that warms the kernels: what an epoch of the baseline hour costs
    here now."""
    import torch

    from study.export import retrain

    space, settings, dataset, target = _baseline_parts(space_name, data_dir, overrides)
    torch.set_num_threads(os.cpu_count() or 1)
    one = baseline_of(space, settings).replace_epochs(1)
    retrain(one, dataset, settings.seed, target)
    return round(retrain(one, dataset, settings.seed, target).seconds, 2)


def _near(baselines: list[dict], key: dict, epochs: int) -> dict | None:
    """The baseline hour of `key` trained for about `epochs` (within `SHARE_EPOCHS`)."""
    found = [b for b in baselines if all(b.get(k) == v for k, v in key.items())
             and abs(b["epochs"] - epochs) <= SHARE_EPOCHS * epochs]  # fmt: skip
    return min(found, key=lambda b: abs(b["epochs"] - epochs), default=None)


def get_space_settings(space_name: str, overrides):
    from search_spaces import get_space

    return get_space(space_name).base_settings().replace(**(overrides or {}))


def _record_seeds(base: dict, results, log, save) -> None:
    for seed, accuracy, seconds in results:
        done = dict(zip(base["seeds"], zip(base["test_accuracy_seeds"],
                                           base.get("seconds_of_seeds", []), strict=False),
                        strict=False))  # fmt: skip
        done[seed] = (accuracy, round(seconds, 1))
        base["seeds"] = sorted(done)
        base["test_accuracy_seeds"] = [done[s][0] for s in base["seeds"]]
        base["seconds_of_seeds"] = [done[s][1] for s in base["seeds"]]
        base["seconds_per_seed"] = round(statistics.mean(base["seconds_of_seeds"]), 1)
        log(f"baseline hour: seed {seed}: test accuracy {accuracy:.4f} in {seconds:.0f} s")
        save()


def _baseline_parts(space_name: str, data_dir, settings: dict[str, Any] | None):
    from search_spaces import get_space
    from study import device as dev
    from study.data import load_image_dataset

    space = get_space(space_name)
    settings = space.base_settings().replace(**(settings or {}))
    target = dev.resolve_device("cpu")
    dataset = load_image_dataset(settings.dataset, data_dir, device=target,
                                 validation_size=settings.validation_size,
                                 split_seed=settings.split_seed)  # fmt: skip
    return space, settings, dataset, target


def baseline_of(space, settings):
    from study.image_objective import baseline_candidate

    return baseline_candidate(space, settings)


def _train_baseline_seed(job: tuple) -> tuple[int, float, float]:
    """One seed of the baseline hour (in this process or a worker process of the pool)."""
    import torch

    from study import device as dev
    from study.export import retrain

    space_name, data_dir, overrides, epochs, seed, threads, precision = job
    dev.set_precision("fp32" if precision == "fp32" else "auto")
    torch.set_num_threads(threads)
    space, settings, dataset, target = _baseline_parts(space_name, data_dir, overrides)
    done = retrain(baseline_of(space, settings).replace_epochs(epochs), dataset, seed, target)
    return seed, done.test_accuracy, done.seconds


def _commit() -> str | None:
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, timeout=10, check=False)  # fmt: skip
    except OSError:
        return None
    return found.stdout.strip() or None


def table(runs: list[dict]) -> str:
    """hour-cpu.md: one row per run, with what it was measured on."""
    lines = [
        "# The search hour against the baseline trained for the same hour",
        "",
        "Made by `study bench hour` (study/bench_hour.py); test accuracy is the mean of three "
        "training seeds, each tested once. Runs of one CPU only compare with each other.",
        "",
        "| CPU (flags) | precision | sampler seed | command s (study + export) | rungs | trials "
        "| best trial (epochs) | best is baseline | test, 3 seeds | baseline epoch s (before, "
        "after) | baseline hour: epochs, test | gain (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        seeds = ", ".join(f"{a:.4f}" for a in r.get("test_accuracy_seeds", []))
        base = ", ".join(f"{a:.4f}" for a in r.get("baseline_hour_test_accuracy_seeds", []))
        mean = r.get("test_accuracy_mean")
        base_mean = r.get("baseline_hour_test_accuracy_mean")
        lines.append(
            f"| {r.get('cpu')} ({', '.join(r.get('cpu_flags', []))}) | {r.get('precision')} "
            f"| {r.get('sampler_seed')} | {r.get('command_seconds')} ({r.get('study_seconds')} "
            f"+ {r.get('export_seconds')}) | {r.get('rungs')} | {r.get('trials')} "
            f"| {r.get('best_trial')} ({r.get('best_epochs')}) | {r.get('best_is_baseline')} "
            f"| {f'{mean:.4f}' if mean else '-'} ({seeds}) "
            f"| {', '.join(f'{t:.1f}' for t in r.get('baseline_epoch_seconds', []))} "
            f"| {r.get('baseline_hour_epochs', '-')}, "
            f"{f'{base_mean:.4f}' if base_mean else '-'} ({base}) | {r.get('gain_points', '-')} |"
        )
    return "\n".join(lines) + "\n"
