"""Run a named study to a total trial count: create or resume it, refuse conflicting settings.

`run_study("boolean-shallow", trials=20)` is the Python entry point behind `study run`; how a
run runs (store, time budget, populations, worker processes) is a `RunOptions`, whose fields
are also the `study run` flags. Every process claims its trials through `study.claims`, so
that the study ends with exactly the requested number of finished trials, and no trial of a
dead process stays RUNNING. Stops (Ctrl-C, SIGTERM, the time budget) are `study.interrupt`'s.

Why one file over 600 lines: a run's resolution (space, stored settings, refusals), its
claim-and-train loop and its worker processes share the one `_Run` and its stop handling;
the pieces that stand alone already live beside it (claims, plan, interrupt, rdb).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

import search_spaces
from search_spaces import get_space
from study import choices, claims, interrupt
from study import device as dev
from study import plan as plan_mod
from study.boolean_objective import BooleanObjective, PopulationBatch
from study.config import BooleanSettings, ImageSettings, RunOptions
from study.errors import ConfigError, StudyError, TrialFailed, first_line
from study.image_objective import ImageObjective
from study.plan import Plan
from study.rdb import storage_of
from study.storage import HEARTBEAT_SECONDS, existing_store, open_storage, study_names
from study.studies import (
    FINISHED,
    KIND_ATTR,
    RUNS_ATTR,
    SETTINGS_ATTR,
    SOURCE_ATTR,
    SPACE_ATTR,
    best_feasible,
    bind,
    describe,
    finished_trials,
    space_of,
    store_attr,
    stored_attrs,
)

__all__ = ["FINISHED", "best_feasible", "finished_trials", "run_study", "study_settings"]

# heartbeat, retry and grouped TPE are marked experimental; they are used on purpose
warnings.filterwarnings("ignore", category=ExperimentalWarning)

POLL_SECONDS = 1.0
PROGRESS_SECONDS = 5.0
"""How often the parent of worker processes reads the store to redraw its progress bar."""
SAMPLER_SEED_ATTR = "sampler_seed"
"""Study user attribute: the sampler seed the study was created with (each run's is in its
record under `runs`); None when the sampler was seeded from the clock."""


def study_settings(space: str | ModuleType, overrides: Mapping[str, Any] | None = None):
    """A space's (a name or the module) base settings with the given (non-None) overrides
    applied and validated."""
    space = get_space(space) if isinstance(space, str) else space
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    return space.base_settings().replace(**changes) if changes else space.base_settings()


def default_study_name(name: str, settings: Mapping[str, Any] | None = None) -> str:
    """`name`, except that an image space run on MNIST is stored as mnist-* by default."""
    dataset = (settings or {}).get("dataset")
    if dataset == "mnist" and name.startswith("fashion-"):
        return "mnist-" + name.removeprefix("fashion-")
    return name


@dataclass(frozen=True)
class _Run:
    """One run, resolved and validated before anything is written."""

    name: str
    """The space's name (its module is looked up again in a worker process)."""
    options: RunOptions
    study_name: str
    fixed: BooleanSettings | ImageSettings
    chosen: dict[str, str]
    """The sampler and pruner it runs with."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the space came from (`search_spaces.source_of`): stored with a new study, and
    how a worker process finds a space that came from a file."""
    command: str | None = None
    """The command line that started the run, recorded by `--export` in `metrics.json`."""
    plan: Plan | None = None
    """A planned image study's plan for this run (fitted by the parent; workers inherit it)."""

    @property
    def planned(self) -> bool:
        return self.chosen.get("fidelity") == "plan"

    found: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """What this process found for the run: the space's module, the store opened to check it
    (`dataclasses.replace` passes it on; a worker process finds its own)."""

    @property
    def space(self) -> ModuleType:
        """The space's module, found once per process (a file's is executed once)."""
        if "space" not in self.found:
            self.found["space"] = search_spaces.from_source(self.name, self.source)
        return self.found["space"]

    @property
    def kind(self) -> str:
        return self.space.KIND

    def __getstate__(self) -> dict[str, Any]:  # neither a module nor an engine pickles
        return {**self.__dict__, "found": {}}


