"""The budget frontier on a tiny 3-bit function: stages stored as trials, resume, held-out
seeds apart from selection seeds, intervals, the report and answers.json."""

import json
import math

import optuna
import pytest

from study.config import BooleanSettings
from study.frontier import (
    CONFIRM_BLOCK,
    HELDOUT_SEED,
    SELECTION_SEED,
    Cell,
    Plan,
    clopper_pearson,
    run_cell,
)
from tests.test_boolean_study import cli

TINY = BooleanSettings(input_bits=3, output_bits=3)
PLAN = Plan(recipe_trials=4, recipe_seeds=2, selection_seeds=4, heldout_seeds=20, probe_neurons=6)


def test_clopper_pearson_is_the_exact_interval():
    low, high = clopper_pearson(24, 24)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 24), abs=1e-6)
    low, high = clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-6)
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(1 - high, abs=1e-6) and 0.18 < low < 0.19


def test_a_cell_spreads_its_neurons_evenly_over_its_layers():
    assert Cell(0, 3, 100).profile(77) == (26, 26, 25)
    assert Cell(0, 1, 100).profile(60) == (60,)
    assert Cell(0, 4, 100).name == "frontier-f0-d4-b100"


@pytest.fixture(scope="module")
def cell_store(tmp_path_factory):
    storage = f"sqlite:///{tmp_path_factory.mktemp('frontier') / 'f.db'}"
    logged = []
    answer = run_cell(storage, Cell(0, 1, 300), PLAN, threads=2, log=logged.append, settings=TINY)
    return storage, answer, logged


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
    assert again == answer
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


def test_a_width_that_fails_its_confirmation_is_not_stated(monkeypatch):
    """Confirmation of 5 neurons fails: 6 is chosen again on fresh blocks and confirmed on the
    next confirmation block; the stated rate is that block's."""
    from types import SimpleNamespace

    from study import frontier

    rates = {(5, CONFIRM_BLOCK): 17, (6, CONFIRM_BLOCK + 1): 23}
    chosen_from = []

    def fake_heldout(study, cell, recipe, widths, block, plan, settings, threads, log, stage):
        assert stage == "confirm"
        (n,) = widths
        seeds = [HELDOUT_SEED + block * 10_000 + i for i in range(24)]
        attrs = {"successes": rates[(n, block)], "seeds_planned": 24, "block": block,
                 "seeds": seeds}  # fmt: skip
        return {n: SimpleNamespace(user_attrs=attrs, params={"neurons": n})}

    def fake_choice(study, cell, recipe, neurons, plan, settings, threads, log, first_block=0):
        chosen_from.append((neurons, first_block))
        return {"neurons": neurons, "heldout_block": first_block, "heldout_successes": 22,
                "heldout_seeds": 24}  # fmt: skip

    monkeypatch.setattr(frontier, "_heldout", fake_heldout)
    monkeypatch.setattr(frontier, "_pooled", lambda study, recipe, neurons: {})
    monkeypatch.setattr(frontier, "certify_heldout", fake_choice)
    study = SimpleNamespace(set_user_attr=lambda key, value: None)
    choice = {"neurons": 5, "heldout_block": 0, "heldout_successes": 22, "heldout_seeds": 24}
    answer = frontier.confirm(study, Cell(0, 1, 300), None, choice, PLAN, TINY, 1, print)
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
