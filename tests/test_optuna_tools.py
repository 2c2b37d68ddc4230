"""Stores that every Optuna tool reads right: the best trial that `optuna best-trial` and
`optuna.load_study().best_trial` report is the tool's answer, for each kind of study (a frontier
cell: the trial of its stated width), also on the committed reference store."""

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from study import rdb
from study.answers import earlier_answer, stored_answer
from study.config import BooleanSettings, FrontierCell, FrontierPlan
from study.frontier import STATED, align_with_optuna, run_cell
from study.runner import best_feasible, run_study
from study.storage import open_storage
from study.studies import SUMMARY_ATTRS, stored_attrs
from tests.conftest import TINY, cli, write_fake_dataset

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "results" / "reference.db"
"""The earlier method's frontier cells, and the Boolean and image reference studies."""
FRONTIER = ROOT / "results" / "frontier.db"
"""The frontier's reference cells (method 2)."""
OPTUNA = [str(Path(sys.executable).parent / "optuna")]  # the console script a user types


def optuna_best_trial(storage: str, name: str) -> dict:
    """`optuna best-trial` as a user types it, parsed."""
    done = subprocess.run(
        [*OPTUNA, "best-trial", "--study-name", name, "--storage", storage, "-f", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_optuna_cli_names_each_kinds_answer_best(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    boolean = run_study("boolean-shallow", trials=4, storage=storage, device="cpu",
                        settings=TINY, quiet=True, sampler_seed=0)  # fmt: skip
    images = write_fake_dataset(tmp_path / "images", train=300, test=60)
    small = {"validation_size": 60, "min_epochs": 2, "max_epochs": 2}
    image = run_study("fashion-mlp", trials=2, storage=storage, data_dir=str(images),
                      device="cpu", quiet=True, sampler_seed=0, settings=small)  # fmt: skip
    cell = FrontierCell(0, 1, 200)
    plan = FrontierPlan(recipe_trials=2, recipe_seeds=2, selection_seeds=4, heldout_seeds=20,
                        confirmation_seeds=20, probe_neurons=16, stated_seeds=40)  # fmt: skip
    answer = run_cell(storage, cell, plan, threads=1, log=lambda _: None,
                      settings=BooleanSettings(input_bits=4, output_bits=3))  # fmt: skip
    for study, expected in [
        (boolean, best_feasible(boolean)),
        (image, max((t for t in image.trials if t.state.name == "COMPLETE"),
                    key=lambda t: t.value)),
    ]:  # fmt: skip
        if expected is None:
            continue  # no feasible trial in 4 tiny trials: nothing for either to name
        shown = optuna_best_trial(storage, study.study_name)
        assert shown["number"] == expected.number, study.study_name
    shown = optuna_best_trial(storage, cell.name)
    assert shown["params"]["neurons"] == answer.neurons
    assert shown["value"] == answer.neurons
    best = optuna.load_study(study_name=cell.name, storage=storage).best_trial
    assert best.user_attrs["stage"] == "confirm" and best.params["neurons"] == answer.neurons
    # `optuna studies` prints every user attribute in a study's row: only the short ones are
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        assert set(summary.user_attrs) <= set(SUMMARY_ATTRS), summary.study_name
    assert widest_row(storage) <= 200


def widest_row(storage: str) -> int:
    """The widest line `optuna studies` prints for a store."""
    done = subprocess.run([*OPTUNA, "studies", "--storage", storage], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return max(len(line) for line in done.stdout.splitlines())


def test_a_store_written_before_moves_its_large_attributes_on_the_next_run(tmp_path):
    """A study whose settings and runs were stored as user attributes (as before 2026-12-08):
    every command reads it; the next `study run` moves them to system attributes (the user's
    own attribute stays) and `optuna studies` shows a short row."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_study("boolean-shallow", trials=2, storage=storage, device="cpu", settings=TINY,
              quiet=True, sampler_seed=0)  # fmt: skip
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    moved = stored_attrs(study)
    backend = rdb.backend(rdb.storage_of(study))
    with rdb.transaction(backend) as session:  # back to the earlier layout
        table = rdb.models().StudySystemAttributeModel
        session.query(table).delete()
    for key, value in moved.items():
        study.set_user_attr(key, value)
    study.set_user_attr("note", "mine")
    assert widest_row(storage) > 300
    listed = cli("best", "boolean-shallow", "--storage", storage, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["settings"], listed.stderr
    done = cli("run", "boolean-shallow", "--trials", "3", "--storage", storage, "--quiet")
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    assert set(study.user_attrs) == {*SUMMARY_ATTRS, "note"}
    after = stored_attrs(study)
    assert after["settings"] == moved["settings"] and len(after["runs"]) == len(moved["runs"]) + 1
    assert widest_row(storage) <= 200


@pytest.mark.parametrize(
    ("path", "cells_at_least"),
    [(REFERENCE, 20), (FRONTIER, 2), (FRONTIER.with_name("frontier3.db"), 4)],
    ids=["reference", "frontier", "frontier3"],
)
def test_the_committed_stores_read_right_in_optuna(path, cells_at_least):
    """Read-only: every cell's Optuna best trial is its stated width (cells of every method);
    the Boolean and image studies' are the tool's best."""
    if not path.exists():
        pytest.skip(f"no committed {path.name}")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True):
        pass  # readable
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}", skip_table_creation=True)
    cells, named = 0, None
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if summary.study_name.startswith("frontier-") and not summary.study_name.endswith(
            "-recipe"
        ):
            answer = stored_answer(study)
            neurons = answer.neurons if answer else (earlier_answer(study) or {}).get("neurons")
            if neurons is None:
                continue
            assert study.best_trial.params["neurons"] == neurons, summary.study_name
            cells, named = cells + 1, (summary.study_name, neurons)
        elif not summary.study_name.startswith("frontier-"):
            assert study.best_trial.number == best_feasible(study).number
    assert cells >= cells_at_least
    shown = optuna_best_trial(f"sqlite:///{path}", named[0])
    assert shown["params"]["neurons"] == named[1]
    assert widest_row(f"sqlite:///{path}") <= 200  # `optuna studies` stays readable


def test_cells_stored_by_earlier_versions_are_aligned_once(tmp_path):
    """A cell whose evaluations hold their success share as value (no constraint), as earlier
    versions stored them: `align_with_optuna` gives them neurons and the constraint, once."""
    if not REFERENCE.exists():
        pytest.skip("no committed reference store")
    copy = tmp_path / "old.db"
    shutil.copy(REFERENCE, copy)
    with sqlite3.connect(copy) as connection:  # back to the earlier format, for one cell
        connection.execute(
            "DELETE FROM trial_system_attributes WHERE key = ? AND trial_id IN (SELECT trial_id "
            "FROM trials JOIN studies USING (study_id) WHERE study_name = ?)",
            (rdb.constraint_key(STATED), "frontier-f0-d1-b500"),
        )
    old = optuna.load_study(study_name="frontier-f0-d1-b500", storage=f"sqlite:///{copy}")
    neurons = earlier_answer(old)["neurons"]
    assert old.best_trial.params["neurons"] < neurons  # a width-search evaluation
    storage = open_storage(f"sqlite:///{copy}")
    assert align_with_optuna(storage) == len([t for t in old.trials if t.state.name == "COMPLETE"])
    assert align_with_optuna(open_storage(f"sqlite:///{copy}")) == 0
    aligned = optuna.load_study(study_name="frontier-f0-d1-b500", storage=f"sqlite:///{copy}")
    assert aligned.best_trial.params["neurons"] == neurons
    assert aligned.best_trial.value == neurons
