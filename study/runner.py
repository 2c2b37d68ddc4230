"""Run a named study to a total trial count: create or resume it, refuse conflicting settings.

`run_study("boolean-shallow", trials=20)` is the Python entry point behind `study run`;
`workers=N` runs N processes on the same storage (one per visible GPU when there are several).
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from search_spaces import get_space
from study import interrupt
from study.boolean_objective import BooleanObjective, PopulationBatch
from study.errors import ConfigError, StudyError, TrialFailed
from study.image_objective import ImageObjective, image_pruner
from study.storage import DEFAULT_STORAGE, open_storage
from study.studies import FINISHED, best_feasible, bind, finished_trials

__all__ = ["FINISHED", "best_feasible", "finished_trials", "run_study", "study_settings"]

# heartbeat, retry and grouped TPE are marked experimental; they are used on purpose
warnings.filterwarnings("ignore", category=ExperimentalWarning)


def make_sampler(kind: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """TPE: multivariate and grouped (the deep space is conditional on the layer count);
    constant liar so that parallel workers do not all sample the same point."""
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=8
    )


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
) -> optuna.Study:
    """Create or resume study `study_name` (default: `name`) and run it to `trials` in total.

    Complete and pruned trials count towards `trials`; running it again with the same number
    does nothing new. Fixed settings must match the stored ones. With `population` K, K
    trials are asked at once and trained together (`study.population`). With `workers` N > 1,
    N processes share the storage until the total is reached.
    """
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials: must be a positive integer, got {trials!r}")
    if population is not None and population < 1:
        raise ConfigError(f"population: must be a positive integer, got {population!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers: must be a positive integer, got {workers!r}")
    space = get_space(name)
    if population and space.KIND != "boolean":
        raise ConfigError(f"population: only Boolean studies train populations, not {name!r}")
    fixed = study_settings(name, settings)
    study_name = study_name or default_study_name(name, settings)
    rdb = open_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=rdb,
        study_name=study_name,
        direction=getattr(space, "DIRECTION", "minimize"),
        sampler=make_sampler(space.KIND, sampler_seed),
        pruner=image_pruner() if space.KIND == "image" else None,
        load_if_exists=True,
    )
    bind(study, name, fixed)
    if hasattr(space, "baseline") and not study.get_trials(deepcopy=False):
        # a new image study starts from its space's known-good baseline (Optuna's enqueue)
        study.enqueue_trial(space.baseline(fixed), user_attrs={"baseline": True})
    if trials - finished_trials(study) <= 0:
        return study
    if workers > 1:
        return _run_workers(
            workers,
            dict(
                name=name,
                trials=trials,
                storage=storage,
                study_name=study_name,
                sampler_seed=sampler_seed,
                device=device,
                settings=dict(settings or {}),
                population=population,
                data_dir=data_dir,
            ),
            study,
            trials,
            progress,
        )
    if population:
        batch = PopulationBatch(space, fixed, device=device)
    elif space.KIND == "image":
        objective = ImageObjective(space, fixed, device=device, data_dir=data_dir)
    else:
        objective = BooleanObjective(space, fixed, device=device)
    bar = _progress_bar(study, trials, progress)

    def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if bar is not None:
            bar.update(1 if trial.state in FINISHED else 0)
            bar.set_postfix_str(_best_text(study))
        if interrupt.requested():  # Ctrl-C between two epochs' checks: start no new trial
            study.stop()

    try:
        with interrupt.deferred():
            if population:
                # a crashed population leaves RUNNING trials: fail them, re-enqueue their params
                optuna.storages.fail_stale_trials(study)
                # failed trials (a NaN loss, a crash) do not count: go on until the total is
                # reached, but stop when a whole round finished nothing (no progress)
                while (remaining := trials - finished_trials(study)) > 0:
                    for trial in batch.run(study, min(population, remaining)):
                        on_trial_end(study, trial)
                    interrupt.check()
                    if trials - finished_trials(study) == remaining:
                        break
            else:
                _run_trials(study, objective, trials, storage, on_trial_end)
    except interrupt.Interrupted:
        raise interrupt.Interrupted(
            f"interrupted: {finished_trials(study)} of {trials} trials of "
            f"{study.study_name!r} are finished and stored; the running trial was failed "
            "with its reason; run the same command again to continue"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    return study


CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _claim_lock_path(storage: str, study_name: str) -> Path:
    """A lock file shared by every process of this machine that runs this study."""
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///") + ".lock")
    digest = hashlib.sha1(f"{storage}\n{study_name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"study-{digest}.lock"


def _run_trials(
    study: optuna.Study,
    objective,
    trials: int,
    storage: str,
    on_trial_end,
    poll_seconds: float = 1.0,
) -> None:
    """Run trials one at a time until `trials` are finished, exactly, with any number of
    processes on the same storage.

    A process counts the finished and running trials and asks for a new one as one step under
    a lock file, so that concurrent workers never start more trials than the total. When the
    other trials still running would complete it, a worker waits: if one of them fails or its
    process dies (its heartbeat goes stale), the worker runs a replacement. Failed trials do
    not count; after as many failures in a row as the total, it gives up (no progress).
    """
    lock_path = _claim_lock_path(storage, study.study_name)
    failures_in_a_row = 0
    with lock_path.open("a") as lock_file:
        held = False

        def release() -> None:
            nonlocal held
            if held:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
                held = False

        def claimed_objective(trial: optuna.Trial):
            release()  # the trial exists (RUNNING): the next process may count it
            return objective(trial)

        while finished_trials(study) < trials and failures_in_a_row < trials:
            interrupt.check()
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            held = True
            try:
                if len(study.get_trials(deepcopy=False, states=CLAIMED)) >= trials:
                    release()
                    # the running trials of other processes would complete the study: wait;
                    # fail the trials of dead processes (stale heartbeat) so they are redone
                    optuna.storages.fail_stale_trials(study)
                    time.sleep(poll_seconds)
                    continue
                before = finished_trials(study)
                study.optimize(
                    claimed_objective,
                    callbacks=[on_trial_end],
                    n_trials=1,
                    catch=(TrialFailed,),
                )
            finally:
                release()
            failures_in_a_row = 0 if finished_trials(study) > before else failures_in_a_row + 1


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


def _worker(index: int, gpu: str | None, kwargs: dict[str, Any]) -> None:
    # out of the terminal's process group: Ctrl-C reaches the parent, which forwards it once
    os.setpgrp()
    if gpu is not None:  # before this process touches CUDA: the worker sees one GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if kwargs.get("sampler_seed") is not None:  # same seed in every worker: same samples
        kwargs = {**kwargs, "sampler_seed": kwargs["sampler_seed"] + index}
    try:
        run_study(**kwargs, progress=False)
    except StudyError as error:
        raise SystemExit(f"worker {index}: {error}") from None
    except interrupt.Interrupted:
        raise SystemExit(130) from None


def _run_workers(
    workers: int, kwargs: dict[str, Any], study: optuna.Study, trials: int, progress: bool
) -> optuna.Study:
    """Run `workers` processes of the same study; each stops once the total is reached."""
    gpus = visible_gpus() if kwargs["device"] in ("auto", "cuda") else []
    context = multiprocessing.get_context("spawn")  # no forked CUDA or SQLite state
    processes = [
        context.Process(target=_worker, args=(i, gpu, kwargs), name=f"study-worker-{i}")
        for i, gpu in enumerate(assign_gpus(workers, gpus))
    ]
    bar = _progress_bar(study, trials, progress)
    for process in processes:
        process.start()
    forwarded = False
    try:
        with interrupt.deferred():
            while any(p.is_alive() for p in processes):
                if interrupt.requested() and not forwarded:
                    forwarded = True  # each worker fails its running trial and stops
                    for p in processes:
                        if p.pid is not None and p.is_alive():
                            os.kill(p.pid, signal.SIGINT)
                for p in processes:
                    p.join(timeout=1.0)
                    if bar is not None:
                        bar.n = min(trials, finished_trials(study))
                        bar.set_postfix_str(_best_text(study))
                        bar.refresh()
    finally:
        for p in processes:  # only after a second Ctrl-C or an error in this process
            if p.is_alive():
                p.terminate()
                p.join()
        if bar is not None:
            bar.close()
    if forwarded:
        raise interrupt.Interrupted(
            f"interrupted: {finished_trials(study)} of {trials} trials of "
            f"{study.study_name!r} are finished and stored; the workers failed their running "
            "trials with the reason; run the same command again to continue"
        )
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        raise StudyError(f"{', '.join(failed)} stopped with an error (see its message above)")
    return study


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
