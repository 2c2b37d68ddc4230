"""The structure the rest relies on: no import cycles, one place that knows a study's kind and
settings, and `study run` flags generated from the settings dataclasses."""

import ast
from dataclasses import fields
from pathlib import Path

import optuna
import pytest

from search_spaces import builtin, get_space
from study.cli import build_parser, settings_overrides
from study.config import SETTINGS_OF_KIND, BooleanSettings, ImageSettings, field_docs
from study.errors import ConfigError
from study.runner import run_study, study_settings
from study.studies import describe, load
from tests.conftest import TINY, cli

ROOT = Path(__file__).resolve().parent.parent


def project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth, lazy imports included)."""
    modules = {}
    for package in ("study", "search_spaces"):
        for path in (ROOT / package).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:  # `from study import device`: the module study.device
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles_in_the_packages():
    graph = project_imports()
    assert {"study.population", "study.boolean_trial", "study.report_image"} <= set(graph)
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # configuration does not import the training engine; the trainer knows nothing of Optuna
    assert "study.trainer" not in graph["study.config"]
    assert not any(m.startswith("study.") and "objective" in m for m in graph["study.trainer"])


@pytest.mark.parametrize("kind", sorted(SETTINGS_OF_KIND))
def test_every_setting_has_a_one_line_docstring_and_a_flag(kind):
    cls = SETTINGS_OF_KIND[kind]
    docs = field_docs(cls)
    assert set(docs) == {f.name for f in fields(cls)}
    assert all(doc and "\n" not in doc for doc in docs.values())
    parser = build_parser("boolean-shallow" if kind == "boolean" else "fashion-mlp")
    run = parser._subparsers._group_actions[0].choices["run"]
    flags = {option for action in run._actions for option in action.option_strings}
    for f in fields(cls):
        assert "--" + f.name.replace("_", "-") in flags, f.name


@pytest.mark.parametrize(
    ("name", "flag", "default"),
    [
        ("boolean-deep", "--max-width", "[default: 128]"),
        ("boolean-deep", "--min-layers", "[default: 2]"),
        ("boolean-shallow", "--max-width", "[default: 256]"),
        ("fashion-cnn", "--max-epochs", "[default: 18]"),
        ("fashion-mlp", "--min-epochs", "[default: 3]"),
    ],
)
def test_run_help_shows_the_chosen_studys_defaults(name, flag, default):
    done = cli("run", name, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    start = text.index(f"{flag} N ")
    end = text.find(" --", start + len(flag))  # the next flag's entry
    assert default in text[start : end if end > 0 else None]


def test_flags_map_to_the_settings_fields():
    args = build_parser("boolean-shallow").parse_args(
        [
            "run",
            "boolean-shallow",
            "--trials",
            "1",
            "--max-width",
            "9",
            "--no-prune",
            "--batch-sizes",
            "8,16",
            "--function-seed",
            "4",
        ]
    )
    assert settings_overrides(args, "boolean") == {
        "max_width": 9,
        "prune": False,
        "batch_sizes": (8, 16),
        "function_seed": 4,
    }
    settings = study_settings("boolean-shallow", settings_overrides(args, "boolean"))
    assert settings == BooleanSettings(max_width=9, prune=False, batch_sizes=(8, 16),
                                       function_seed=4)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["boolean-shallow", "--dataset", "mnist"],
            "--dataset does not apply to boolean-shallow, a Boolean width study",
        ),
        (["boolean-deep", "--data-dir", "x"], "--data-dir does not apply to boolean-deep"),
        (
            ["fashion-mlp", "--population", "4"],
            "--population does not apply to fashion-mlp, an image study",
        ),
        (["fashion-cnn", "--max-width", "8"], "--max-width does not apply to fashion-cnn"),
    ],
)
def test_a_flag_of_another_kind_is_refused_in_one_line(tmp_path, args, named):
    db = tmp_path / "s.db"
    done = cli("run", args[0], "--trials", "1", "--storage", f"sqlite:///{db}", *args[1:])
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and named in done.stderr, done.stderr
    assert not db.exists()


def test_describe_gives_the_typed_settings_of_new_and_old_stores(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = run_study("boolean-shallow", trials=1, storage=storage, device="cpu",
                      settings=TINY, quiet=True)  # fmt: skip
    info = describe(study)
    assert (info.space, info.kind) == ("boolean-shallow", "boolean")
    assert info.settings == study_settings("boolean-shallow", TINY)
    assert isinstance(info.settings, BooleanSettings)
    # a store written before the `space` attribute: the space's name under `kind`
    old = optuna.create_study(storage=storage, study_name="old-cnn")
    old.set_user_attr("kind", "fashion-cnn")
    old.set_user_attr("settings", get_space("fashion-cnn").base_settings().identity())
    info = describe(old)
    assert (info.space, info.kind) == ("fashion-cnn", "image")
    assert info.settings == ImageSettings(min_epochs=3, max_epochs=18)
    # every space declares a kind that has a settings class
    assert {get_space(n).KIND for n in builtin()} == set(SETTINGS_OF_KIND)


def test_commands_of_the_other_kind_say_what_the_study_is(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_study("boolean-shallow", trials=1, storage=storage, device="cpu", settings=TINY,
              quiet=True)  # fmt: skip
    image = optuna.create_study(storage=storage, study_name="images")
    image.set_user_attr("space", "fashion-mlp")
    image.set_user_attr("kind", "image")
    image.set_user_attr("settings", ImageSettings().identity())
    done = cli("certify", "images", "--storage", storage)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "is an image study (fashion-mlp)" in done.stderr and "study export" in done.stderr
    done = cli("export", "boolean-shallow", "--storage", storage)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "is a Boolean width study (boolean-shallow)" in done.stderr
    assert "study certify" in done.stderr
    with pytest.raises(ConfigError, match="not a Boolean width study"):
        load("images", storage, kind="boolean", command="certify")


# ----------------------------------------------------------------------------------------------
# a clean tree, one home per rule, flags from the dataclasses

TOP_LEVEL = {
    ".ci", ".gitignore", "Makefile", "README.md", "notebooks", "pyproject.toml", "results",
    "search_spaces", "study", "tests",
}  # fmt: skip
"""The fixed layout: nothing else is tracked at the top level (no data sets, no stores)."""
MAX_TRACKED_BYTES = 5 * 2**20


def tracked_files() -> list[str]:
    import subprocess

    done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    return [name for name in done.stdout.split("\0") if name]


def test_the_top_level_is_the_fixed_layout_and_no_big_file_is_tracked():
    files = tracked_files()
    assert {name.split("/")[0] for name in files} <= TOP_LEVEL
    big = [
        name
        for name in files
        if not name.startswith("results/")
        and (ROOT / name).is_file()
        and (ROOT / name).stat().st_size > MAX_TRACKED_BYTES
    ]
    assert big == []


def test_git_ignores_what_runs_and_installs_leave_behind(tmp_path):
    """In a fresh repository with the project's .gitignore: a virtual environment (a directory
    or a symlink to one), scratch stores and caches are ignored."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    (repo / ".venv").symlink_to(tmp_path)  # a venv kept elsewhere, linked in
    (repo / "results" / "runs").mkdir(parents=True)
    shutil.copy(ROOT / "results" / "runs" / ".gitignore", repo / "results" / "runs")
    left = [".venv", "data/x", "results/runs/studies.db", "results/reference.db-journal",
            "results/reference.db.lock", "study/__pycache__/x.pyc"]  # fmt: skip
    done = subprocess.run(["git", "check-ignore", "--no-index", *left], cwd=repo,
                          capture_output=True, text=True)  # fmt: skip
    assert set(done.stdout.split()) == set(left)


