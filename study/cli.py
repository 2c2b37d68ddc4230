"""The `study` command: the single list of subcommands. Thin: parse, call, print.

User errors (`StudyError`) print one line `study: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from search_spaces import SPACES, get_space
from study import interrupt
from study.choices import SAMPLERS
from study.config import IMAGE_DATASETS, MAX_SEEDS, SETTINGS_OF_KIND, field_docs
from study.errors import ConfigError, StudyError
from study.storage import DEFAULT_STORAGE, default_out, redact, storage_failure
from study.studies import KINDS, PLURALS


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


_positive_int = _bounded_int(1, 10**9)


def _int_list(text: str, minimum: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 8,16,32, got {text!r}") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def _seed_list(text: str) -> tuple[int, ...]:
    return _int_list(text, minimum=0)


def _study_choices() -> list[str]:
    return list(SPACES)


def _flag_type(annotation: str) -> tuple[Any, str]:
    """How a settings field is parsed on the command line (its dataclass validates the value),
    and its metavar."""
    if "tuple" in annotation:
        return _int_list, "N,N,..."
    return {"int": (int, "N"), "float": (float, "X"), "str": (str, "TEXT")}[annotation]


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_settings_flags(parser: argparse.ArgumentParser, name: str | None) -> None:
    """One flag per field of every settings dataclass, generated from the fields: the field's
    docstring is the help, with the default of study `name` (when known) or the kinds of study
    it applies to. Every flag defaults to None, so that only what the user gives overrides."""
    chosen = get_space(name) if name in SPACES else None
    defaults = chosen.base_settings() if chosen is not None else None
    kinds_of: dict[str, list[str]] = {}
    for kind, cls in SETTINGS_OF_KIND.items():
        for f in fields(cls):
            kinds_of.setdefault(f.name, []).append(kind)
    group = parser.add_argument_group(
        "fixed settings of the study" + (f" (defaults of {name})" if chosen else ""),
        "stored with the study; a resumed study must be run with the same ones",
    )
    for field_name, kinds in kinds_of.items():
        kind = chosen.KIND if chosen is not None and chosen.KIND in kinds else kinds[0]
        cls = SETTINGS_OF_KIND[kind]
        f = next(f for f in fields(cls) if f.name == field_name)
        doc = field_docs(cls)[field_name]
        if chosen is not None and chosen.KIND in kinds:
            doc += f" [default: {_shown(getattr(defaults, field_name))}]"
        elif len(kinds) < len(SETTINGS_OF_KIND):
            doc += f" [{PLURALS[kinds[0]]} only]"
        flag = "--" + field_name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif field_name == "dataset":
            group.add_argument(flag, choices=list(IMAGE_DATASETS), default=None, help=doc)
        else:
            parse, metavar = _flag_type(f.type)
            group.add_argument(flag, type=parse, metavar=metavar, default=None, help=doc)


RUN_OPTIONS_OF_KIND = {"population": "boolean", "data_dir": "image"}
"""`study run` options that are not settings but apply to one kind of study only."""


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave for study `args.name`; a flag that does not apply to its
    kind is refused in one line that names the kind."""
    kind = get_space(args.name).KIND
    own = {f.name for f in fields(SETTINGS_OF_KIND[kind])}
    given = {
        f.name
        for cls in SETTINGS_OF_KIND.values()
        for f in fields(cls)
        if getattr(args, f.name) is not None
    }
    given |= {k for k in RUN_OPTIONS_OF_KIND if getattr(args, k) is not None}
    for key in sorted(given):
        if key not in own and RUN_OPTIONS_OF_KIND.get(key) != kind:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{flag} does not apply to {args.name}, {KINDS[kind]}; it is for "
                f"{PLURALS['image' if kind == 'boolean' else 'boolean']}"
            )
    return {key: getattr(args, key) for key in own if getattr(args, key) is not None}


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help=f"Optuna storage URL (default {DEFAULT_STORAGE}; PostgreSQL for many machines)",
    )


def _command_line() -> str:
    """This command as typed, with any storage password hidden: it goes into reports."""
    shown = []
    for argument in sys.argv[1:]:
        flag, equals, value = argument.partition("=")
        if "://" in argument:
            argument = f"{flag}={redact(value)}" if equals and "://" in value else redact(argument)
        shown.append(shlex.quote(argument))
    return " ".join(["study", *shown])


