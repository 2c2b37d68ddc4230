"""The `study` command: the single list of subcommands. Thin: parse, call, print.

The flags of `study run` and `study frontier run` are generated from the configuration
dataclasses (`study.config`: a field's docstring is its help). User errors (`StudyError`)
print one line `study: error: ...` (naming the flag where the error is one field's) and exit
with status 2; a stopped command prints its one line and exits as `interrupt.ending` says.

Why one file over 600 lines: it is the whole command-line surface, parser and thin handler
of every subcommand side by side, so that one file answers "what can `study` do" and every
handler imports its work lazily (a command that only reads never imports torch).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import search_spaces
from search_spaces import get_space
from study import choices, interrupt
from study.config import (
    IMAGE_DATASETS,
    MAX_SEEDS,
    RECHECK_ENGINES,
    RECHECK_SEED,
    SETTINGS_OF_KIND,
    FrontierGrid,
    FrontierPlan,
    RunOptions,
    Settings,
    field_docs,
)
from study.errors import ConfigError, StudyError, first_line
from study.storage import DEFAULT_STORAGE, default_out, redact, storage_failure
from study.studies import KINDS, PLURALS

# ----------------------------------------------------------------------------------------------
# flags made from dataclass fields


def _bounded_int(low: int, high: int):
    """An argparse type: an integer from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers (the dataclass checks their range)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 8,16,32, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected integers like 8,16,32, got {text!r}")
    return values


PARSERS = {
    "int": (int, "N"),
    "float": (float, "X"),
    "str": (str, "TEXT"),
    "tuple[int, ...]": (_int_list, "N,N,..."),
}
"""How a field of each type is read from the command line, and its metavar."""
METAVARS = {
    "storage": "URL",
    "timeout": "SECONDS",
    "population": "K",
    "data_dir": "DIR",
    "export_dir": "DIR",
}


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_fields(
    group: argparse._ActionsContainer,
    cls: type[Settings],
    defaults: Settings | None = None,
    skip: tuple[str, ...] = (),
    note: Mapping[str, str] | None = None,
    show_defaults: bool = True,
) -> None:
    """One flag per field of `cls` (but `skip`): `--field-name`, its docstring as help, with the
    default (of `defaults`, else the field's, unless not `show_defaults`) and `note[field]`.
    Every flag defaults to None, so that only what the user gives overrides; a field without
    default is required."""
    docs = field_docs(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name) if defaults is not None else f.default
        doc = docs[f.name]
        if show_defaults and default not in (MISSING, None) and not isinstance(default, bool):
            doc += f" [default: {_shown(default)}]"
        doc += (note or {}).get(f.name, "")
        doc = doc.replace("%", "%%")  # argparse formats help with %
        kind = f.type.removesuffix(" | None")
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif f.name == "dataset":
            group.add_argument(flag, choices=list(IMAGE_DATASETS), default=None, help=doc)
        else:
            parse, metavar = PARSERS[kind]
            group.add_argument(
                flag,
                type=parse,
                metavar=METAVARS.get(f.name, metavar),
                default=None,
                required=f.default is MISSING and f.default_factory is MISSING,
                help=doc,
            )


def given(args: argparse.Namespace, cls: type[Settings]) -> dict[str, Any]:
    """The fields of `cls` the user gave on the command line."""
    return {
        f.name: getattr(args, f.name)
        for f in fields(cls)
        if getattr(args, f.name, None) is not None
    }


def add_settings_flags(parser: argparse.ArgumentParser, name: str | None) -> None:
    """One flag per field of every kind's settings: with the defaults of study `name` when
    known; a field of one kind only says so."""
    chosen = _known_space(name)
    group = parser.add_argument_group(
        "fixed settings of the study" + (f" (defaults of {name})" if chosen else ""),
        "stored with the study; a resumed study must be run with the same ones",
    )
    kinds_of: dict[str, list[str]] = {}
    for kind, cls in SETTINGS_OF_KIND.items():
        for f in fields(cls):
            kinds_of.setdefault(f.name, []).append(kind)
    # the chosen kind first: a field two kinds share gets its help and default from it
    done: set[str] = set()
    for kind in sorted(SETTINGS_OF_KIND, key=lambda k: chosen is None or k != chosen.KIND):
        own = chosen is not None and kind == chosen.KIND
        note = {n: f" [{PLURALS[kind]} only]" for n, ks in kinds_of.items() if ks == [kind]}
        cls = SETTINGS_OF_KIND[kind]
        defaults = chosen.base_settings() if own else None
        add_fields(group, cls, defaults, tuple(done), {} if own else note, show_defaults=own)
        done |= _names(cls)


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


RUN_OPTIONS_OF_KIND = {"population": "boolean", "data_dir": "image"}
"""`study run` options that are not settings but apply to one kind of study only."""