def run_study(
    name: str | ModuleType,
    settings: Mapping[str, Any] | None = None,
    options: RunOptions | None = None,
    *,
    command: str | None = None,
    **option_fields: Any,
) -> optuna.Study:
    """Create or resume study `options.study_name` (default: the space's name) of the space
    `name` (a study name, or a space module: see `search_spaces`) and run it to
    `options.trials` finished trials in total; returns it.

    `options` (or its fields as keywords: `trials=20, storage=..., population=32`) say how
    this run runs (`RunOptions`). Complete and pruned trials count towards the total; running
    it again with the same number does nothing new. A new study takes the space's defaults
    with `settings` applied; an existing one runs with its stored settings (`settings` may
    repeat them, not change them). Everything is validated before anything is written.
    `command` (the command line, as `study run` passes it) is recorded by `--export`.
    """
    if options is None:
        options = RunOptions.from_dict(option_fields)
    elif option_fields:
        raise ConfigError(f"give either options or {sorted(option_fields)}, not both")
    deadline = None if options.timeout is None else time.time() + options.timeout
    return _execute(replace(_resolve(name, settings, options), command=command), deadline)


def _resolve(
    name: str | ModuleType, settings: Mapping[str, Any] | None, options: RunOptions
) -> _Run:
    """The run's space, settings, sampler and pruner; refuses what contradicts the store."""
    space = (
        search_spaces.register(name) if isinstance(name, ModuleType) else find_space(name, options)
    )
    name = space.NAME
    if options.population and space.KIND != "boolean":
        raise ConfigError(f"population: only Boolean studies train populations, not {name!r}")
    choices.check(options.sampler, options.pruner, space.KIND)
    if options.export and space.KIND != "image":
        raise ConfigError(f"export: only image studies export a model, not {name!r}")
    out = Path(options.export_dir) if options.export_dir else None
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"export_dir: {out} exists and is not a directory")
    overrides = {k: v for k, v in (settings or {}).items() if v is not None}
    pruner = options.pruner
    if space.KIND == "boolean" and pruner is not None:  # the Boolean rule is a setting
        if overrides.get("prune", pruner != "none") != (pruner != "none"):
            raise ConfigError(f"pruner: {pruner!r} contradicts prune={overrides['prune']!r}")
        overrides["prune"] = pruner != "none"
    study_name = options.study_name or default_study_name(name, overrides)
    dev.resolve_device(options.device)
    dev.set_precision(options.precision)  # this process's and its workers' (the environment)
    image = space.KIND == "image"
    if options.fidelity is not None and not image:
        raise ConfigError(f"fidelity: only image studies have one, not {name!r}")
    requested = {
        "sampler": options.sampler,
        "pruner": pruner if image else None,
        "fidelity": options.fidelity if image else None,
    }
    fixed, chosen, rdb = _stored_or_requested(
        space, study_name, options.storage, overrides, requested
    )
    if space.KIND == "boolean":
        chosen["pruner"] = "target-unreachable" if fixed.prune else "none"
    if image:
        _fidelity(chosen, options, study_name)
    else:
        _check_memory(fixed, options)
    if space.KIND == "image":
        from study.data import check_image_files

        check_image_files(fixed.dataset, options.data_dir, fixed.validation_size)
    found = {"space": space, "storage": rdb} if rdb is not None else {"space": space}
    return _Run(
        name, options, study_name, fixed, chosen, search_spaces.source_of(space), found=found
    )


def _check_memory(fixed: BooleanSettings, options: RunOptions) -> None:
    """Refuse, in one line and before anything is claimed, a Boolean run whose networks at
    once (a population: --population trials x --seeds; else one network) cannot fit."""
    from study.population import memory_needed

    device = dev.resolve_device(options.device)
    members = (options.population or 1) * (fixed.seeds if options.population else 1)
    threads = options.threads or os.cpu_count() or 1
    needed = memory_needed(fixed, members, device, threads)
    available, bound = dev.available_memory(device)
    if needed > 0.9 * available:
        what = (
            f"--population {options.population} x --seeds {fixed.seeds} = {members:,} networks"
            if options.population
            else "one network"
        )
        raise ConfigError(
            f"memory: {what} of up to {fixed.max_layers} x {fixed.max_width} hidden units on "
            f"{2**fixed.input_bits:,} rows need about {needed / 2**30:,.1f} GiB; "
            f"{available / 2**30:,.1f} GiB is left ({bound}): use a smaller --population, "
            "--seeds, --max-width or --input-bits"
        )


def _fidelity(chosen: dict, options: RunOptions, study_name: str) -> None:
    """An image study's fidelity (a new study: a plan with --timeout, else fixed) and the
    pruner that goes with it: a planned study's rungs are its pruning."""
    if "fidelity" not in chosen:  # a new study
        chosen["fidelity"] = "plan" if options.timeout is not None else "fixed"
    if chosen["fidelity"] != "plan":
        return
    if options.pruner is None:
        chosen["pruner"] = "none"
    if chosen["pruner"] != "none":
        raise ConfigError(
            f"pruner: a study planned by its budget (--fidelity plan) prunes by its rungs; "
            f"leave --pruner out, or give --fidelity fixed to prune with {chosen['pruner']}"
        )
    if options.timeout is None:
        raise ConfigError(
            f"timeout: study {study_name!r} is planned by its time budget (--fidelity plan); "
            "give --timeout SECONDS"
        )