def test_run_options_plan_and_grid_are_flags():
    from study.config import FrontierGrid, FrontierPlan, RunOptions

    parser = build_parser("boolean-shallow")
    sub = parser._subparsers._group_actions[0].choices
    run_flags = {o for a in sub["run"]._actions for o in a.option_strings}
    frontier = sub["frontier"]._subparsers._group_actions[0].choices["run"]
    frontier_flags = {o for a in frontier._actions for o in a.option_strings}
    for cls, flags in ((RunOptions, run_flags), (FrontierPlan, frontier_flags),
                       (FrontierGrid, frontier_flags)):  # fmt: skip
        docs = field_docs(cls)
        for f in fields(cls):
            if (cls, f.name) == (FrontierPlan, "method"):  # the code's, not the user's
                assert "--method" not in flags
                continue
            assert "--" + f.name.replace("_", "-") in flags, f.name
            assert docs[f.name] and "\n" not in docs[f.name], f.name
    args = parser.parse_args(["run", "boolean-shallow", "--trials", "3", "--population", "4",
                              "--timeout", "9.5", "--quiet"])  # fmt: skip
    from study.cli import given

    assert RunOptions.from_dict(given(args, RunOptions)) == RunOptions(
        trials=3, population=4, timeout=9.5, quiet=True
    )


def test_run_study_takes_options_or_their_fields(tmp_path):
    from study.config import RunOptions

    storage = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(ConfigError, match="progress: unknown run option"):
        run_study("boolean-shallow", TINY, trials=1, storage=storage, progress=False)
    with pytest.raises(ConfigError, match="trials: must be"):
        run_study("boolean-shallow", TINY, trials=0, storage=storage)
    options = RunOptions(trials=1, storage=storage, device="cpu", quiet=True)
    study = run_study("boolean-shallow", TINY, options)
    assert len(study.trials) == 1
    assert not (tmp_path / "s.db").with_suffix(".db.journal").exists()


def test_a_field_error_names_its_flag_on_the_command_line(tmp_path):
    done = cli("run", "boolean-shallow", "--trials", "2", "--min-width", "20", "--max-width",
               "10", "--storage", f"sqlite:///{tmp_path / 'x.db'}")  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("study: error: --max-width: must be an integer from")
    done = cli("frontier", "run", "--required-rate", "1.5")
    assert done.returncode == 2 and "--required-rate: must be in (0, 1]" in done.stderr