def _known_space(name: str | None):
    """The space of a name known without a store (for --help's defaults), else None."""
    if name is None:
        return None
    try:
        if name.endswith(".py"):
            return search_spaces.load_file(name)
        return get_space(name) if name in search_spaces.names() else None
    except ConfigError:
        return None


def settings_overrides(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The settings the user gave for study `args.name` of `kind`; a flag that does not
    apply to its kind is refused in one line that names the kind."""
    own = _names(SETTINGS_OF_KIND[kind])
    gave = {key for cls in SETTINGS_OF_KIND.values() for key in given(args, cls)}
    gave |= {k for k in RUN_OPTIONS_OF_KIND if getattr(args, k) is not None}
    for key in sorted(gave):
        if key not in own and RUN_OPTIONS_OF_KIND.get(key) != kind:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{flag} does not apply to {args.name}, {KINDS[kind]}; it is for "
                f"{PLURALS['image' if kind == 'boolean' else 'boolean']}"
            )
    return {key: getattr(args, key) for key in own if getattr(args, key) is not None}


STORAGE_VARIABLE = "STUDY_STORAGE"
"""The environment variable that names the store when --storage is not given (the notebooks
read it too)."""


def default_storage() -> str:
    """$STUDY_STORAGE, else the default store results/runs/studies.db (made where you stand)."""
    return os.environ.get(STORAGE_VARIABLE) or DEFAULT_STORAGE


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=default_storage(),
        metavar="URL",
        help=f"Optuna storage URL (default ${STORAGE_VARIABLE}, else {DEFAULT_STORAGE}; "
        "PostgreSQL for many machines)",
    )


# ----------------------------------------------------------------------------------------------
# the commands


def _command_line() -> str:
    """This command as typed, with any storage password hidden: it goes into reports."""
    shown = []
    for argument in sys.argv[1:]:
        flag, equals, value = argument.partition("=")
        if "://" in argument:
            argument = f"{flag}={redact(value)}" if equals and "://" in value else redact(argument)
        shown.append(shlex.quote(argument))
    return " ".join(["study", *shown])


def _out_dir(given_dir: str | None, name: str, flag: str = "--out", create: bool = True) -> Path:
    """Where a command writes: --out, else results/runs/NAME; one line if it cannot be.
    Without `create` it is only checked (a run checks its report directory before it trains)."""
    out = Path(given_dir) if given_dir else default_out(name)
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"{flag}: {out} is a link to nothing ({os.readlink(out)})")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}: {out} exists and is not a directory")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"{flag}: cannot create {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"{flag}: {existing} is not writable")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{flag}: cannot create {out} ({error.strerror})") from None
    return out


def cmd_run(args: argparse.Namespace) -> None:
    from study.report import write_report
    from study.runner import default_study_name, run_study

    options = RunOptions.from_dict({"storage": default_storage(), **given(args, RunOptions)})
    space = _space_of_run(args, options)
    args.name = space.NAME
    overrides = settings_overrides(args, space.KIND)
    if args.report:  # checked before anything is trained or stored
        name = options.study_name or default_study_name(args.name, overrides)
        _out_dir(args.report_dir, name, "--report-dir", create=False)
    study = run_study(space, overrides, options, command=_command_line())
    print(_best_line(study, space.KIND))
    if args.report:
        out = _out_dir(args.report_dir, study.study_name, "--report-dir")
        write_report(study.study_name, options.storage, out, _command_line())
        print(f"report: {out}/summary.md")


def _space_of_run(args: argparse.Namespace, options: RunOptions):
    """The space `study run` runs: --space FILE, a known study, or the space a stored study
    of that name came from."""
    from study.runner import find_space

    if args.space is not None:
        space = search_spaces.load_file(args.space)
        if args.name is not None and args.name != space.NAME:
            raise ConfigError(f"--space {args.space} defines {space.NAME!r}, not {args.name!r}")
        return space
    if args.name is None:
        raise ConfigError(
            f"give a study ({', '.join(search_spaces.names())}) or your own with --space FILE"
        )
    return find_space(args.name, options)


def _best_line(study, kind: str) -> str:
    from study.runner import best_feasible

    best = best_feasible(study)
    if best is None:
        nothing = "no configuration learned f yet" if kind == "boolean" else "no complete trial"
        return f"{study.study_name}: {nothing}"
    if kind == "image":
        from study.config import ImageCandidate

        described = ImageCandidate.from_dict(best.user_attrs["config"]).describe()
        return (
            f"{study.study_name}: best validation accuracy {best.value:.4f} "
            f"(trial {best.number}, {best.user_attrs['parameters']} parameters): {described}"
        )
    a = best.user_attrs
    return (
        f"{study.study_name}: smallest feasible: {a['neurons']} hidden neurons "
        f"{a['hidden_layer_profile']} ({a['parameters']} parameters), trial {best.number}"
    )


def cmd_report(args: argparse.Namespace) -> None:
    from study.report import write_report
    from study.studies import load

    # one line for a missing store or study, or a frontier study, before --out is made
    load(args.name, args.storage, kind=("boolean", "image"), command="report")
    out = _out_dir(args.out, args.name, create=False)  # made once the study is found fit
    out = write_report(args.name, args.storage, out, _command_line())
    print(f"report: {out}/summary.md")


def cmd_export(args: argparse.Namespace) -> None:
    from study.export import export_model
    from study.studies import load

    load(args.name, args.storage, kind="image", command="export")  # before --out is made
    out = _out_dir(args.out, args.name)
    done = export_model(
        args.name,
        args.storage,
        out / "baseline" if args.baseline else out,
        args.device,
        args.data_dir,
        _command_line(),
        seeds=args.seeds,
        baseline=args.baseline,
    )
    seeds = ", ".join(f"{a:.4f}" for a in done.test_accuracy_seeds)
    print(
        f"{args.name}: trial {done.trial}{' (baseline)' * args.baseline}: test accuracy "
        f"{done.test_accuracy:.4f} (validation in the search {done.validation_accuracy:.4f}), "
        f"retrained in {done.seconds:.0f} s; over {len(done.test_accuracy_seeds)} seed(s) "
        f"{done.test_accuracy_mean:.4f} ({seeds}); saved to {done.directory}/"
    )


def cmd_predict(args: argparse.Namespace) -> None:
    import tempfile

    from study.export import fetch_export, predict, prediction_line

    with tempfile.TemporaryDirectory() as tmp:
        # the export stored with the study (Optuna's artifact store), or plain files
        directory = (
            Path(args.dir) if args.dir else fetch_export(args.name, args.storage, Path(tmp))
        )
        rows = predict(directory, args.index, args.image, args.data_dir, args.device)
    for row in rows:
        print(prediction_line(row))


def cmd_list(args: argparse.Namespace) -> None:
    import json

    from study.overview import format_list, list_studies

    rows = list_studies(args.storage)
    print(json.dumps(rows, indent=1) if args.json else format_list(rows))


def cmd_delete(args: argparse.Namespace) -> None:
    import contextlib

    import optuna
    from optuna.artifacts import get_all_artifact_meta
    from optuna.artifacts.exceptions import ArtifactNotFound

    from study.storage import artifact_store, load_study, open_storage

    storage = open_storage(args.storage, heartbeat=False)
    study = load_study(args.name, storage)  # one line for a missing store or study
    frozen = study.get_trials(deepcopy=False)
    # the files uploaded with the study or its trials (an export, the dashboard's uploads)
    files = [meta.artifact_id for meta in get_all_artifact_meta(study)]
    files += [m.artifact_id for t in frozen for m in get_all_artifact_meta(t, storage=storage)]
    what = f"{len(frozen)} trials" + (f", {len(files)} stored files" if files else "")
    where = redact(args.storage)
    if not args.yes:
        if sys.stdin is None or sys.stdin.closed or not sys.stdin.isatty():
            raise ConfigError(f"delete: {args.name!r} has {what}; add --yes to delete")
        answer = input(f"delete study {args.name!r} ({what}) from {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return
    optuna.delete_study(study_name=args.name, storage=open_storage(args.storage))
    store = artifact_store(args.storage, create=False) if files else None  # None: none left
    for artifact_id in files if store else ():
        with contextlib.suppress(ArtifactNotFound):  # removed by hand before
            store.remove(artifact_id)
    print(f"deleted study {args.name!r} ({what}) from {where}")


def cmd_best(args: argparse.Namespace) -> None:
    import json

    from study.overview import best_of, format_best

    record = best_of(args.name, args.storage)
    print(json.dumps(record, indent=1, default=str) if args.json else format_best(record))


def cmd_dashboard(args: argparse.Namespace) -> None:
    from study.storage import artifact_store, open_storage

    storage = open_storage(args.storage, heartbeat=False)  # one clear line for a bad store
    try:
        from optuna_dashboard import run_server
    except ModuleNotFoundError:
        raise StudyError("dashboard: optuna-dashboard is not installed; pip install it") from None
    _check_listen(args.host, args.port)  # a bad host or a busy port: no banner, one line
    print(
        f"optuna-dashboard for {redact(args.storage)} on http://{args.host}:{args.port}/ "
        "(Ctrl-C stops)"
    )
    sys.stdout.flush()
    try:
        run_server(
            storage,
            host=args.host,
            port=args.port,
            artifact_store=artifact_store(args.storage, create=False),
        )
    except OSError as error:
        raise StudyError(
            f"dashboard: cannot listen on {args.host}:{args.port} ({error})"
        ) from None


def _check_listen(host: str, port: int) -> None:
    """That the dashboard can listen on host:port: the name resolves and the port is free."""
    import socket

    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = found[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise StudyError(
            f"dashboard: cannot listen on {host}:{port} ({error.strerror or error})"
        ) from None


def cmd_certify(args: argparse.Namespace) -> None:
    from study.certify import certify, write_certification
    from study.studies import load

    load(args.name, args.storage, kind="boolean", command="certify")  # before --out is made
    out = _out_dir(args.out, args.name)
    cert = certify(
        args.name,
        args.storage,
        seeds=args.seeds,
        device=args.device,
        top=args.top,
        command=_command_line(),
    )
    path = write_certification(cert, out)
    print(cert.table.drop(columns=["seconds"]).to_string(index=False))
    print(cert.verdict())
    print(f"certification: {path}")


def cmd_frontier_run(args: argparse.Namespace) -> None:
    from study.answers import FrontierAnswer, NoAnswer
    from study.frontier import run_frontier

    grid = FrontierGrid.from_dict(given(args, FrontierGrid))
    plan = given(args, FrontierPlan)
    FrontierPlan.from_dict(plan)  # checked before anything is opened

    def say(answer: FrontierAnswer | NoAnswer) -> None:
        if isinstance(answer, NoAnswer):
            print(answer.line(), flush=True)
            return
        fitted_low, fitted_high = answer.curve.interval
        print(
            f"{answer.cell.name}: {answer.neurons} neurons {list(answer.width.profile)} "
            f"({answer.parameters} parameters), {answer.pooled_words()};"
            f" fitted {answer.plan.required_rate:.0%} crossing {answer.curve.crossing:.1f} "
            f"({_end(fitted_low)}..{_end(fitted_high)})",
            flush=True,
        )

    log = (lambda *_: None) if args.quiet else print
    run_frontier(
        args.storage, grid, plan, args.threads, log, on_answer=say, command=_command_line()
    )


def _end(value: float | None) -> str:
    return "open" if value is None else f"{value:.1f}"


def cmd_frontier_report(args: argparse.Namespace) -> None:
    from study.report_frontier import (
        frontier_answers,
        frontier_outcomes,
        headline,
        write_frontier_report,
    )

    out = _out_dir(args.out, "frontier")
    answers = Path(args.answers) if args.answers else out / "answers.json"
    write_frontier_report(
        args.storage, out, answers, _command_line(), Path(args.records) if args.records else None
    )
    for line in headline(frontier_answers(args.storage)):
        print(line)
    for outcome in frontier_outcomes(args.storage):
        print(outcome.line())
    print(f"report: {out}/summary.md; answers: {answers}")


def cmd_frontier_recheck(args: argparse.Namespace) -> None:
    from study.recheck import read_answers, recheck

    path = Path(args.answers) if args.answers else default_out("frontier") / "answers.json"
    answers = read_answers(path, args.cells or ())
    out = _out_dir(args.out or str(path.parent), "frontier")
    log = (lambda *_: None) if args.quiet else print
    rechecks = recheck(
        answers, out, args.seeds, args.first_seed, args.processes, log, _command_line(),
        args.engine,
    )  # fmt: skip
    for r in rechecks:
        print(r.line())
    print(f"recheck: {out}/recheck.md and {out}/recheck.json")


def cmd_records_run(args: argparse.Namespace) -> None:
    import json

    from study import interrupt
    from study.record_search import search
    from study.storage import open_storage

    try:
        answers = json.loads(Path(args.answers).read_text())["answers"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"--answers: cannot read frontier answers from {args.answers} "
                          f"({first_line(error)})") from None  # fmt: skip
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(args.storage, create=True)
    cells = [(f, d) for f in args.function_seeds for d in args.depths]
    log = (lambda *_: None) if args.quiet else print
    with interrupt.watching():
        found = search(
            args.storage, storage, cells, args.budget, answers, args.seeds_per_width,
            args.recipes, args.threads or os.cpu_count() or 1, Path(args.out), _command_line(),
            log, args.widths, args.below,
        )  # fmt: skip
    for (f, d), path in found.items():
        print(f"function seed {f}, depth {d}: " + (f"record {path}" if path else "no record"))


def cmd_records_prune(args: argparse.Namespace) -> None:
    from study import records
    from study.record_search import prune

    starts = args.files or [
        r["file"] for (_, _, method), r in records.smallest(args.out).items()
        if method == records.PLAIN
    ]  # fmt: skip
    if not starts:
        raise records.RecordError(f"no record given and no plain record in {args.out}")
    log = (lambda *_: None) if args.quiet else print
    for start in starts:
        records.verify(start)  # a damaged start is one line before any work
        found = prune(Path(start), Path(args.out), args.epochs, args.learning_rate,
                      _command_line(), log)  # fmt: skip
        print(f"{start}: " + (f"pruned to {found}" if found else "no neuron could go"))


def cmd_verify(args: argparse.Namespace) -> None:
    from study import records

    paths = args.files or sorted(str(p) for p in records.RECORDS_DIR.glob("*.json"))
    if not paths:
        raise records.RecordError(f"no record given and none in {records.RECORDS_DIR}")
    checks = [records.verify(path) for path in paths]
    for check in checks:
        print(check.line())
    if not all(c.holds for c in checks):
        sys.exit(1)


BENCH_MINUTES = {"pruners": 15.0, "hour": 60.0}
"""The default --minutes of the benches that take a budget."""


def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "read":  # reading only: no torch
        from study.bench_read import bench_read

        bench_read(None if args.storage is None else [args.storage], repeats=args.repeats)
        return
    from study.bench import bench_claims, bench_cnn, bench_pruners, bench_trainer
    from study.bench_population import bench_boolean, bench_long, bench_step

    if args.what == "trainer":
        bench_trainer(args.data_dir, args.device, repeats=args.repeats)
    elif args.what == "cnn":
        bench_cnn(args.data_dir, args.device, repeats=args.repeats)
    elif args.what == "boolean":
        bench_boolean(trials=args.trials or 32, epochs=args.epochs or 250, device_name=args.device)
    elif args.what in ("pruners", "hour"):
        args.minutes = args.minutes if args.minutes is not None else BENCH_MINUTES[args.what]
        if not (args.minutes > 0 and args.minutes <= 10_000):  # also refuses NaN
            raise ConfigError(f"--minutes: must be a number from 0 to 10000, got {args.minutes}")
    if args.what == "hour":
        from study.bench_hour import bench_hour

        RunOptions(trials=1, sampler_seed=args.sampler_seed, precision=args.precision,
                   workers=args.workers)  # checked before anything runs  # fmt: skip
        out = _out_dir(args.out, "bench", "--out")
        run = bench_hour(default_storage() if args.storage is None else args.storage, out,
                         space=args.study or "fashion-cnn", precision=args.precision,
                         sampler_seed=args.sampler_seed, minutes=args.minutes,
                         workers=args.workers, data_dir=args.data_dir,
                         baseline_jobs=args.baseline_jobs)  # fmt: skip
        print(f"bench hour: {run['study_name']}: test {run['test_accuracy_mean']:.4f} against "
              f"the baseline hour's {run['baseline_hour_test_accuracy_mean']:.4f} "
              f"({run['gain_points']:+.2f} points); {out}/hour-cpu.md")  # fmt: skip
    elif args.what == "pruners":
        pruners = tuple(p.strip() for p in args.pruners.split(",") if p.strip())
        for pruner in pruners:
            choices.check(None, pruner, "image")
        bench_pruners(minutes=args.minutes, repeats=args.repeats, data_dir=args.data_dir,
                      study=args.study or "fashion-mlp", pruners=pruners)  # fmt: skip
    elif args.what == "claims":
        bench_claims(trials=args.trials or 2000)
    elif args.what == "long":
        bench_long(members=args.members, epochs=args.epochs or 4000, device_name=args.device)
    else:
        bench_step(device_name=args.device)


def cmd_data(args: argparse.Namespace) -> None:
    from study.data import load_image_dataset, prepare_raw_files

    root = prepare_raw_files(args.dataset, args.data_dir, download=args.download)
    dataset = load_image_dataset(args.dataset, root)
    print(
        f"{args.dataset}: {len(dataset.train_images)} train + "
        f"{len(dataset.validation_images)} validation + {len(dataset.test_images)} test "
        f"images ready in {root}"
    )


# ----------------------------------------------------------------------------------------------
# the parser: one function per subcommand


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one `--help` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_run(sub, name: str | None) -> None:
    p = sub.add_parser(
        "run", help="create or resume a study and run it to N trials in total", allow_abbrev=False
    )
    p.add_argument("name", nargs="?", metavar="NAME",
                   help=f"the study: {', '.join(search_spaces.names())}, or one a space file "
                   "made in this store")  # fmt: skip
    p.add_argument("--space", metavar="FILE",
                   help="your own search space, a Python file (see search_spaces/__init__.py); "
                   "NAME defaults to its NAME")  # fmt: skip
    options = p.add_argument_group("how this run runs (not stored with the study)")
    add_fields(options, RunOptions)
    p.add_argument("--report", action="store_true", help="write the report afterwards")
    p.add_argument("--report-dir", help="where --report writes (default results/runs/NAME)")
    add_settings_flags(p, name)
    p.set_defaults(func=cmd_run)


def _add_readers(sub) -> None:
    """The commands that read one study: report, export, predict, certify, best."""
    for command, text, func in [
        ("report", "write trials.csv, summary.md and figures of a study", cmd_report),
        ("export", "retrain an image study's best configuration, test it once, save it",
         cmd_export),
        ("certify", "retrain the smallest feasible width on fresh seeds", cmd_certify),
        ("best", "the best or certified configuration of a study", cmd_best),
    ]:  # fmt: skip
        p = sub.add_parser(command, help=text)
        p.add_argument("name", help="study name in the storage")
        _add_storage(p)
        p.set_defaults(func=func)
        if command != "best":
            p.add_argument("--out", help="output directory (default results/runs/NAME)")
        if command in ("export", "certify"):
            p.add_argument("--device", default="auto")
        if command == "export":
            p.add_argument("--data-dir", help="directory with the IDX files")
            p.add_argument(
                "--seeds",
                type=_bounded_int(1, 100),
                default=1,
                help="training seeds, each retrained and tested once; the first "
                "one's model is saved; seeds exported before are read back (1)",
            )
            p.add_argument("--baseline", action="store_true",
                           help="export the study's enqueued baseline instead of its best "
                           "(into OUT/baseline): the test accuracy the search is measured "
                           "against")  # fmt: skip
        if command == "certify":
            p.add_argument("--seeds", type=_bounded_int(1, MAX_SEEDS), default=10,
                           help="fresh seeds per config")  # fmt: skip
            p.add_argument("--top", type=_bounded_int(1, 1000), default=1,
                           help="also retrain the next smallest feasible configurations "
                           "(TOP in all)")  # fmt: skip
        if command == "best":
            p.add_argument("--json", action="store_true", help="as JSON")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify test images or PNG/JPEG files")
    p.add_argument("name", help="the exported study (its model from the store's artifacts)")
    _add_storage(p)
    p.add_argument(
        "--index", type=int, nargs="+", metavar="I", help="test-set image numbers (0..9999)"
    )
    p.add_argument("--image", nargs="+", metavar="FILE", help="PNG or JPEG files")
    p.add_argument("--dir", help="read the exported files from this directory instead")
    p.add_argument("--data-dir", help="directory with the IDX files (for --index)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)


def _add_frontier(sub) -> None:
    p = sub.add_parser(
        "frontier",
        help="the budget frontier: fewest neurons per epoch budget and depth, held-out certified",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               parser_class=_Parser)  # fmt: skip
    run = actions.add_parser("run", help="answer the cells (resumes; processes share the work)")
    _add_storage(run)
    add_fields(run.add_argument_group("the cells"), FrontierGrid)
    add_fields(
        run.add_argument_group("the plan", "stored with each cell; a resumed cell keeps its own"),
        FrontierPlan,
        skip=("method",),
    )
    run.add_argument("--threads", type=_bounded_int(1, 1024), help="CPU threads (all cores)")
    run.add_argument("--quiet", action="store_true", help="only the answers")
    run.set_defaults(func=cmd_frontier_run)
    report = actions.add_parser("report", help="summary.md, frontier.png and answers.json")
    _add_storage(report)
    report.add_argument("--out", help="directory (default results/runs/frontier)")
    report.add_argument("--answers", help="answers file (default OUT/answers.json)")
    report.add_argument("--records", metavar="DIR",
                        help="show the record networks of DIR (e.g. results/records)")  # fmt: skip
    report.set_defaults(func=cmd_frontier_report)
    check = actions.add_parser(
        "recheck",
        help="retrain stated widths on seeds no run used, with the sequential trainer (resumes)",
    )
    check.add_argument(
        "--answers", help="answers.json to read (default results/runs/frontier/answers.json)"
    )
    check.add_argument("--cells", nargs="+", metavar="STUDY", help="these answers only (names)")
    check.add_argument("--seeds", type=_bounded_int(1, 100_000), default=48, help="per answer")
    check.add_argument(
        "--first-seed", type=_bounded_int(0, 2**63 - 100_001),
        help="the seeds are FIRST-SEED onwards (default: the cell's own recheck seeds, which "
        f"no run trains on; {RECHECK_SEED} onwards for a cell stored before method 3)",
    )  # fmt: skip
    check.add_argument(
        "--processes", type=_bounded_int(1, 1024), default=os.cpu_count() or 1,
        help="worker processes of one thread each, or the population's threads (default: the "
        "cores)",
    )  # fmt: skip
    check.add_argument(
        "--engine", choices=RECHECK_ENGINES, default=RECHECK_ENGINES[0],
        help="sequential: one network at a time, in --processes workers (default); population: "
        "the engine the answers were stated with, on --processes threads",
    )  # fmt: skip
    check.add_argument("--out", help="directory (default: the answers file's)")
    check.add_argument("--quiet", action="store_true", help="only the verdicts")
    check.set_defaults(func=cmd_frontier_recheck)


def _add_records(sub) -> None:
    p = sub.add_parser(
        "records", help="record networks: the smallest found that learn f, with their weights"
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               parser_class=_Parser)  # fmt: skip
    run = actions.add_parser(
        "run", help="search records below the frontier's stated widths (resumes; processes "
        "share the work)",
    )  # fmt: skip
    _add_storage(run)
    run.add_argument("--function-seeds", type=_int_list, default=(0,), metavar="N,N,...",
                     help="functions (0)")  # fmt: skip
    run.add_argument("--depths", type=_int_list, default=(1, 2), metavar="N,N,...",
                     help="hidden layers (1,2)")  # fmt: skip
    run.add_argument("--budget", type=_bounded_int(1, 1_000_000), default=64_000,
                     help="epochs per network (64000)")  # fmt: skip
    run.add_argument("--seeds-per-width", type=_bounded_int(64, 100_000), default=256,
                     help="seeds per recipe at a width before the search stops (256)")  # fmt: skip
    run.add_argument("--widths", type=_bounded_int(1, 1024),
                     help="at most this many widths below the stated one (default: down "
                     "to the first width whose seeds all fail)")  # fmt: skip
    run.add_argument("--below", type=_bounded_int(2, 4096), metavar="N",
                     help="start below N neurons instead of the stated width (e.g. below a "
                     "record of a shorter budget)")  # fmt: skip
    run.add_argument("--recipes", type=_bounded_int(1, 8), default=2,
                     help="the cell's best recipes tried, each on every seed (2)")  # fmt: skip
    run.add_argument("--answers", default="results/answers.json",
                     help="the frontier's answers: stated widths and recipes "
                     "(results/answers.json)")  # fmt: skip
    run.add_argument("--out", default="results/records", help="where records go")
    run.add_argument("--threads", type=_bounded_int(1, 1024), help="CPU threads (all cores)")
    run.add_argument("--quiet", action="store_true", help="only the records")
    run.set_defaults(func=cmd_records_run)
    prune = actions.add_parser(
        "prune", help="the second track: remove a record's weakest neurons one at a time, "
        "fine-tuning after each",
    )  # fmt: skip
    prune.add_argument("files", nargs="*", metavar="FILE",
                       help="records to start from (default: the smallest plain record of "
                       "each function and depth in --out)")  # fmt: skip
    prune.add_argument("--epochs", type=_bounded_int(1, 10**7), default=10_000,
                       help="most fine-tuning epochs per removed neuron (10000)")  # fmt: skip
    prune.add_argument("--learning-rate", type=float, default=3e-3,
                       help="Adam's rate when fine-tuning (0.003)")  # fmt: skip
    prune.add_argument("--out", default="results/records", help="where records go")
    prune.add_argument("--quiet", action="store_true", help="only the results")
    prune.set_defaults(func=cmd_records_prune)
    p = sub.add_parser(
        "verify", help="check record networks: rebuild f, recompute loss and bits (no store)"
    )
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="record .json or .safetensors (default: results/records)")  # fmt: skip
    p.set_defaults(func=cmd_verify)


def _add_store_commands(sub) -> None:
    """list, delete and dashboard: the whole store."""
    p = sub.add_parser("list", help="the studies in a store: kind, trials by state, best value")
    _add_storage(p)
    p.add_argument("--json", action="store_true", help="as JSON (one object per study)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser(
        "delete",
        help="delete a study, its trials and the files stored with them (an export) from a store",
    )
    p.add_argument("name", help="study name in the storage")
    _add_storage(p)
    p.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    p.set_defaults(func=cmd_delete)
    p = sub.add_parser("dashboard", help="browse a storage's studies in optuna-dashboard")
    _add_storage(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=_bounded_int(1, 65535), default=8080, help="port (8080)")
    p.set_defaults(func=cmd_dashboard)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    p.add_argument(
        "what",
        choices=["trainer", "cnn", "boolean", "long", "step", "pruners", "claims", "hour", "read"],
        help="trainer: tutorial pipeline vs trainer (FashionMNIST MLP); cnn: a plain "
        "DataLoader script vs the trainer on the fashion-cnn baseline network (fp32, bf16; "
        "threads or processes); boolean: tutorial "
        "loop vs sequential vs population trainer; long: the long-budget workload "
        "(member-epochs per second, memory per 1,000 members); step: the candidates for a "
        "population step (eager, torch.compile, native kernel); pruners: median against "
        "hyperband for fashion-mlp under one time budget; claims: claiming and reaping "
        "trials, one call per trial against chunks of them per transaction; hour: the search "
        "hour (study run --timeout, with its export) against the space's baseline trained for "
        "the same hour, three seeds each, into results/bench/hour-cpu.json (resumes); read: "
        "`study list` against `optuna studies` on the committed stores (time, memory)",
    )
    p.add_argument("--data-dir", help="directory with the FashionMNIST IDX files")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=_bounded_int(1, 100), default=3,
                   help="trainer: timed epochs (3); pruners, read: repetitions")  # fmt: skip
    p.add_argument("--trials", type=_bounded_int(1, 4096),
                   help="boolean: configurations (32); claims: trials (2000)")  # fmt: skip
    p.add_argument("--epochs", type=_bounded_int(1, 10**6),
                   help="boolean: epochs each (250); long: epochs (4000)")  # fmt: skip
    p.add_argument("--members", type=_bounded_int(1, 100_000), default=64,
                   help="long: members (64)")  # fmt: skip
    p.add_argument("--minutes", type=float,
                   help="pruners: minutes per study (15); hour: the budget (60)")  # fmt: skip
    p.add_argument(
        "--study",
        choices=["fashion-mlp", "fashion-cnn"],
        help="pruners: the image study (fashion-mlp); hour: the space (fashion-cnn)",
    )
    p.add_argument("--precision", default="auto",
                   help="hour: auto (bf16 where native) or fp32")  # fmt: skip
    p.add_argument("--sampler-seed", type=_bounded_int(0, 2**31), default=0,
                   help="hour: the search's sampler seed (0)")  # fmt: skip
    p.add_argument("--workers", type=_bounded_int(1, 64), default=2,
                   help="hour: the search's worker processes (2)")  # fmt: skip
    p.add_argument("--baseline-jobs", type=_bounded_int(1, 3), default=1,
                   help="hour: baseline seeds trained at a time once the hour's epochs are "
                   "timed, each on cores/jobs threads (1)")  # fmt: skip
    p.add_argument(
        "--storage",
        metavar="URL",
        help=f"hour: the bench store (${STORAGE_VARIABLE}, else {DEFAULT_STORAGE}); read: the "
        "one store to time (the committed ones)",
    )
    p.add_argument("--out", help="hour: where the tables go (results/runs/bench)")
    p.add_argument("--pruners", default="median,hyperband",
                   help="pruners: the pruners side by side (median,hyperband)")  # fmt: skip
    p.set_defaults(func=cmd_bench)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="unpack and check a dataset (FashionMNIST, MNIST)")
    p.add_argument("dataset", choices=list(IMAGE_DATASETS))
    p.add_argument(
        "--data-dir",
        help="directory with the IDX files (default $STUDY_DATA_DIR or ~/.cache/study/data)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fall back to torchvision's download when the files are missing",
    )
    p.set_defaults(func=cmd_data)


def build_parser(name: str | None = None) -> argparse.ArgumentParser:
    """The `study` command; `name` (the study given to `study run`, when known) sets the
    defaults its help shows."""
    parser = _Parser(prog="study", description="Optuna studies over PyTorch trainings.")
    parser.add_argument("--version", action="version", version=f"study {_version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_run(sub, name)
    _add_readers(sub)
    _add_predict(sub)
    _add_frontier(sub)
    _add_records(sub)
    _add_store_commands(sub)
    _add_bench(sub)
    _add_data(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("study")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _study_of_run(argv: list[str]) -> str | None:
    """The study named on a `study run` command line, before parsing (for its help)."""
    if not argv or argv[0] != "run":
        return None
    if "--space" in argv[:-1]:
        return argv[argv.index("--space") + 1]
    return next((a for a in argv[1:] if a in search_spaces.names()), None)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the command and its subcommands."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= _flags(child)
    return found


def _user_line(error: StudyError, parser: argparse.ArgumentParser) -> str:
    """The error's line, naming the flag where the error is about one field that has one."""
    text = str(error)
    field = getattr(error, "field", None)
    flag = "--" + field.replace("_", "-") if field else None
    if flag and text.startswith(f"{field}:") and flag in _flags(parser):
        text = flag + text[len(field) :]
    return f"study: error: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_study_of_run(argv))
    args = parser.parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # a reader that has gone is noticed here, not at exit
    except BrokenPipeError:  # `study best ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + signal.SIGPIPE
    except StudyError as error:
        print(_user_line(error, parser), file=sys.stderr)
        return 2
    except KeyboardInterrupt as stopped:
        if _ending_the_process:  # a further Ctrl-C cannot cut the one line short
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        line, status = interrupt.ending(stopped)
        print(line, file=sys.stderr, flush=True)
        return status
    except Exception as error:
        failure = storage_failure(error, getattr(args, "storage", None))
        if failure is None:
            raise  # a bug: keep its traceback
        print(f"study: error: {failure}", file=sys.stderr)
        return 2
    return 0


_ending_the_process = False


def _shares_resources() -> bool:
    """Whether this process made semaphores or queues for worker processes (the recheck's,
    `--workers`): those are released in the interpreter's teardown, which then must run."""
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    started = getattr(getattr(tracker, "_resource_tracker", None), "_fd", None) is not None
    children = sys.modules.get("multiprocessing")
    return started or bool(children and children.active_children())


def entry() -> None:
    """The `study` command: `main`, then exit with its status."""
    global _ending_the_process
    _ending_the_process = True
    status = main()
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM) and not _shares_resources():
        # a stop: every write is committed and its line said; the interpreter's teardown of a
        # large run (thousands of trials in memory, torch) would take up to a second more
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