def find_space(name: str, options: RunOptions) -> ModuleType:
    """Space `name`: a known one, or the space a stored study of that name came from (a file
    given with --space when the study was made)."""
    try:
        return get_space(name)
    except ConfigError:
        study_name = options.study_name or name
        rdb = existing_store(options.storage, heartbeat=False)
        if rdb is not None and study_name in study_names(rdb):
            study = optuna.load_study(study_name=study_name, storage=rdb)
            attrs = stored_attrs(study)
            if attrs.get(SOURCE_ATTR) and attrs.get(SPACE_ATTR) == name:
                return space_of(study)
        raise


def _conflict(key: str, value: Any, stored: Any) -> str:
    """A refused setting as the flag that gives it: `--max-epochs 60 (stored: 50)`, `--pruner
    none (stored: target-unreachable)` for a Boolean study's prune, `--no-flip (stored:
    --flip)`."""
    if key == "prune":  # what `--pruner` sets for a Boolean study
        value, stored = (
            choices.DEFAULT_PRUNERS["boolean"] if v else "none" for v in (value, stored)
        )
        key = "pruner"
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):

        def switch(v: Any) -> str:
            return flag if v else "--no-" + flag[2:]

        return f"{switch(value)} (stored: {switch(stored)})"

    def shown(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, tuple | list) else str(v)

    return f"{flag} {shown(value)} (stored: {shown(stored)})"


def _stored_or_requested(
    space: ModuleType, study_name: str, storage: str, overrides: dict, run: dict
) -> tuple[Any, dict[str, str], optuna.storages.BaseStorage | None]:
    """The settings and the run choices (sampler, pruner) to run with: the stored ones for an
    existing study (an explicit one that contradicts them is refused), else the space's
    defaults with the overrides; and the store, opened when it exists (for the run to use).
    Writes nothing."""
    requested = study_settings(space, overrides)  # validates every given value
    space_name, kind = space.NAME, space.KIND
    chosen = {"sampler": choices.DEFAULT_SAMPLER, "pruner": choices.DEFAULT_PRUNERS[kind]}
    chosen.update({k: v for k, v in run.items() if v is not None})  # a new study's fidelity:
    # `_fidelity` (it depends on the time budget)
    rdb = existing_store(storage)
    if rdb is None:
        return requested, chosen, None  # a new store: a new study
    if study_name not in study_names(rdb):
        return requested, chosen, rdb
    study = optuna.load_study(study_name=study_name, storage=rdb)
    attrs = stored_attrs(study)
    if not {SPACE_ATTR, KIND_ATTR, SETTINGS_ATTR} & set(attrs):
        return requested, chosen, rdb  # made with Optuna alone (to enqueue trials): adopted
    if SETTINGS_ATTR not in attrs and not study.get_trials(deepcopy=False):
        return requested, chosen, rdb  # a run killed while it stored them (settings last)
    info = describe(study)
    if info.space != space_name:
        raise ConfigError(
            f"study {study_name!r} exists as a {info.space} study, not {space_name}; "
            "use another --study-name"
        )
    stored, stored_run = info.settings, choices.stored_run(study, kind)
    conflicts = [
        _conflict(key, getattr(requested, key), getattr(stored, key))
        for key in sorted(overrides)
        if getattr(requested, key) != getattr(stored, key)
    ] + [
        _conflict(key, value, stored_run.get(key))
        for key, value in sorted(run.items())
        if value is not None and value != stored_run.get(key)
    ]
    if conflicts:
        raise ConfigError(
            f"study {study_name!r} exists with other fixed settings: {', '.join(conflicts)}; "
            "leave them out to use the stored ones, or use another --study-name"
        )
    _refuse_a_changed_space(study, space, stored)
    return stored, stored_run, rdb


class _Replay(optuna.trial.FixedTrial):
    """A stored trial's parameters asked again by the space of today: each parameter the
    stored trial has must come from a distribution Optuna can store beside the old one."""

    def __init__(self, stored: optuna.trial.FrozenTrial) -> None:
        super().__init__(stored.params, stored.number)
        self.stored = stored

    def _suggest(self, name: str, distribution: optuna.distributions.BaseDistribution) -> Any:
        old = self.stored.distributions.get(name)
        if old is None:  # new in today's space: any of its values follows the same branches
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                return distribution.choices[0]
            return distribution.low  # type: ignore[attr-defined]
        try:
            optuna.distributions.check_distribution_compatibility(old, distribution)
        except ValueError:
            raise _Changed(name, old, distribution) from None
        return self.stored.params[name]


