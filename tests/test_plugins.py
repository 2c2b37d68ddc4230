"""Your own studies: a space file run with --space (the README's example, exactly), a new file
in search_spaces/, an installed package's entry point, `run_study(module)`; the store finds the
space again; spaces that break the contract are one line. And one store everywhere:
$STUDY_STORAGE, the default store made wherever the command runs."""

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

import search_spaces
from study.cli import main
from study.errors import ConfigError
from study.studies import stored_attrs
from tests.conftest import TINY_ARGS, cli

ROOT = Path(__file__).resolve().parent.parent

SPACE = """
from study.config import BooleanCandidate, BooleanSettings

NAME = "{name}"
KIND = "boolean"


def base_settings():
    return BooleanSettings(input_bits=3, output_bits=3, max_width=8, max_epochs=300, seeds=2,
                           min_learning_rate=0.05, max_learning_rate=0.2)


def suggest(trial, settings):
    width = trial.suggest_int("units", settings.min_width, settings.max_width)
    rate = trial.suggest_float("rate", settings.min_learning_rate, settings.max_learning_rate)
    return BooleanCandidate((width,), rate, batch_size=8, epochs=settings.max_epochs)
"""


def readme_section(heading: str = "## Your own study") -> tuple[str, str, list[str]]:
    """The README's own study under `heading`: (file name, its code, the commands)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    name = code.splitlines()[0].removeprefix("# ").strip()
    lines = [line.split("  #", 1)[0].strip() for line in commands.splitlines() if line.strip()]
    return name, code, lines


@pytest.mark.slow
def test_the_readmes_own_study_runs_as_written(tmp_path):
    """The README's file and commands, verbatim, in a directory outside the repository; then
    the commands that read it find its space through the store, in fresh processes."""
    name, code, commands = readme_section()
    (tmp_path / name).write_text(code)
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "study"
        done = cli(*argv[1:], cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr)
    summary = (tmp_path / "my-width" / "summary.md").read_text()
    assert "searched: width 1..24, learning_rate 0.01..0.1 (log)" in summary  # the space's own
    assert "as trained: 1 hidden layer; batch 16; 400 epochs" in summary  # the batch it fixes
    storage = "sqlite:///my.db"
    study = optuna.load_study(study_name="my-width", storage=f"sqlite:///{tmp_path / 'my.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 12
    assert stored_attrs(study)["space_source"] == {"file": str((tmp_path / name).resolve())}
    best = cli("best", "my-width", "--storage", storage, "--json", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    listed = cli("list", "--storage", storage, cwd=tmp_path)
    assert "my-width" in listed.stdout, listed.stderr
    # resumed by name alone: the store says where its space came from
    more = cli("run", "my-width", "--trials", "13", "--storage", storage, "--quiet",
               cwd=tmp_path)  # fmt: skip
    assert more.returncode == 0, more.stderr
    study = optuna.load_study(study_name="my-width", storage=f"sqlite:///{tmp_path / 'my.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 13
    # a file that is gone is said in one line
    (tmp_path / name).unlink()
    gone = cli("run", "my-width", "--trials", "14", "--storage", storage, cwd=tmp_path)
    assert gone.returncode == 2 and "no longer exists" in gone.stderr, gone.stderr


def test_a_new_file_in_search_spaces_is_a_new_study(tmp_path, monkeypatch):
    (tmp_path / "probe_width.py").write_text(SPACE.format(name="probe-width"))
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "search_spaces.probe_width", raising=False)
    assert "probe-width" in search_spaces.names()
    assert search_spaces.get_space("probe-width").NAME == "probe-width"
    storage = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["run", "probe-width", "--trials", "2", "--storage", storage, "--quiet",
                 "--device", "cpu"]) in (0, None)  # fmt: skip
    study = optuna.load_study(study_name="probe-width", storage=storage)
    assert stored_attrs(study)["space_source"] == {"module": "search_spaces.probe_width"}
    assert {"units", "rate"} <= set(study.trials[0].params)


def test_a_boolean_report_describes_the_space_that_ran_not_the_defaults(tmp_path, monkeypatch):
    """A space of one's own that fixes two hidden layers and the batch: the report's Budget
    section says what was searched and trained (from the stored distributions and recipes),
    never the built-in space's ranges of layers or batch sizes."""
    code = SPACE.format(name="two-layer").replace(
        "BooleanCandidate((width,), rate,", "BooleanCandidate((width, 3), rate,"
    )
    (tmp_path / "two_layer.py").write_text(code)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["run", "--space", str(tmp_path / "two_layer.py"), "--trials", "3",
                 "--storage", storage, "--quiet", "--device", "cpu"]) in (0, None)  # fmt: skip
    assert main(["report", "two-layer", "--storage", storage, "--out", str(tmp_path / "r")]) in (
        0, None)  # fmt: skip
    budget = (tmp_path / "r" / "summary.md").read_text().split("## Budget", 1)[1]
    budget = budget.split("\n## ", 1)[0]
    assert "searched: units 1..8, rate 0.05..0.2" in budget, budget
    assert "as trained: 2 hidden layers; batch 8; 300 epochs; schedule constant" in budget
    assert "batch sizes" not in budget and "1..1 hidden" not in budget


