"""The budget frontier on a tiny 3-bit function: stages stored as trials, resume, held-out
seeds apart from selection seeds, intervals, the report and answers.json."""

import json
import math

import optuna
import pytest

from study.config import BooleanSettings, FrontierCell, FrontierPlan
from study.frontier import (
    CONFIRM_BLOCK,
    HELDOUT_SEED,
    SELECTION_SEED,
    FrontierAnswer,
    exact_interval,
    run_cell,
)
from tests.conftest import cli

TINY = BooleanSettings(input_bits=3, output_bits=3)
PLAN = FrontierPlan(
    recipe_trials=4, recipe_seeds=2, selection_seeds=4, heldout_seeds=20, probe_neurons=6
)
Cell = FrontierCell


def test_the_exact_interval_is_clopper_pearson():
    low, high = exact_interval(24, 24)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 24), abs=1e-6)
    low, high = exact_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-6)
    low, high = exact_interval(5, 10)
    assert low == pytest.approx(1 - high, abs=1e-6) and 0.18 < low < 0.19
    # scipy's: defined far beyond the ~1,030 seeds where a hand-summed binomial overflowed
    low, high = exact_interval(9000, 10_000)
    assert 0.89 < low < 0.9 < high < 0.91


def test_a_cell_spreads_its_neurons_evenly_over_its_layers():
    assert Cell(0, 3, 100).profile(77) == (26, 26, 25)
    assert Cell(0, 1, 100).profile(60) == (60,)
    assert Cell(0, 4, 100).name == "frontier-f0-d4-b100"


@pytest.fixture(scope="module")
def cell_store(tmp_path_factory):
    storage = f"sqlite:///{tmp_path_factory.mktemp('frontier') / 'f.db'}"
    logged = []
    answer = run_cell(storage, Cell(0, 1, 300), PLAN, threads=2, log=logged.append, settings=TINY)
    assert isinstance(answer, FrontierAnswer)
    return storage, answer.to_dict(), logged


def test_a_cell_is_answered_on_held_out_seeds(cell_store):
    storage, answer, _ = cell_store
    need = math.ceil(0.9 * answer["heldout_seeds"])
    assert answer["heldout_seeds"] >= 20 and answer["heldout_successes"] >= need
    low, high = answer["interval_95"]
    assert low < answer["heldout_successes"] / answer["heldout_seeds"] <= high
    chosen = answer["chosen_on"]
    assert chosen["heldout_successes"] >= need
    smaller = answer["next_smaller"]
    if smaller is not None and "next_smaller_fresh_block" not in answer:
        assert smaller["neurons"] == answer["neurons"] - 1
        assert smaller["heldout_block"] == chosen["heldout_block"]
        assert smaller["heldout_successes"] < need  # the next smaller fails on the same block
    # the stated rate is the confirmation block's: not the block that chose the width
    assert answer["heldout_block"] >= CONFIRM_BLOCK > chosen["heldout_block"]
    assert answer["heldout_first_seed"] == HELDOUT_SEED + answer["heldout_block"] * 10_000
    pooled = answer["all_heldout"]
    assert {answer["heldout_block"], chosen["heldout_block"]} <= set(pooled["blocks"])
    assert pooled["heldout_seeds"] == answer["heldout_seeds"] * len(pooled["blocks"])
    assert pooled["heldout_successes"] >= answer["heldout_successes"] + chosen["heldout_successes"]
    assert answer["parameters"] == (3 + 1) * answer["neurons"] + (answer["neurons"] + 1) * 3
    for key in ("study", "function_seed", "budget_epochs", "profile", "neurons", "recipe"):
        assert key in answer
    study = optuna.load_study(study_name="frontier-f0-d1-b300", storage=storage)
    assert study.user_attrs["answer"] == answer  # stored with its cell


def test_held_out_seeds_played_no_part_in_selection(cell_store):
    storage, _, _ = cell_store
    study = optuna.load_study(study_name="frontier-f0-d1-b300", storage=storage)
    recipe = optuna.load_study(study_name="frontier-f0-d1-b300-recipe", storage=storage)
    selection = {
        s
        for t in recipe.trials + study.trials
        if t.user_attrs.get("stage") not in ("heldout", "confirm")
        for s in t.user_attrs["seeds"]
    }
    heldout = {
        s
        for t in study.trials
        if t.user_attrs["stage"] == "heldout"
        for s in t.user_attrs["seeds"]
    }
    confirmation = {
        s
        for t in study.trials
        if t.user_attrs["stage"] == "confirm"
        for s in t.user_attrs["seeds"]
    }
    assert heldout and selection and not heldout & selection
    assert confirmation and not confirmation & (heldout | selection)
    assert min(heldout) >= HELDOUT_SEED and max(selection) < HELDOUT_SEED
    assert min(selection) >= SELECTION_SEED
    assert len(recipe.trials) == PLAN.recipe_trials
    stages = {t.user_attrs["stage"] for t in study.trials}
    assert stages == {"width", "heldout", "confirm"}