class _Changed(Exception):
    def __init__(self, name: str, old, new) -> None:
        super().__init__(name)
        self.name, self.old, self.new = name, old, new

    def __str__(self) -> str:
        def shown(d) -> str:
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                return f"choices {tuple(d.choices)}"
            return f"{type(d).__name__}(log={d.log})"

        return f"{self.name!r} had {shown(self.old)}, the space now has {shown(self.new)}"


def _refuse_a_changed_space(study: optuna.Study, space: ModuleType, settings: Any) -> None:
    """Refuse, before anything is written, a study whose stored trials asked a parameter from
    a distribution the space of today asks differently (other categorical choices, another
    kind or log scale): Optuna cannot store both in one study, so every new trial would fail.
    Each stored branch of the space (set of parameter names) is asked again once."""
    seen: set[frozenset[str]] = set()
    for trial in study.get_trials(deepcopy=False):
        names = frozenset(trial.distributions)
        if not names or names in seen:
            continue
        seen.add(names)
        try:
            space.suggest(_Replay(trial), settings)
        except _Changed as changed:
            raise ConfigError(
                f"study {study.study_name!r} was made by another version of the "
                f"{space.NAME} space ({changed}): Optuna cannot resume it with the new "
                "choices; use another --study-name"
            ) from None
        except (ValueError, StudyError):  # a stored value today's space rejects: not ours to judge
            continue


def _open(run: _Run) -> optuna.Study:
    """Create or load the study and bind it to its space, settings and run choices; a new image
    study starts from its space's known-good baseline (Optuna's enqueue)."""
    rdb = run.found.get("storage") or open_storage(run.options.storage, create=True)
    optuna.logging.set_verbosity(
        optuna.logging.INFO if run.options.verbose else optuna.logging.WARNING
    )
    study = optuna.create_study(
        storage=rdb,
        study_name=run.study_name,
        direction=search_spaces.direction(run.space),
        sampler=choices.make_sampler(run.chosen["sampler"], run.options.sampler_seed),
        pruner=choices.make_image_pruner(run.chosen["pruner"], run.fixed)
        if run.kind == "image"
        else None,
        load_if_exists=True,
    )
    bind(study, run.space, run.fixed, run.source)
    if stored_attrs(study).get(choices.RUN_ATTR) != run.chosen:
        store_attr(study, choices.RUN_ATTR, run.chosen)
    if not study.get_trials(deepcopy=False):  # a new study
        store_attr(study, SAMPLER_SEED_ATTR, run.options.sampler_seed)
        if hasattr(run.space, "baseline"):
            study.enqueue_trial(run.space.baseline(run.fixed), user_attrs={"baseline": True})
    return study