def test_this_packages_spaces_are_found_by_their_file_names():
    assert set(search_spaces.builtin()) >= {
        "boolean-shallow", "boolean-deep", "fashion-mlp", "fashion-cnn"}  # fmt: skip
    assert "-training" not in search_spaces.names()  # modules starting with _ are helpers


@pytest.mark.slow
def test_an_installed_packages_space_comes_through_its_entry_point(tmp_path):
    site = tmp_path / "site"
    (site / "ep_spaces").mkdir(parents=True)
    (site / "ep_spaces" / "__init__.py").write_text("")
    (site / "ep_spaces" / "width.py").write_text(SPACE.format(name="ep-width"))
    info = site / "ep_spaces-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-spaces\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[study.search_spaces]\nep-width = ep_spaces.width\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    storage = f"sqlite:///{tmp_path / 's.db'}"
    done = cli("run", "ep-width", "--trials", "2", "--storage", storage, "--quiet",
               "--device", "cpu", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="ep-width", storage=storage)
    assert stored_attrs(study)["space_source"] == {"module": "ep_spaces.width"}
    report = cli("report", "ep-width", "--storage", storage, "--out", str(tmp_path / "r"),
                 env=env)  # fmt: skip
    assert report.returncode == 0, report.stderr


def test_run_study_takes_a_space_module(tmp_path):
    from study import run_study

    path = tmp_path / "module_space.py"
    path.write_text(SPACE.format(name="module-space"))
    module = search_spaces.load_file(path)
    study = run_study(module, trials=2, storage=f"sqlite:///{tmp_path / 's.db'}",
                      device="cpu", quiet=True, sampler_seed=0)  # fmt: skip
    assert study.study_name == "module-space"
    assert len([t for t in study.trials if t.state.is_finished()]) == 2