def _out_dir(given: str | None, name: str) -> Path:
    """Where a command writes: --out, else results/runs/NAME; one line if it cannot be."""
    out = Path(given) if given else default_out(name)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out: cannot create {out} ({error.strerror})") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out: {out} is not writable")
    return out


def cmd_run(args: argparse.Namespace) -> None:
    from study.report import write_report
    from study.runner import best_feasible, run_study

    overrides = settings_overrides(args)
    kind = get_space(args.name).KIND
    study = run_study(
        args.name,
        trials=args.trials,
        storage=args.storage,
        study_name=args.study_name,
        sampler_seed=args.sampler_seed,
        device=args.device,
        settings=overrides,
        progress=not args.quiet,
        population=args.population,
        workers=args.workers,
        data_dir=args.data_dir,
        timeout=args.timeout,
        sampler=args.sampler,
        pruner=args.pruner,
    )
    best = best_feasible(study)
    if best is None:
        nothing = "no configuration learned f yet" if kind == "boolean" else "no complete trial"
        print(f"{study.study_name}: {nothing}")
    elif kind == "image":
        from study.config import ImageCandidate

        described = ImageCandidate.from_dict(best.user_attrs["config"]).describe()
        print(
            f"{study.study_name}: best validation accuracy {best.value:.4f} "
            f"(trial {best.number}, {best.user_attrs['parameters']} parameters): {described}"
        )
    else:
        a = best.user_attrs
        print(
            f"{study.study_name}: smallest feasible: {a['neurons']} hidden neurons "
            f"{a['hidden_layer_profile']} ({a['parameters']} parameters), trial {best.number}"
        )
    if args.report:
        out = _out_dir(args.report_dir, study.study_name)
        write_report(study.study_name, args.storage, out, _command_line())
        print(f"report: {out}/summary.md")


def cmd_report(args: argparse.Namespace) -> None:
    from study.report import write_report
    from study.studies import load

    load(args.name, args.storage)  # one line for a missing store or study, before --out
    out = write_report(args.name, args.storage, _out_dir(args.out, args.name), _command_line())
    print(f"report: {out}/summary.md")


