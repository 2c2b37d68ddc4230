"""Run a named study to a total trial count: create or resume it, refuse conflicting settings.

`run_study("boolean-shallow", trials=20)` is the Python entry point behind `study run`;
`workers=N` runs N processes on the same storage (one per visible GPU when there are several).
Every process claims its trials through `study.claims`, so that the study ends with exactly
the requested number of finished trials, and no trial of a dead process stays RUNNING.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from search_spaces import get_space
from study import choices, claims, interrupt
from study import device as dev
from study.boolean_objective import BooleanObjective, PopulationBatch
from study.config import is_int, is_number
from study.errors import ConfigError, StudyError, TrialFailed
from study.image_objective import ImageObjective
from study.storage import (
    DEFAULT_STORAGE,
    HEARTBEAT_SECONDS,
    open_storage,
    sqlite_path,
    study_names,
)
from study.studies import (
    FINISHED,
    KIND_ATTR,
    SETTINGS_ATTR,
    SPACE_ATTR,
    best_feasible,
    bind,
    describe,
    finished_trials,
)

__all__ = ["FINISHED", "best_feasible", "finished_trials", "run_study", "study_settings"]

# heartbeat, retry and grouped TPE are marked experimental; they are used on purpose
warnings.filterwarnings("ignore", category=ExperimentalWarning)

MAX_POPULATION = 65_536
"""Most trials one population may ask at once (each is r networks in memory)."""
MAX_TRIALS = 1_000_000
WORKER_MEMORY_BYTES = 1_500_000_000
"""What one worker process may need (torch, a dataset on the device, its models): bounds
--workers by this machine's memory."""
POLL_SECONDS = 1.0