def _planned(run: _Run, started: float) -> _Run:
    """A planned image run with its plan: the costs measured here, the plan fitted to the
    budget, checked before anything is written (a budget too short is refused in one line)."""
    from study.data import load_image_dataset
    from study.image_objective import calibrate

    target = dev.resolve_device(run.options.device)
    dataset = load_image_dataset(
        run.fixed.dataset,
        run.options.data_dir,
        device=target,
        validation_size=run.fixed.validation_size,
        split_seed=run.fixed.split_seed,
    )
    workers = run.options.workers
    threads = run.options.threads or max(1, (os.cpu_count() or 1) // workers)
    costs = calibrate(run.space, run.fixed, dataset, target, threads, os.cpu_count() or 1, started)
    fitted = plan_mod.fit(
        run.options.timeout, workers, costs, run.fixed.max_epochs, run.options.export, started
    )
    return replace(run, plan=fitted)


def _record_plan(study: optuna.Study, plan: Plan) -> Plan:
    """A study keeps the rungs of its first plan (its trials were trained at them); every
    run's plan is stored with the study for the report."""
    plans = list(stored_attrs(study).get(plan_mod.PLANS_ATTR, []))
    if plans:
        plan = plan.replace(rungs=tuple(plans[0]["rungs"]), fitted=False)
    plans.append({**plan.identity(), "why": plan.why()})
    store_attr(study, plan_mod.PLANS_ATTR, plans)
    return plan


def _execute(run: _Run, deadline: float | None, reserve: bool = False) -> optuna.Study:
    """Run in this process, or in `options.workers` processes, until the total is reached;
    record the run with the study; then export when asked. With `reserve` (or an export to
    follow), trials leave the export of the best one its time within the budget."""
    started = time.time()
    if run.planned and run.plan is None:  # the parent measures and fits, once for all workers
        run = _planned(run, started)
        study = _open(run)
        run = replace(run, plan=_record_plan(study, run.plan))
    else:
        study = _open(run)
    options, before = run.options, finished_trials(study)
    if options.trials <= before and not _in_worker:
        print(
            f"study: {study.study_name}: {before} trials are finished already and --trials is "
            f"the total ({options.trials}): nothing to train; --trials {before + options.trials}"
            f" trains {options.trials} more",
            file=sys.stderr,
            flush=True,
        )
    if options.workers > 1 and options.trials > before:
        _run_workers(run, study, deadline)
    else:  # also with nothing to train: it fails what dead processes left RUNNING
        _train_here(run, study, deadline, reserve or options.export)
    if finished_trials(study) > before and not _in_worker:  # the parent records for all
        _record_run(study, started, before, options)
    if options.export:
        _export(run, study, time.time() - started)
    return study


def _train_here(run: _Run, study: optuna.Study, deadline: float | None, reserve: bool) -> None:
    """Claim and train trials in this process until the total is reached (or time is up)."""
    options = run.options
    target = dev.resolve_device(options.device)
    if options.population:
        threads = options.threads or os.cpu_count() or 1
        trainer = PopulationBatch(run.space, run.fixed, target, threads)
        size, train = options.population, trainer.train
    elif run.kind == "image":
        if options.threads:
            torch.set_num_threads(options.threads)
        trainer = ImageObjective(
            run.space,
            run.fixed,
            device=target,
            data_dir=options.data_dir,
            rungs=run.plan.rungs if run.plan is not None else None,
            storage=options.storage,
        )
        size, train = 1, _one_at_a_time(trainer)
    else:
        trainer = BooleanObjective(run.space, run.fixed, device=target)
        size, train = 1, _one_at_a_time(trainer)
    told = choose = None
    if run.plan is not None:
        plan = run.plan

        def told(study: optuna.Study) -> None:  # trials end before the export's time
            interrupt.set_deadline(plan_mod.deadline(study, plan))

        def choose(study: optuna.Study) -> bool:  # under the claim lock
            if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                return True  # the baseline, a promotion or a stopped trial comes first
            job = plan_mod.next_job(study, plan)
            if isinstance(job, plan_mod.Promotion):
                plan_mod.promote(study, job)
            return job is not None

    elif reserve and run.kind == "image" and deadline is not None:
        images = trainer.dataset  # the export trains on all of them, a trial on the split
        share = (len(images.train_images) + len(images.validation_images)) / len(
            images.train_images
        )
        export_threads = options.threads or os.cpu_count() or 1
        told = _reserve_export_time(deadline, share, export_threads)
    with interrupt.watching(deadline=deadline):
        if told is not None:
            told(study)
        _drive(
            study,
            options.storage,
            options.trials,
            size,
            train,
            not options.quiet,
            trainer,
            told,
            choose,
            deadline,
        )


EXPORT_MARGIN = 1.1
"""Exporting takes the best trial's seconds per epoch x its epochs x (all training images / a
trial's, 60,000 / 50,000 for FashionMNIST), plus this margin (loading, the test)."""
THREAD_GAIN = 1.5
"""How much faster an export on all cores trains than a trial that had one core of them: 1.64x
measured on the 2-core CPU (`study bench cnn`: one process on 2 threads 3.82 epochs/min, each of
two one-thread processes 2.33); taken lower, so that the reserve errs long."""


def _reserve_export_time(
    deadline: float, share: float, export_threads: int = 1
) -> Callable[[optuna.Study], None]:
    """With a time budget and an export to follow: after every finished trial, move the
    budget's end for trials back by what exporting the best trial so far takes (its seconds
    per epoch x its epochs x `share`, the export's training images per trial's; shorter by
    THREAD_GAIN when the trial trained on fewer CPU threads than the export will)."""

    def told(study: optuna.Study) -> None:
        best = best_feasible(study)
        if best is None or not best.user_attrs.get("seconds_per_epoch"):
            return
        epochs = best.user_attrs["config"]["train"]["epochs"]
        export = best.user_attrs["seconds_per_epoch"] * epochs * share * EXPORT_MARGIN
        on_cpu = best.user_attrs.get("device") == "cpu"
        if on_cpu and best.user_attrs.get("threads", export_threads) < export_threads:
            export /= THREAD_GAIN
        interrupt.set_deadline(deadline - export)

    return told


def _record_run(study: optuna.Study, started: float, before: int, options: RunOptions) -> None:
    """One record per run that finished trials: the wall time reports and exports read, and
    the sampler seed it ran with."""
    runs = list(stored_attrs(study).get(RUNS_ATTR, []))
    runs.append({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "finished_before": before,
        "finished_after": finished_trials(study),
        "timeout": options.timeout,
        "sampler_seed": options.sampler_seed,
    })  # fmt: skip
    store_attr(study, RUNS_ATTR, runs)


def _export(run: _Run, study: optuna.Study, study_seconds: float) -> None:
    """`study export` of the best configuration, right after the run (`--export`)."""
    from study.export import export_model
    from study.storage import default_out

    options = run.options
    out = Path(options.export_dir) if options.export_dir else default_out(study.study_name)
    done = export_model(
        study.study_name,
        options.storage,
        out,
        options.device,
        options.data_dir,
        command=run.command,
        study_seconds=round(study_seconds, 1),
        log=(lambda *_: None) if options.quiet else print,
    )
    print(
        f"{study.study_name}: exported trial {done.trial}: test accuracy "
        f"{done.test_accuracy:.4f}, retrained in {done.seconds:.0f} s; study "
        f"{study_seconds:.0f} s; saved to {done.directory}/"
    )


Train = Callable[[optuna.Study, list[optuna.Trial]], list[optuna.trial.FrozenTrial]]
"""train(study, asked trials) -> the told trials (complete, pruned or failed)."""


def _one_at_a_time(objective: Callable[[optuna.Trial], float]) -> Train:
    """Run the objective on each asked trial and tell Optuna how it ended. A stop
    (`interrupt.Stopped`) propagates: `_drive` fails the trial with its reason."""

    def train(study: optuna.Study, asked: list[optuna.Trial]) -> list:
        told = []
        for trial in asked:
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                told.append(study.tell(trial, state=TrialState.PRUNED))
            except TrialFailed:  # its reason is stored: the study goes on
                told.append(study.tell(trial, state=TrialState.FAIL))
            except (MemoryError, RuntimeError) as error:
                if not dev.out_of_memory(error):
                    raise  # a bug keeps its traceback
                reason = f"does not fit in memory: {first_line(error)}"
                trial.set_user_attr("fail_reason", reason)
                told.append(study.tell(trial, state=TrialState.FAIL))
            else:
                told.append(study.tell(trial, value))
        return told

    return train


# ----------------------------------------------------------------------------------------------
# claiming and training, until the total is reached


def _drive(
    study: optuna.Study,
    url: str,
    total: int,
    size: int,
    train: Train,
    progress: bool,
    trainer=None,
    told: Callable[[optuna.Study], None] | None = None,
    choose: Callable[[optuna.Study], bool] | None = None,
    deadline: float | None = None,
) -> None:
    """Claim up to `size` trials at a time and train them until `total` trials are finished.

    When the missing trials are all running elsewhere, wait (saying so once): they finish, or
    their process turns out dead and they are failed and re-queued. Stops when a whole round of
    claims finished nothing `total` times in a row (no progress). A stop fails the trials in
    hand with its reason; the time budget ends the run quietly, the others with one line."""
    bar = _progress_bar(study, total, progress, deadline)
    if trainer is not None and bar is not None:
        trainer.progress = _Note(bar, study)  # motion inside a trial
    in_flight: list[optuna.Trial] = []
    try:
        _rounds(study, url, total, size, train, bar, in_flight, told, choose)
    except BaseException as error:
        claims.abandon(study, in_flight, error)
        stop = interrupt.stop_of(error)
        if stop is interrupt.TIME_BUDGET:
            if not _in_worker:  # a parent of workers says it once for all of them
                _say_out_of_time(study, total)
            return
        if stop is not None:
            raise interrupt.ended(
                stop,
                f"{claims.count(study)} of {total} trials of {study.study_name!r} are "
                "finished and stored; the trials it was running were failed with its reason",
            ) from None
        raise
    finally:
        if bar is not None:
            bar.close()


def _rounds(
    study, url, total, size, train, bar, in_flight: list[optuna.Trial], told, choose
) -> None:
    """The claim-and-train loop of `_drive`; `in_flight` holds the trials in hand. `choose`
    (a planned study) decides under the claim lock what the next trial is, or that nothing
    fits in the time left (this process is done)."""
    fruitless, waiting_said, settle = 0, False, 0.0
    while True:
        interrupt.check()
        # each trial is created with its owner (a kill cannot leave one nobody reaps); a large
        # claim goes in chunks, and a stop between them leaves the claimed ones in `in_flight`
        with claims.claim_lock(url, storage_of(study), study.study_name):
            claims.reap(study)
            free = total - claims.claimed(study)
            if free > 0 and choose is not None and not choose(study):
                return  # the rest of the budget is the export's
            if free > 0:
                claims.claim(study, min(size, free), into=in_flight)
        if not in_flight:
            if finished_trials(study) >= total:
                # done; but a trial of another machine may still turn out dead: wait until
                # its heartbeat would be stale, then leave the rest to it
                settle = settle or time.monotonic() + 3 * HEARTBEAT_SECONDS
                if not claims.running_elsewhere(study) or time.monotonic() > settle:
                    return
            if not waiting_said:
                _say_waiting(study, total)
                waiting_said = True
            time.sleep(POLL_SECONDS)
            continue
        waiting_said = False
        before = finished_trials(study)
        # on an error the trials are failed there; `_drive` fails what is left in hand (none
        # twice: a trial no longer RUNNING is skipped)
        done = claims.train_claimed(study, in_flight, train, study, list(in_flight))
        in_flight.clear()
        if told is not None:
            told(study)
        if bar is not None:
            bar.update(sum(trial.state in FINISHED for trial in done))
            _show(bar, _best_text(study))
            if isinstance(bar, _Lines):
                bar.say(done)
        fruitless = 0 if finished_trials(study) > before else fruitless + 1
        if fruitless >= total:
            return  # every claim failed (e.g. every trial diverges): no progress


def _say_out_of_time(study: optuna.Study, total: int) -> None:
    print(
        f"study: {study.study_name}: {interrupt.TIME_BUDGET.words}; "
        f"{finished_trials(study)} of {total} trials finished; run again to continue",
        file=sys.stderr,
        flush=True,
    )


def _say_waiting(study: optuna.Study, total: int) -> None:
    running = claims.count(study, (TrialState.RUNNING,))
    print(
        f"study: {study.study_name}: waiting for {running} running trial(s) of other processes "
        f"({finished_trials(study)} of {total} finished); a trial whose process died is failed "
        f"and re-queued once its heartbeat is {2 * HEARTBEAT_SECONDS} s old",
        file=sys.stderr,
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# worker processes


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


_in_worker = False


def _worker(index: int, gpu: str | None, run: _Run, deadline: float | None) -> None:
    global _in_worker
    _in_worker = True
    interrupt.detach_worker()  # Ctrl-C reaches the parent, which forwards it once
    if gpu is not None:  # before this process touches CUDA: the worker sees one GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    seed = run.options.sampler_seed
    options = run.options.replace(
        workers=1,
        quiet=True,
        export=False,  # the parent exports, once the workers are done
        threads=run.options.threads or max(1, (os.cpu_count() or 1) // run.options.workers),
        sampler_seed=None if seed is None else seed + index,  # else: the same samples
    )
    try:
        _execute(replace(run, options=options), deadline, reserve=run.options.export)
    except StudyError as error:
        raise SystemExit(f"worker {index}: {error}") from None
    except KeyboardInterrupt as error:
        raise SystemExit(interrupt.ending(error)[1]) from None


def _run_workers(run: _Run, study: optuna.Study, deadline: float | None) -> optuna.Study:
    """Run `workers` processes of the same study; each stops once the total is reached. A
    Ctrl-C or SIGTERM of this process is forwarded to them: they fail their running trials
    with the reason and stop."""
    options, trials = run.options, run.options.trials
    gpus = visible_gpus() if options.device in ("auto", "cuda") else []
    context = multiprocessing.get_context("spawn")  # no forked CUDA or SQLite state
    processes = [
        context.Process(target=_worker, args=(i, gpu, run, deadline), name=f"study-worker-{i}")
        for i, gpu in enumerate(assign_gpus(options.workers, gpus))
    ]
    bar = _progress_bar(study, trials, not options.quiet, deadline)
    for process in processes:
        process.start()

    def forward(signum: int) -> None:  # each worker fails its running trials and stops
        for p in processes:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    try:
        with interrupt.watching(forward=forward):
            while any(p.is_alive() for p in processes):
                # sleep until a worker ends or the bar is due: the parent only shows progress
                multiprocessing.connection.wait(
                    [p.sentinel for p in processes if p.is_alive()], timeout=PROGRESS_SECONDS
                )
                if bar is not None:
                    bar.n = min(trials, finished_trials(study))
                    _show(bar, _best_text(study))
                    bar.refresh()
    finally:
        for p in processes:  # only after an error in this process
            if p.is_alive():
                p.terminate()
                p.join()
        if bar is not None:
            bar.close()
    stop = interrupt.forwarded()
    if stop is not None:
        raise interrupt.ended(
            stop,
            f"{finished_trials(study)} of {trials} trials of {study.study_name!r} are finished "
            "and stored; the workers failed their running trials with the reason",
        )
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        raise StudyError(f"{', '.join(failed)} stopped with an error (see its message above)")
    if deadline is not None and time.time() >= deadline and finished_trials(study) < trials:
        _say_out_of_time(study, trials)
    return study


# ----------------------------------------------------------------------------------------------
# progress


class _Note:
    """Progress inside a trial, on the trial bar: at most every half second, so that a note per
    epoch costs training nothing measurable."""

    def __init__(self, bar, study: optuna.Study) -> None:
        self.bar, self.study, self.shown = bar, study, 0.0

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if now - self.shown >= 0.5:
            self.shown = now
            _show(self.bar, text)  # the best so far is back once the trial ends


BUDGET_BAR = "{desc}: {n_fmt}/{total_fmt} trials [{elapsed}{postfix}]"
"""The bar of a run with a time budget: its trial count is a ceiling, not a goal, so the bar
shows the time used and (`_show`) the budget left, never an estimate from the trial rate."""


PROGRESS_VARIABLE = "STUDY_PROGRESS"
"""bar or lines: the progress of a run, whatever its output is (default: a bar on a terminal,
a line per finished trial elsewhere)."""


class _Lines:
    """The progress of a run whose output is no terminal (a log file, `| tee`, `nohup`): one
    line per finished trial (number, state, value, its parameters, the best so far, seconds),
    no carriage returns. The same calls as the bar's."""

    def __init__(self, study: optuna.Study, deadline: float | None) -> None:
        self.study, self.deadline = study, deadline
        self.seen = {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}
        self.n = len(self.seen)

    def update(self, count: int) -> None:
        self.n += count

    def set_postfix_str(self, text: str) -> None:
        pass

    def refresh(self) -> None:
        """Lines for trials other processes finished (the parent of workers, which has just
        set `n` from the store: no read more)."""
        if self.n > len(self.seen):
            self.say(self.study.get_trials(deepcopy=False, states=FINISHED))

    close = refresh

    def say(self, trials) -> None:
        for t in trials:
            if t.state in FINISHED and t.number not in self.seen:
                self.seen.add(t.number)
                print(_trial_line(self.study, t), file=sys.stderr, flush=True)

    @staticmethod
    def format_interval(seconds: float) -> str:
        from tqdm import tqdm

        return tqdm.format_interval(seconds)


def _trial_line(study: optuna.Study, trial) -> str:
    """`fashion-mlp: trial 12 complete: 0.9012 (width=65, learning_rate=0.0019); best
    validation accuracy: 0.9100; 12.3 s`."""

    def shown(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    params = ", ".join(f"{k}={shown(v)}" for k, v in trial.params.items())
    value = "" if trial.value is None else f": {shown(trial.value)}"
    reason = trial.user_attrs.get("fail_reason") or trial.system_attrs.get("fail_reason")
    seconds = trial.duration.total_seconds() if trial.duration else None
    return (
        f"{study.study_name}: trial {trial.number} {trial.state.name.lower()}{value}"
        + (f" ({params})" if params else "")
        + (f" [{reason}]" if trial.state == TrialState.FAIL and reason else "")
        + f"; {_best_text(study)}"
        + ("" if seconds is None else f"; {seconds:.1f} s")
    )


def _progress_bar(study: optuna.Study, total: int, enabled: bool, deadline: float | None = None):
    done = finished_trials(study) if enabled else 0
    if not enabled or done >= total:  # nothing to train: no bar
        return None
    mode = os.environ.get(PROGRESS_VARIABLE) or ("bar" if sys.stderr.isatty() else "lines")
    if mode == "lines":
        return _Lines(study, deadline)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc=study.study_name, unit="trial",
               bar_format=None if deadline is None else BUDGET_BAR)  # fmt: skip
    bar.deadline = deadline
    _show(bar, _best_text(study))
    return bar


def _show(bar, text: str) -> None:
    """`text` after the bar, and with a time budget how much of it is left."""
    if bar.deadline is not None:
        left = max(0.0, bar.deadline - time.time())
        text = f"{bar.format_interval(left)} of the budget left, {text}"
    bar.set_postfix_str(text)


def _best_text(study: optuna.Study) -> str:
    best = best_feasible(study)
    if best is None:
        return "none yet"
    if study.direction == optuna.study.StudyDirection.MAXIMIZE:
        return f"best validation accuracy: {best.value:.4f}"
    return f"best feasible: {best.user_attrs['neurons']} neurons"