def test_reports_draw_without_pyplot_or_a_backend_switch(tmp_path):
    """Figures are drawn on bare matplotlib Figures: writing a report imports no pyplot and
    leaves the process's backend as it was (a notebook keeps its inline plots)."""
    import subprocess
    import sys

    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_study("boolean-shallow", TINY, trials=2, storage=storage, device="cpu", quiet=True)
    script = (
        "import sys, matplotlib; matplotlib.use('svg'); "
        "from study.report import write_report; from study.report_frontier import "
        "write_frontier_report; from pathlib import Path; "
        f"write_report('boolean-shallow', {storage!r}, Path({str(tmp_path / 'r')!r})); "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
        "assert 'matplotlib.pyplot' not in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
    assert (tmp_path / "r" / "neurons_vs_loss.png").stat().st_size > 10_000


def test_reading_answers_imports_neither_torch_nor_the_frontier_engine():
    """`study list`, `study best`, the reports and the notebooks read a cell's answer through
    study.answers: JSON-like types, with no torch and no training engine behind them."""
    import subprocess
    import sys

    script = (
        "import sys; import study.answers, study.probe, study.overview, study.report_frontier, "
        "study.studies; print(sorted(m for m in ('torch', 'study.frontier', 'study.trainer', "
        "'study.boolean_trial') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_run_finds_its_space_and_opens_its_store_once(tmp_path, monkeypatch):
    """`study run` of a stored study: the space is looked up once, the store opened once and
    the study loaded once before its trials run, and the results passed down (whether a store
    exists is asked by opening it: `storage.existing_store`, the same on PostgreSQL)."""
    import search_spaces
    from study import runner, studies
    from study import storage as storage_module

    calls: list[str] = []

    def counted(owner, name):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(name) or original(*a, **k))

    storage = f"sqlite:///{tmp_path / 'w.db'}"
    settings = {**TINY, "max_epochs": 50}
    run_study("boolean-shallow", settings, storage=storage, trials=1, device="cpu", quiet=True)
    for owner, name in ((runner, "get_space"), (studies, "get_space"),
                        (search_spaces, "from_source"), (search_spaces, "get_space"),
                        (runner, "open_storage"), (storage_module, "open_storage"),
                        (optuna, "load_study")):  # fmt: skip
        counted(owner, name)
    study = run_study("boolean-shallow", settings, storage=storage, trials=2, device="cpu",
                      quiet=True)  # fmt: skip
    assert len(study.trials) == 2
    assert sorted(calls) == ["get_space", "load_study", "open_storage"], calls


def test_the_readme_layout_names_every_module_of_the_package():
    import re

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    layout = readme[
        readme.index("study/            the package") : readme.index("search_spaces/    one")
    ]
    named = set(re.findall(r"[a-z_]+", layout))
    modules = {p.stem for p in (root / "study").glob("*.py") if p.stem != "__init__"}
    assert modules - named == set(), "not in the README's layout"


def test_the_help_of_study_run_states_the_defaults_the_code_applies():
    """The sampler, pruner and fidelity defaults `study run --help` states (each field's
    docstring) are those the code applies, and every choice is listed."""
    import re

    from study import choices, runner
    from study.config import RunOptions, field_docs

    docs = field_docs(RunOptions)
    assert re.search(r"(\w+) \(the default\)", docs["sampler"]).group(1) == choices.DEFAULT_SAMPLER
    image, boolean = docs["pruner"].split("Boolean studies:")
    for kind, text in (("image", image), ("boolean", boolean)):
        stated = re.search(r"([\w-]+) \(default\)", text).group(1)
        assert stated == choices.DEFAULT_PRUNERS[kind], kind
        assert all(p in text for p in choices.pruners_for(kind)), kind
    assert all(s in docs["sampler"] for s in choices.SAMPLERS)
    # fidelity: plan with --timeout, fixed without, as runner._fidelity chooses
    assert "plan (the default with --timeout" in docs["fidelity"]
    assert "the default without --timeout" in docs["fidelity"].split("fixed", 1)[1]
    for timeout, expected in ((60.0, "plan"), (None, "fixed")):
        chosen: dict = {"pruner": choices.DEFAULT_PRUNERS["image"]}
        runner._fidelity(chosen, RunOptions(trials=1, timeout=timeout), "s")
        assert chosen["fidelity"] == expected


def test_every_commands_help_renders():
    """`--help` of every command and action formats (a field docstring with a per cent sign
    once broke argparse's formatting of `study frontier run --help`)."""
    import argparse

    from study.cli import build_parser

    def walk(parser, path):
        text = parser.format_help()
        assert text.startswith("usage:"), path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))
        yield path

    paths = list(walk(build_parser(), ("study",)))
    assert ("study", "frontier", "run") in paths and len(paths) >= 20