def cmd_export(args: argparse.Namespace) -> None:
    from study.export import export_model
    from study.studies import load

    load(args.name, args.storage, kind="image", command="export")  # before --out is made
    done = export_model(
        args.name,
        args.storage,
        _out_dir(args.out, args.name),
        args.device,
        args.data_dir,
        _command_line(),
    )
    print(
        f"{args.name}: test accuracy {done.test_accuracy:.4f} (validation in the search "
        f"{done.validation_accuracy:.4f}), retrained in {done.seconds:.0f} s; "
        f"saved to {done.directory}/"
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
    from study.overview import format_list, list_studies

    print(format_list(list_studies(args.storage)))


def cmd_best(args: argparse.Namespace) -> None:
    import json

    from study.overview import best_of

    record = best_of(args.name, args.storage)
    if args.json:
        print(json.dumps(record, indent=1, default=str))
        return
    best = record.get("best") or record.get("answer")
    print(f"{args.name} ({record['kind']}):")
    for key, value in (best or {}).items():
        print(f"  {key}: {value}")
    for key in ("certified", "export"):
        if record.get(key):
            print(f"  {key}: {record[key]}")


def cmd_dashboard(args: argparse.Namespace) -> None:
    from study.storage import artifact_store, open_storage

    storage = open_storage(args.storage, heartbeat=False)  # one clear line for a bad store
    try:
        from optuna_dashboard import run_server
    except ModuleNotFoundError:
        raise StudyError("dashboard: optuna-dashboard is not installed; pip install it") from None
    print(
        f"optuna-dashboard for {redact(args.storage)} on http://{args.host}:{args.port}/ "
        "(Ctrl-C stops)"
    )
    sys.stdout.flush()
    try:
        run_server(
            storage, host=args.host, port=args.port, artifact_store=artifact_store(args.storage)
        )
    except OSError as error:
        raise StudyError(
            f"dashboard: cannot listen on {args.host}:{args.port} ({error})"
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


def cmd_frontier(args: argparse.Namespace) -> None:
    from study.frontier import Cell, Plan, run_cell

    if args.action == "report":
        from study.report_frontier import write_frontier_report

        out = _out_dir(args.out, "frontier")
        answers = Path(args.answers) if args.answers else out / "answers.json"
        write_frontier_report(args.storage, out, answers, _command_line())
        print(f"report: {out}/summary.md; answers: {answers}")
        return
    plan = Plan(
        recipe_trials=args.recipe_trials,
        recipe_seeds=args.recipe_seeds,
        selection_seeds=args.selection_seeds,
        heldout_seeds=args.heldout_seeds,
        probe_neurons=args.probe,
    )
    log = (lambda *_: None) if args.quiet else print
    for budget in args.budgets:
        for depth in args.depths:
            for function_seed in args.function_seeds:
                cell = Cell(function_seed, depth, budget)
                answer = run_cell(args.storage, cell, plan, args.threads, log)
                print(
                    f"{cell.name}: {answer['neurons']} neurons {answer['profile']} "
                    f"({answer['parameters']} parameters), held-out "
                    f"{answer['heldout_successes']}/{answer['heldout_seeds']} "
                    f"(95% {answer['interval_95'][0]:.2f}..{answer['interval_95'][1]:.2f})"
                )


def cmd_bench(args: argparse.Namespace) -> None:
    from study.bench import bench_boolean, bench_long, bench_pruners, bench_step, bench_trainer

    if args.what == "trainer":
        bench_trainer(args.data_dir, args.device, repeats=args.repeats)
    elif args.what == "boolean":
        bench_boolean(trials=args.trials, epochs=args.epochs or 250, device_name=args.device)
    elif args.what == "pruners":
        bench_pruners(minutes=args.minutes, repeats=args.repeats, data_dir=args.data_dir)
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one `--help` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(name: str | None = None) -> argparse.ArgumentParser:
    """The `study` command; `name` (the study given to `study run`, when known) sets the
    defaults its help shows."""
    parser = _Parser(prog="study", description="Optuna studies over PyTorch trainings.")
    parser.add_argument("--version", action="version", version=f"study {_version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    p = sub.add_parser(
        "run",
        help="create or resume a study and run it to N trials in total",
        allow_abbrev=False,
    )
    p.add_argument(
        "name",
        choices=_study_choices(),
        metavar="NAME",
        help=f"the study: {', '.join(_study_choices())}",
    )
    p.add_argument(
        "--trials",
        type=_positive_int,
        required=True,
        help="total number of trials the study should have (resumes count)",
    )
    _add_storage(p)
    p.add_argument("--study-name", help="name in the storage (default: NAME)")
    p.add_argument("--sampler-seed", type=int, help="seed of the sampler")
    p.add_argument(
        "--sampler",
        choices=list(SAMPLERS),
        help="Optuna's sampler (tpe); stored with the study",
    )
    p.add_argument(
        "--pruner",
        help="image studies: median (default), hyperband, successive-halving or none; Boolean "
        "studies: target-unreachable (default) or none; stored with the study",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="time budget of this run: no trial starts after it, a running one stops at its "
        "next epoch and is re-queued for the next run",
    )
    p.add_argument(
        "--population",
        type=_positive_int,
        metavar="K",
        help="Boolean studies: ask K trials at once and train them (with their seeds) as one "
        "population",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="N processes on the same storage (one per GPU when several are visible)",
    )
    p.add_argument("--data-dir", help="image studies: directory with the IDX files")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", action="store_true", help="write the report afterwards")
    p.add_argument("--report-dir", help="where --report writes (default results/runs/NAME)")
    add_settings_flags(p, name)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write trials.csv, summary.md and figures of a study")
    p.add_argument("name", help="study name in the storage")
    _add_storage(p)
    p.add_argument("--out", help="output directory (default results/runs/NAME)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "export", help="retrain an image study's best configuration, test it once, save it"
    )
    p.add_argument("name", help="study name in the storage")
    _add_storage(p)
    p.add_argument("--out", help="output directory (default results/runs/NAME)")
    p.add_argument("--data-dir", help="directory with the IDX files")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_export)

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

    p = sub.add_parser("certify", help="retrain the smallest feasible width on fresh seeds")
    p.add_argument("name", help="study name in the storage")
    _add_storage(p)
    p.add_argument(
        "--seeds", type=_bounded_int(1, MAX_SEEDS), default=10, help="fresh seeds per config"
    )
    p.add_argument(
        "--top",
        type=_bounded_int(1, 1000),
        default=1,
        help="also retrain the next smallest feasible configurations (TOP in all)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output directory (default results/runs/NAME)")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser(
        "frontier",
        help="the budget frontier: fewest neurons per epoch budget and depth, held-out certified",
    )
    p.add_argument("action", choices=["run", "report"], help="run (resumes) or report")
    _add_storage(p)
    p.add_argument("--function-seeds", type=_seed_list, default=(0,), help="functions (0)")
    p.add_argument("--depths", type=_int_list, default=(1, 2, 3, 4), help="hidden layers")
    p.add_argument(
        "--budgets",
        type=_int_list,
        default=(500, 2000, 8000, 16000),
        help="epoch budgets (500,2000,8000,16000)",
    )
    p.add_argument("--recipe-trials", type=_bounded_int(1, 1000), default=16)
    p.add_argument("--recipe-seeds", type=_bounded_int(1, 100), default=4)
    p.add_argument("--selection-seeds", type=_bounded_int(1, 1000), default=10)
    p.add_argument("--heldout-seeds", type=_bounded_int(20, 10_000), default=24)
    p.add_argument("--probe", type=_bounded_int(1, 512), help="probe width of the recipe search")
    p.add_argument("--threads", type=_bounded_int(1, 1024), help="CPU threads (all cores)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", help="report: directory (default results/runs/frontier)")
    p.add_argument("--answers", help="report: answers file (default OUT/answers.json)")
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser("list", help="the studies in a store: kind, trials by state, best value")
    _add_storage(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("best", help="the best or certified configuration of a study")
    p.add_argument("name", help="study name in the storage")
    _add_storage(p)
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("dashboard", help="browse a storage's studies in optuna-dashboard")
    _add_storage(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=_bounded_int(1, 65535), default=8080, help="port (8080)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    p.add_argument(
        "what",
        choices=["trainer", "boolean", "long", "step", "pruners"],
        help="trainer: tutorial pipeline vs trainer (FashionMNIST MLP); boolean: tutorial "
        "loop vs sequential vs population trainer; long: the long-budget workload "
        "(member-epochs per second, memory per 1,000 members); step: the candidates for a "
        "population step (eager, torch.compile, native kernel); pruners: median against "
        "hyperband for fashion-mlp under one time budget",
    )
    p.add_argument("--data-dir", help="directory with the FashionMNIST IDX files")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--repeats",
        type=_bounded_int(1, 100),
        default=3,
        help="trainer: timed epochs (3); pruners: repetitions",
    )
    p.add_argument(
        "--trials", type=_bounded_int(1, 4096), default=32, help="boolean: configurations"
    )
    p.add_argument(
        "--epochs",
        type=_bounded_int(1, 10**6),
        help="boolean: epochs each (250); long: epochs (4000)",
    )
    p.add_argument(
        "--members", type=_bounded_int(1, 100_000), default=64, help="long: members (64)"
    )
    p.add_argument("--minutes", type=float, default=15.0, help="pruners: minutes per study")
    p.set_defaults(func=cmd_bench)

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
    return next((a for a in argv[1:] if a in SPACES), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_study_of_run(argv))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except StudyError as error:
        print(f"study: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stopped:
        if _ending_the_process:  # a further Ctrl-C cannot cut the one line short
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        print(f"study: {stopped or 'interrupted'}", file=sys.stderr, flush=True)
        return interrupt.exit_status(stopped)
    except Exception as error:
        failure = storage_failure(error, getattr(args, "storage", None))
        if failure is None:
            raise  # a bug: keep its traceback
        print(f"study: error: {failure}", file=sys.stderr)
        return 2
    return 0


_ending_the_process = False


def entry() -> None:
    """The `study` command: `main`, then exit with its status."""
    global _ending_the_process
    _ending_the_process = True
    sys.exit(main())


if __name__ == "__main__":
    entry()