def test_a_cell_resumes_without_training_again(cell_store):
    storage, answer, _ = cell_store
    logged = []
    again = run_cell(storage, Cell(0, 1, 300), PLAN, threads=2, log=logged.append, settings=TINY)
    assert again.to_dict() == answer
    assert not any("training" in line for line in logged), logged


def test_the_report_and_answers_json(cell_store, tmp_path):
    storage, answer, _ = cell_store
    done = cli("frontier", "report", "--storage", storage, "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    answers = json.loads((tmp_path / "r" / "answers.json").read_text())
    assert answers == [answer]
    for key in (
        "study",
        "function_seed",
        "budget_epochs",
        "profile",
        "neurons",
        "parameters",
        "heldout_successes",
        "heldout_seeds",
        "interval_95",
        "recipe",
    ):
        assert key in answers[0]
    assert {"learning_rate", "batch_size", "lr_schedule"} <= set(answers[0]["recipe"])
    summary = (tmp_path / "r" / "summary.md").read_text()
    rate = f"{answer['heldout_successes']}/{answer['heldout_seeds']}"
    assert rate in summary and f"| {answer['neurons']} |" in " ".join(summary.split())
    assert "## The answers (function seed 0)" in summary and "w_1 (1 layer)" in summary
    assert "(not yet: 2, 3, 4)" in summary  # only one depth was run here
    assert (tmp_path / "r" / "frontier.png").stat().st_size > 10_000


def test_frontier_bad_input_is_one_line(tmp_path):
    done = cli("frontier", "run", "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--depths", "5")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "depth" in done.stderr
    done = cli("frontier", "run", "--heldout-seeds", "10")
    assert done.returncode == 2 and "--heldout-seeds" in done.stderr
    done = cli("frontier", "run", "--function-seeds", "-1")
    assert done.returncode == 2 and "--function-seeds" in done.stderr


def test_function_seed_zero_is_a_function_seed():
    from study.cli import build_parser

    args = build_parser().parse_args(["frontier", "run", "--function-seeds", "0,3"])
    assert args.function_seeds == (0, 3)


def test_a_width_that_fails_its_confirmation_is_not_stated(tmp_path, monkeypatch):
    """Confirmation of 5 neurons fails: 6 is chosen again on fresh blocks and confirmed on the
    next confirmation block; the stated rate is that block's."""
    from types import SimpleNamespace

    from study import frontier
    from study.storage import open_storage

    storage = f"sqlite:///{tmp_path / 'c.db'}"
    run = frontier.CellRun(storage, open_storage(storage, create=True), Cell(0, 1, 300), PLAN,
                           TINY, 1, print)  # fmt: skip
    rates = {(5, CONFIRM_BLOCK): 17, (6, CONFIRM_BLOCK + 1): 23}
    chosen_from = []

    def fake_heldout(recipe, widths, block, stage="heldout"):
        assert stage == "confirm"
        (n,) = widths
        attrs = {"successes": rates[(n, block)], "seeds_planned": 24, "block": block}
        return {n: SimpleNamespace(user_attrs=attrs, params={"neurons": n})}

    def choice_of(neurons: int, block: int) -> frontier.Choice:
        rate = frontier.BlockRate(block, 22, 24)
        return frontier.Choice(frontier.Width((neurons,), 7 * neurons + 3, rate), None)

    def fake_choose(recipe, neurons, first_block=0):
        chosen_from.append((neurons, first_block))
        return choice_of(neurons, first_block)

    monkeypatch.setattr(run, "heldout", fake_heldout)
    monkeypatch.setattr(run, "choose", fake_choose)
    monkeypatch.setattr(run, "_pooled", lambda recipe, neurons: frontier.Pooled(0, 0, ()))
    recipe = frontier.Recipe(0.01, 8, "constant")
    answer = run.confirm(recipe, choice_of(5, 0)).to_dict()
    assert chosen_from == [(6, frontier.CHOICE_BLOCKS)]  # chosen again on fresh blocks
    assert answer["neurons"] == 6 and answer["heldout_successes"] == 23
    assert answer["heldout_block"] == CONFIRM_BLOCK + 1
    assert answer["chosen_on"]["heldout_block"] == frontier.CHOICE_BLOCKS


def test_an_unconfirmed_answer_is_not_published(tmp_path):
    from study.report_frontier import frontier_answers

    storage = f"sqlite:///{tmp_path / 'u.db'}"
    study = optuna.create_study(study_name="frontier-f5-d1-b100", storage=storage)
    study.set_user_attr("answer", {"neurons": 7, "heldout_successes": 24, "heldout_seeds": 24})
    assert frontier_answers(storage) == []


TWO_PROCESSES = """
import sys
from study.config import BooleanSettings, FrontierGrid
from study.frontier import run_frontier
plan = dict(recipe_trials=8, recipe_seeds=2, selection_seeds=4, heldout_seeds=20, probe_neurons=6)
grid = FrontierGrid(function_seeds=(0, 1, 2, 3), depths=(1,), budgets=(300,))
answers = run_frontier(sys.argv[1], grid, plan, threads=1, log=lambda line: None,
                       settings=BooleanSettings(input_bits=3, output_bits=3))
print(len(answers))
"""


@pytest.mark.slow
def test_two_frontier_processes_share_the_work_and_fail_nothing(tmp_path):
    """Two processes on one new store divide the evaluations: none is trained twice, no trial is
    failed or left running, both end with every cell answered."""
    import subprocess
    import sys

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    command = [sys.executable, "-c", TWO_PROCESSES, storage]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert out.strip() == "4"
    owners, keys = set(), []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states = {t.state.name for t in study.trials}
        assert states == {"COMPLETE"}, (summary.study_name, states)
        owners |= {t.system_attrs["study:owner"]["pid"] for t in study.trials}
        if not summary.study_name.endswith("-recipe"):
            keys += [(summary.study_name, t.user_attrs["stage"], t.params["neurons"],
                      t.user_attrs["block"]) for t in study.trials]  # fmt: skip
        else:
            assert len(study.trials) == 8  # exactly the plan's recipes, whoever trained them
    assert len(keys) == len(set(keys))  # no evaluation trained twice
    assert owners == {p.pid for p in processes}  # both processes trained a share


def test_every_committed_answer_reads_back_typed_with_scipys_intervals():
    """The typed answer is the answers.json entry: read and written again it is the same, the
    intervals recomputed by scipy's exact method included."""
    from pathlib import Path

    committed = json.loads((Path(__file__).parent.parent / "results/answers.json").read_text())
    assert committed
    for entry in committed:
        assert FrontierAnswer.from_dict(entry).to_dict() == entry


def test_a_cell_resumed_with_another_plan_is_refused_before_anything_is_written(cell_store):
    from study.config import FrontierGrid
    from study.errors import ConfigError
    from study.frontier import run_frontier
    from study.overview import best_of

    storage, answer, _ = cell_store
    before = {
        t.number for t in optuna.load_study(study_name=answer["study"], storage=storage).trials
    }
    grid = FrontierGrid((0,), (1,), (300,))
    with pytest.raises(ConfigError, match="exists with another plan: heldout_seeds=24"):
        run_frontier(storage, grid, {"heldout_seeds": 24}, settings=TINY, log=lambda _: None)
    after = {
        t.number for t in optuna.load_study(study_name=answer["study"], storage=storage).trials
    }
    assert after == before
    # flags that repeat the stored plan, or none, resume it; `study best` shows the answer
    again = run_frontier(storage, grid, {"heldout_seeds": 20}, settings=TINY, log=lambda _: None)
    assert [a.to_dict() for a in again] == [answer]
    assert best_of(answer["study"], storage)["answer"] == answer


def test_a_stopped_frontier_fails_its_evaluations_and_says_how_far_it_got(tmp_path, monkeypatch):
    """A stop inside training: the claimed evaluations are failed with the stop's reason (none
    left RUNNING), and the line says how many cells were answered."""
    from study import interrupt
    from study.config import FrontierGrid
    from study.frontier import run_frontier

    calls = []

    def stop_on_the_second_check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise interrupt.Stopped(interrupt.SIGTERM)

    monkeypatch.setattr(interrupt, "check", stop_on_the_second_check)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    grid = FrontierGrid((0,), (1,), (300,))
    with pytest.raises(interrupt.Stopped) as stopped:
        run_frontier(storage, grid, PLAN.identity(), settings=TINY, log=lambda _: None)
    assert str(stopped.value).startswith("terminated (SIGTERM): 0 of 1 frontier cells answered")
    assert interrupt.ending(stopped.value)[1] == 143
    recipes = optuna.load_study(study_name="frontier-f0-d1-b300-recipe", storage=storage)
    assert {t.state.name for t in recipes.trials} == {"FAIL"}
    assert {t.user_attrs["fail_reason"] for t in recipes.trials} == {interrupt.SIGTERM.reason}