BROKEN = {
    "no-suggest": ("NAME = 'x1'\nKIND = 'boolean'\ndef base_settings():\n"
                   "    from study.config import BooleanSettings\n    return BooleanSettings()\n",
                   "no function suggest()"),
    "bad-kind": ("NAME = 'x2'\nKIND = 'audio'\n", "KIND must be one of boolean, image"),
    "bad-name": ("NAME = '../x'\nKIND = 'boolean'\n", "NAME must be a study name"),
    "taken": (SPACE.format(name="boolean-shallow"), "is taken by search_spaces.boolean_shallow"),
    "syntax": ("def (:\n", "fails to load: SyntaxError"),
    "raises": ("raise RuntimeError('boom')\n", "fails to load: RuntimeError: boom"),
    "wrong-settings": (SPACE.format(name="x3").replace("KIND = \"boolean\"", "KIND = \"image\""),
                       "must return ImageSettings"),
    "wrong-direction": (SPACE.format(name="x4") + "DIRECTION = 'maximize'\n",
                        "DIRECTION of boolean studies is 'minimize'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_space_that_breaks_the_contract_is_one_line(tmp_path, capsys, case):
    code, expected = BROKEN[case]
    path = tmp_path / "space.py"
    path.write_text(textwrap.dedent(code))
    storage = tmp_path / "s.db"
    status = main(["run", "--space", str(path), "--trials", "1", "--storage",
                   f"sqlite:///{storage}"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert expected in err and "Traceback" not in err
    assert not storage.exists()


def test_space_flag_and_name_must_agree_and_a_name_must_be_known(tmp_path, capsys):
    path = tmp_path / "space.py"
    path.write_text(SPACE.format(name="agreed"))
    assert main(["run", "other", "--space", str(path), "--trials", "1"]) == 2
    assert "defines 'agreed', not 'other'" in capsys.readouterr().err
    assert main(["run", "no-such-study", "--trials", "1",
                 "--storage", f"sqlite:///{tmp_path / 's.db'}"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "unknown study 'no-such-study'" in err and "--space FILE" in err
    assert main(["run", "--space", str(tmp_path / "missing.py"), "--trials", "1"]) == 2
    assert "is not a Python file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown study"):
        search_spaces.get_space("no-such-study")


# ----------------------------------------------------------------------------------------------
# one store everywhere


@pytest.mark.slow
def test_the_cli_honours_study_storage_and_makes_the_default_store_where_it_runs(tmp_path):
    env = {**os.environ, "STUDY_STORAGE": f"sqlite:///{tmp_path / 'env.db'}"}
    done = cli("run", "boolean-shallow", "--trials", "1", *TINY_ARGS, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "env.db").is_file() and not (tmp_path / "results").exists()
    listed = cli("list", cwd=tmp_path, env=env)
    assert "boolean-shallow" in listed.stdout, listed.stderr
    plain = {k: v for k, v in os.environ.items() if k != "STUDY_STORAGE"}
    here = tmp_path / "elsewhere"
    here.mkdir()
    done = cli("run", "boolean-shallow", "--trials", "1", *TINY_ARGS, cwd=here, env=plain)
    assert done.returncode == 0, done.stderr
    assert (here / "results" / "runs" / "studies.db").is_file()
    # a given store's directory is never made
    given = cli("run", "boolean-shallow", "--trials", "1", "--storage",
                f"sqlite:///{here / 'no' / 'x.db'}", *TINY_ARGS, cwd=here, env=plain)  # fmt: skip
    assert given.returncode == 2 and "does not exist" in given.stderr
    assert not (here / "no").exists()


@pytest.mark.slow
def test_the_readmes_script_runs_as_written_in_any_directory(tmp_path):
    text = (ROOT / "README.md").read_text()
    script = re.search(r"From a script:\n\n```python\n(.*?)```", text, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    storage = f"sqlite:///{tmp_path / 'results' / 'runs' / 'studies.db'}"
    study = optuna.load_study(study_name="script-shallow", storage=storage)
    assert len([t for t in study.trials if t.state.is_finished()]) == 8
    assert done.stdout.strip()  # the width, or that none learned f yet


def test_the_contract_names_classes_that_exist():
    """Every class the space contract names (`study.config.*`) exists."""
    import importlib

    named = set(re.findall(r"`(study\.config\.\w+)`", search_spaces.__doc__))
    assert {"study.config.ImageCandidate", "study.config.BooleanCandidate"} <= named
    for dotted in named:
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), dotted


@pytest.mark.slow
def test_the_readmes_own_image_study_runs_as_written_and_in_notebook_02(tmp_path, monkeypatch):
    """The README's image file and commands verbatim (on a small dataset of the same format),
    then notebook 02 on its store: report, export, predictions, all from the stored study."""
    import nbformat
    from nbclient import NotebookClient

    from tests.conftest import write_fake_dataset

    name, code, commands = readme_section("### An image study of your own")
    (tmp_path / name).write_text(code)
    data = write_fake_dataset(tmp_path / "data", train=10_300, test=100)
    env = {**os.environ, "STUDY_DATA_DIR": str(data)}
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "study"
        done = cli(*argv[1:], cwd=tmp_path, env=env)
        assert done.returncode == 0, (command, done.stderr)
    summary = (tmp_path / "tiny-mlp" / "summary.md").read_text()
    assert "One hidden layer on FashionMNIST: how wide, at which learning rate?" in summary
    assert "width 16..128 (log), learning_rate 0.001..0.01 (log)" in summary
    assert (tmp_path / "tiny-mlp" / "lr_vs_accuracy.png").is_file()
    assert "Predicted: " in done.stdout
    monkeypatch.setenv("STUDY_STORAGE", f"sqlite:///{tmp_path / 'tiny.db'}")
    monkeypatch.setenv("STUDY_DATA_DIR", str(data))
    notebooks = ROOT / "notebooks"
    book = nbformat.read(notebooks / "02_fashion_mnist.ipynb", as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(notebooks)}}).execute()  # fmt: skip
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )  # fmt: skip
    assert "image studies in the store: ['tiny-mlp']" in text
    assert "adamw" in text and 'tiny-mlp Predicted: "' in text