def max_workers() -> int:
    """Worker processes this machine can hold: 4 per core, and no more than its memory allows."""
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 4 * cores * WORKER_MEMORY_BYTES
    return max(1, min(4 * cores, memory // WORKER_MEMORY_BYTES))


def study_settings(name: str, overrides: Mapping[str, Any] | None = None):
    """A study's base settings with the given (non-None) overrides applied and validated."""
    space = get_space(name)
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    return space.base_settings().replace(**changes) if changes else space.base_settings()


def default_study_name(name: str, settings: Mapping[str, Any] | None = None) -> str:
    """`name`, except that an image space run on MNIST is stored as mnist-* by default."""
    dataset = (settings or {}).get("dataset")
    if dataset == "mnist" and name.startswith("fashion-"):
        return "mnist-" + name.removeprefix("fashion-")
    return name


def _check_arguments(
    trials: Any, population: Any, workers: Any, sampler_seed: Any, study_name: Any
) -> None:
    """The run's own arguments, bounded before anything is opened or written."""
    if not is_int(trials) or not 1 <= trials <= MAX_TRIALS:
        raise ConfigError(f"trials: must be an integer from 1 to {MAX_TRIALS}, got {trials!r}")
    if population is not None and not (is_int(population) and 1 <= population <= MAX_POPULATION):
        raise ConfigError(
            f"population: must be an integer from 1 to {MAX_POPULATION}, got {population!r}"
        )
    limit = max_workers()
    if not is_int(workers) or not 1 <= workers <= limit:
        raise ConfigError(
            f"workers: must be an integer from 1 to {limit} on this machine "
            f"({os.cpu_count()} cores; each worker is a process with its own torch and data), "
            f"got {workers!r}"
        )
    top = 2**32 - 1 - (workers - 1)  # worker i samples with seed + i
    if sampler_seed is not None and not (is_int(sampler_seed) and 0 <= sampler_seed <= top):
        raise ConfigError(
            f"sampler_seed: must be an integer from 0 to {top}, got {sampler_seed!r}"
        )
    if study_name is not None and (
        not isinstance(study_name, str) or not study_name.strip() or len(study_name) > 500
    ):
        raise ConfigError(f"study_name: must be 1 to 500 characters, got {study_name!r}")


def _resolve_settings(space_name: str, study_name: str, storage: str, overrides: dict, run: dict):
    """The settings and the run choices (sampler, pruner) to run with: the stored ones for an
    existing study (an explicit one that contradicts them is refused), else the space's
    defaults with the overrides. Opens nothing for writing."""
    requested = study_settings(space_name, overrides)  # validates every given value
    kind = get_space(space_name).KIND
    chosen = {"sampler": choices.DEFAULT_SAMPLER, "pruner": choices.DEFAULT_PRUNERS[kind]}
    chosen.update({k: v for k, v in run.items() if v is not None})
    path = sqlite_path(storage)
    if path is not None and not path.exists():
        return requested, chosen  # a new store: a new study
    rdb = open_storage(storage, heartbeat=False)
    if study_name not in study_names(rdb):
        return requested, chosen
    study = optuna.load_study(study_name=study_name, storage=rdb)
    if not {SPACE_ATTR, KIND_ATTR, SETTINGS_ATTR} & set(study.user_attrs):
        return requested, chosen  # made with Optuna alone (e.g. to enqueue trials): adopted
    info = describe(study)
    if info.space != space_name:
        raise ConfigError(
            f"study {study_name!r} exists as a {info.space} study, not {space_name}; "
            "use another --study-name"
        )
    stored = info.settings
    stored_run = choices.stored_run(study, kind)
    conflicts = [
        f"{key}={getattr(requested, key)!r} (stored {getattr(stored, key)!r})"
        for key in sorted(overrides)
        if getattr(requested, key) != getattr(stored, key)
    ] + [
        f"{key}={value!r} (stored {stored_run[key]!r})"
        for key, value in sorted(run.items())
        if value is not None and value != stored_run[key]
    ]
    if conflicts:
        raise ConfigError(
            f"study {study_name!r} exists with other fixed settings: {', '.join(conflicts)}; "
            "leave them out to use the stored ones, or use another --study-name"
        )
    return stored, stored_run


def run_study(
    name: str,
    trials: int,
    storage: str = DEFAULT_STORAGE,
    study_name: str | None = None,
    sampler_seed: int | None = None,
    device: str = "auto",
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
    population: int | None = None,
    workers: int = 1,
    data_dir: str | None = None,
    threads: int | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
) -> optuna.Study:
    """Create or resume study `study_name` (default: `name`) and run it to `trials` in total.

    Complete and pruned trials count towards `trials`; running it again with the same number
    does nothing new. A new study takes the space's defaults with `settings` applied; an
    existing one runs with its stored settings (`settings` may repeat them, not change them).
    Everything is validated before anything is written. With `population` K, K trials are asked
    at once and trained together (`study.population`) on `threads` CPU threads (default: this
    machine's cores, shared among the workers). With `workers` N > 1, N processes share the
    storage until the total is reached. With `timeout` (seconds), no trial starts after the
    budget and a running one stops at its next epoch: it is failed with that reason and
    re-queued for the next run (`deadline` is the same as an absolute `time.time()`).
    `sampler` and `pruner` name Optuna's sampler and pruner (`study.choices`); they are stored
    with a new study and kept when it resumes. A Boolean study's pruner is its own rule
    (`target-unreachable`) or `none`, the same as its `prune` setting.
    """
    _check_arguments(trials, population, workers, sampler_seed, study_name)
    if timeout is not None and not (is_number(timeout) and 0 < timeout <= 10**8):
        raise ConfigError(f"timeout: must be a positive number of seconds, got {timeout!r}")
    if timeout is not None:
        deadline = time.time() + timeout
    if threads is not None and not (is_int(threads) and 1 <= threads <= 1024):
        raise ConfigError(f"threads: must be an integer from 1 to 1024, got {threads!r}")
    space = get_space(name)
    if population and space.KIND != "boolean":
        raise ConfigError(f"population: only Boolean studies train populations, not {name!r}")
    choices.check(sampler, pruner, space.KIND)
    overrides = {k: v for k, v in (settings or {}).items() if v is not None}
    if space.KIND == "boolean" and pruner is not None:  # the Boolean rule is a setting
        if overrides.get("prune", pruner != "none") != (pruner != "none"):
            raise ConfigError(f"pruner: {pruner!r} contradicts prune={overrides['prune']!r}")
        overrides["prune"] = pruner != "none"
    study_name = study_name or default_study_name(name, overrides)
    target = dev.resolve_device(device)
    run = {"sampler": sampler, "pruner": pruner if space.KIND == "image" else None}
    fixed, chosen = _resolve_settings(name, study_name, storage, overrides, run)
    if space.KIND == "boolean":
        chosen["pruner"] = "target-unreachable" if fixed.prune else "none"
    if space.KIND == "image":
        from study.data import check_image_files

        check_image_files(fixed.dataset, data_dir, fixed.validation_size)
    rdb = open_storage(storage, create=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=rdb,
        study_name=study_name,
        direction=getattr(space, "DIRECTION", "minimize"),
        sampler=choices.make_sampler(chosen["sampler"], sampler_seed),
        pruner=choices.make_image_pruner(chosen["pruner"], fixed)
        if space.KIND == "image"
        else None,
        load_if_exists=True,
    )
    bind(study, name, fixed)
    if study.user_attrs.get(choices.RUN_ATTR) != chosen:
        study.set_user_attr(choices.RUN_ATTR, chosen)
    if hasattr(space, "baseline") and not study.get_trials(deepcopy=False):
        # a new image study starts from its space's known-good baseline (Optuna's enqueue)
        study.enqueue_trial(space.baseline(fixed), user_attrs={"baseline": True})
    if workers > 1 and trials > finished_trials(study):
        share = max(1, (os.cpu_count() or 1) // workers)  # the cores, shared among workers
        arguments = dict(
            name=name,
            trials=trials,
            storage=storage,
            study_name=study_name,
            sampler_seed=sampler_seed,
            device=device,
            settings=overrides,
            population=population,
            data_dir=data_dir,
            threads=threads or share,
            deadline=deadline,
            sampler=sampler,
            pruner=pruner,
        )
        return _run_workers(workers, arguments, study, trials, progress)
    if population:
        trainer = PopulationBatch(space, fixed, target, threads or os.cpu_count() or 1)
        size, train = population, trainer.train
    elif space.KIND == "image":
        trainer = ImageObjective(space, fixed, device=target, data_dir=data_dir)
        size, train = 1, _one_at_a_time(trainer)
    else:
        trainer = BooleanObjective(space, fixed, device=target)
        size, train = 1, _one_at_a_time(trainer)
    interrupt.set_deadline(deadline)
    try:
        _drive(study, storage, trials, size, train, progress, trainer)
    finally:
        interrupt.set_deadline(None)
    return study


Train = Callable[[optuna.Study, list[optuna.Trial]], list[optuna.trial.FrozenTrial]]
"""train(study, asked trials) -> the told trials (complete, pruned or failed)."""


def _one_at_a_time(objective: Callable[[optuna.Trial], float]) -> Train:
    """Run the objective on each asked trial and tell Optuna how it ended."""

    def train(study: optuna.Study, asked: list[optuna.Trial]) -> list:
        told = []
        for trial in asked:
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                told.append(study.tell(trial, state=TrialState.PRUNED))
            except TrialFailed:  # its reason is stored: the study goes on
                told.append(study.tell(trial, state=TrialState.FAIL))
            except (interrupt.Interrupted, interrupt.OutOfTime):
                raise  # `_drive` fails it with the reason and stops
            else:
                told.append(study.tell(trial, value))
        return told

    return train


def _drive(
    study: optuna.Study,
    url: str,
    total: int,
    size: int,
    train: Train,
    progress: bool,
    trainer=None,
) -> None:
    """Claim up to `size` trials at a time and train them until `total` trials are finished.

    When the missing trials are all running elsewhere, wait (saying so once): they finish, or
    their process turns out dead and they are failed and re-queued. Stops when a whole round of
    claims finished nothing `total` times in a row (no progress)."""
    bar = _progress_bar(study, total, progress)
    if trainer is not None and bar is not None:
        trainer.progress = _Note(bar, study)  # motion inside a trial
    in_flight: list[optuna.Trial] = []
    fruitless = 0
    waiting_said = False
    settle = 0.0
    try:
        with interrupt.deferred():
            while True:
                interrupt.check()
                # held: a signal between creating a trial and recording it as ours would leave
                # it RUNNING with no owner to fail it
                with interrupt.held(), claims.claim_lock(url, study._storage, study.study_name):
                    claims.reap(study)
                    free = total - claims.claimed(study)
                    in_flight = claims.claim(study, min(size, free)) if free > 0 else []
                if not in_flight:
                    if finished_trials(study) >= total:
                        # done; but a trial of another machine may still turn out dead: wait
                        # until its heartbeat would be stale, then leave the rest to it
                        elsewhere = claims.running_elsewhere(study)
                        settle = settle or time.monotonic() + 3 * HEARTBEAT_SECONDS
                        if not elsewhere or time.monotonic() > settle:
                            break
                    if not waiting_said:
                        _say_waiting(study, total)
                        waiting_said = True
                    time.sleep(POLL_SECONDS)
                    continue
                waiting_said = False
                before = finished_trials(study)
                with claims.heartbeat(study, in_flight):
                    told = train(study, in_flight)
                in_flight = []
                for trial in told:
                    if bar is not None:
                        bar.update(1 if trial.state in FINISHED else 0)
                        bar.set_postfix_str(_best_text(study))
                fruitless = 0 if finished_trials(study) > before else fruitless + 1
                if fruitless >= total:
                    break  # every claim failed (e.g. every trial diverges): no progress
    except interrupt.OutOfTime as error:
        _abandon(study, in_flight, error)
        if not _in_worker:  # a parent of workers says it once for all of them
            _say_out_of_time(study, total)
    except BaseException as error:
        _abandon(study, in_flight, error)
        if isinstance(error, KeyboardInterrupt):
            raise interrupt.Interrupted(
                f"{interrupt.describe(error)}: {finished_trials(study)} of {total} trials of "
                f"{study.study_name!r} are finished and stored; the running trial was failed "
                "with its reason; run the same command again to continue"
            ) from None
        raise
    finally:
        if bar is not None:
            bar.close()


def _say_out_of_time(study: optuna.Study, total: int) -> None:
    print(
        f"study: {study.study_name}: time budget reached; {finished_trials(study)} of "
        f"{total} trials finished; run again to continue",
        file=sys.stderr,
        flush=True,
    )


def _abandon(study: optuna.Study, trials: list[optuna.Trial], error: BaseException) -> None:
    """Fail the trials this process still runs, with the reason it stops. A trial stopped by
    the time budget is re-queued with its parameters; an interrupted one is sampled anew by
    the next run."""
    if not trials:
        return
    with interrupt.shielded():
        reason = interrupt.reason_of(error)
        retry = isinstance(error, interrupt.OutOfTime)
        for trial in trials:
            with contextlib.suppress(Exception):  # already told, or the store is gone
                if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                    claims.fail(study, trial._trial_id, reason, retry=retry)


def _say_waiting(study: optuna.Study, total: int) -> None:
    running = claims.count(study, (TrialState.RUNNING,))
    print(
        f"study: {study.study_name}: waiting for {running} running trial(s) of other processes "
        f"({finished_trials(study)} of {total} finished); a trial whose process died is failed "
        f"and re-queued once its heartbeat is {2 * HEARTBEAT_SECONDS} s old",
        file=sys.stderr,
        flush=True,
    )


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries ([] without CUDA)."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def assign_gpus(workers: int, gpus: list[str]) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each worker: one GPU each, round robin, when several are
    visible; None (inherit) with one GPU or none."""
    if len(gpus) < 2:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def _die_with_parent() -> None:
    """Linux: this worker gets SIGTERM when its parent dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_in_worker = False


def _worker(index: int, gpu: str | None, kwargs: dict[str, Any]) -> None:
    global _in_worker
    _in_worker = True
    # out of the terminal's process group: Ctrl-C reaches the parent, which forwards it once
    os.setpgrp()
    _die_with_parent()
    if gpu is not None:  # before this process touches CUDA: the worker sees one GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if kwargs.get("sampler_seed") is not None:  # same seed in every worker: same samples
        kwargs = {**kwargs, "sampler_seed": kwargs["sampler_seed"] + index}
    try:
        run_study(**kwargs, progress=False)
    except StudyError as error:
        raise SystemExit(f"worker {index}: {error}") from None
    except interrupt.Interrupted as error:
        raise SystemExit(interrupt.exit_status(error)) from None


def _run_workers(
    workers: int, kwargs: dict[str, Any], study: optuna.Study, trials: int, progress: bool
) -> optuna.Study:
    """Run `workers` processes of the same study; each stops once the total is reached. A
    Ctrl-C or SIGTERM of this process is forwarded to them: they fail their running trials
    with the reason and stop."""
    gpus = visible_gpus() if kwargs["device"] in ("auto", "cuda") else []
    context = multiprocessing.get_context("spawn")  # no forked CUDA or SQLite state
    processes = [
        context.Process(target=_worker, args=(i, gpu, kwargs), name=f"study-worker-{i}")
        for i, gpu in enumerate(assign_gpus(workers, gpus))
    ]
    bar = _progress_bar(study, trials, progress)
    for process in processes:
        process.start()

    def forward(signum: int) -> None:  # each worker fails its running trials and stops
        for p in processes:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    try:
        with interrupt.deferred(forward=forward):
            while any(p.is_alive() for p in processes):
                for p in processes:
                    p.join(timeout=0.5)
                if bar is not None:
                    bar.n = min(trials, finished_trials(study))
                    bar.set_postfix_str(_best_text(study))
                    bar.refresh()
    finally:
        for p in processes:  # only after an error in this process
            if p.is_alive():
                p.terminate()
                p.join()
        if bar is not None:
            bar.close()
    forwarded = interrupt.received()
    if forwarded is not None:
        raise interrupt.Interrupted(
            f"{interrupt.SIGNAL_WORDS[forwarded]}: {finished_trials(study)} of {trials} trials "
            f"of {study.study_name!r} are finished and stored; the workers failed their running "
            "trials with the reason; run the same command again to continue",
            signum=forwarded,
        )
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        raise StudyError(f"{', '.join(failed)} stopped with an error (see its message above)")
    deadline = kwargs.get("deadline")
    if deadline is not None and time.time() >= deadline and finished_trials(study) < trials:
        _say_out_of_time(study, trials)
    return study


class _Note:
    """Progress inside a trial, on the trial bar: at most every half second, so that a note per
    epoch costs training nothing measurable."""

    def __init__(self, bar, study: optuna.Study) -> None:
        self.bar, self.study, self.shown = bar, study, 0.0

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if now - self.shown >= 0.5:
            self.shown = now
            self.bar.set_postfix_str(text)  # the best so far is back once the trial ends


def _progress_bar(study: optuna.Study, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=finished_trials(study), desc=study.study_name, unit="trial")
    bar.set_postfix_str(_best_text(study))
    return bar


def _best_text(study: optuna.Study) -> str:
    best = best_feasible(study)
    if best is None:
        return "none yet"
    if study.direction == optuna.study.StudyDirection.MAXIMIZE:
        return f"best validation accuracy: {best.value:.4f}"
    return f"best feasible: {best.user_attrs['neurons']} neurons"
