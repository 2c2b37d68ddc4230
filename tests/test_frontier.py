"""The budget frontier on a tiny 4-bit function: stages stored as trials, the recipe search
(seeded per cell, neighbours first), the fitted success curve, the confirmation block, resume,
held-out seeds apart from selection seeds, the report and answers.json."""

import json
import math
from types import SimpleNamespace

import optuna
import pytest

from study.answers import (
    HELDOUT_SEED,
    SCHEMA_VERSION,
    SELECTION_SEED,
    FrontierAnswer,
    Recipe,
    exact_interval,
)
from study.config import BooleanSettings, FrontierCell, FrontierGrid, FrontierPlan
from study.frontier import CONFIRM_BLOCK, run_cell, run_frontier
from study.studies import stored_attrs
from study.success_curve import Point, fit, fitted_widths
from tests.conftest import cli

TINY = BooleanSettings(input_bits=4, output_bits=3)
PLAN = FrontierPlan(
    recipe_trials=6,
    recipe_seeds=2,
    selection_seeds=4,
    heldout_seeds=20,
    confirmation_seeds=20,
    probe_neurons=16,
    stated_seeds=40,
)
Cell = FrontierCell
REPRODUCE = ("input_bits", "output_bits", "target_loss", "required_rate", "optimizer", "recipe",
             "seeds", "plan", "code_commit", "torch_version", "device", "command")  # fmt: skip


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


def test_ninety_six_seeds_tell_eighty_from_ninety_five_percent():
    """The default confirmation block: a width that learns f on 80% of seeds passes it (87 of
    96) less than 1% of the time, one at 95% more than 95% of the time."""
    from scipy.stats import binom

    plan = FrontierPlan()
    need = plan.required(plan.confirmation_seeds)
    assert (plan.confirmation_seeds, need) == (96, 87)
    assert binom.sf(need - 1, 96, 0.80) < 0.01
    assert binom.sf(need - 1, 96, 0.95) > 0.95


@pytest.fixture(scope="module")
def cell_store(tmp_path_factory):
    storage = f"sqlite:///{tmp_path_factory.mktemp('frontier') / 'f.db'}"
    logged = []
    answer = run_cell(storage, Cell(0, 1, 200), PLAN, threads=2, log=logged.append, settings=TINY)
    assert isinstance(answer, FrontierAnswer)
    return storage, answer.to_dict(), logged


def stored(storage, name="frontier-f0-d1-b200"):
    return optuna.load_study(study_name=name, storage=storage)


def test_a_cell_states_the_smallest_width_the_curve_places_at_90_percent(cell_store):
    storage, answer, _ = cell_store
    from study.answers import cell_first_seed
    from study.stating_rule import StatingRule

    assert answer["method"] == 3 and answer["depth"] == 1
    # stated by the rule on every held-out block the width was trained on, pooled
    blocks = answer["blocks"]
    pooled = answer["all_heldout"]
    assert [b["heldout_block"] for b in blocks] == pooled["blocks"]
    assert sum(b["heldout_successes"] for b in blocks) == pooled["heldout_successes"]
    assert sum(b["heldout_seeds"] for b in blocks) == pooled["heldout_seeds"] >= 40
    assert len(blocks) >= 2 and blocks[-1]["heldout_block"] >= CONFIRM_BLOCK
    assert StatingRule.of(PLAN).holds(pooled["heldout_successes"], pooled["heldout_seeds"],
                                      len(blocks))  # fmt: skip
    # the block that decided: its rate on fresh seeds with its exact interval, its own seeds
    assert blocks[-1] == {k: answer[k] for k in blocks[-1]}
    assert answer["confirmation_seeds"] == answer["heldout_seeds"] == 20
    low, high = answer["interval_95"]
    assert (low, high) == pytest.approx(exact_interval(answer["heldout_successes"], 20), abs=1e-4)
    for b in blocks:
        stage = "confirm" if b["heldout_block"] >= CONFIRM_BLOCK else "curve"
        assert b["heldout_first_seed"] == cell_first_seed(answer["study"], stage,
                                                          b["heldout_block"])  # fmt: skip
    # the width: the smallest whole width at >= 90% by the fit that chose it (or one more than
    # a width that failed its own confirmation)
    chosen = fit([Point(*p) for p in answer["chosen_on"]["success_curve"]["points"]])
    failed = [w["neurons"] for w in answer["failed_confirmations"]]
    assert answer["neurons"] == max([chosen.smallest(), *[n + 1 for n in failed]])
    assert chosen.crossing == answer["chosen_on"]["fitted_width_90"]
    # the curve: every held-out evaluation of the cell's recipe, confirmations included
    study = stored(storage)
    heldout = [t for t in study.trials if t.user_attrs["stage"] in ("curve", "confirm")]
    points = sorted((t.params["neurons"], t.user_attrs["successes"], t.user_attrs["seeds_planned"])
                    for t in heldout)  # fmt: skip
    pooled = {}
    for n, k, seeds in points:
        pooled[n] = [pooled.get(n, [0, 0])[0] + k, pooled.get(n, [0, 0])[1] + seeds]
    assert answer["success_curve"]["points"] == [[n, k, s] for n, (k, s) in sorted(pooled.items())]
    low, high = answer["fitted_width_90_interval"]
    assert low < answer["fitted_width_90"] < high
    assert chosen.at(answer["neurons"]) >= 0.9 - 1e-9
    assert answer["parameters"] == (4 + 1) * answer["neurons"] + (answer["neurons"] + 1) * 3
    for key in REPRODUCE:
        assert answer[key] not in (None, "", [], {}), key
    assert answer["plan"] == PLAN.identity()
    assert len(answer["code_commit"]) >= 40 or answer["code_commit"].startswith("version")
    assert stored_attrs(study)["answer"] == answer  # stored with its cell


def test_the_recipe_ranking_is_the_searchs_best_three(cell_store):
    storage, answer, _ = cell_store
    recipes = stored(storage, "frontier-f0-d1-b200-recipe")
    best = sorted(recipes.trials, key=lambda t: (t.value, t.number))[:3]
    ranking = answer["recipe_ranking"]
    assert [r["score"] for r in ranking] == [round(t.value, 4) for t in best]
    assert ranking[0]["recipe"] == answer["recipe"]
    assert all(r["probe_neurons"] == 16 and r["seeds"] == 2 for r in ranking)
    # the schedule family: a warm-up always, a floor only where the rate decays
    for t in recipes.trials:
        assert 0 <= t.params["warmup_fraction"] <= 0.3
        assert ("lr_floor" in t.params) == (t.params["lr_schedule"] != "constant")
    from study.cell_engine import cell_seed

    assert stored_attrs(recipes)["sampler_seed"] == cell_seed(Cell(0, 1, 200))


def test_held_out_seeds_played_no_part_in_selection(cell_store):
    storage, _, _ = cell_store
    study = stored(storage)
    recipe = stored(storage, "frontier-f0-d1-b200-recipe")

    def seeds(trials, stages):
        return {s for t in trials if t.user_attrs.get("stage") in stages
                for s in t.user_attrs["seeds"]}  # fmt: skip

    selection = seeds(recipe.trials + study.trials, ("recipe", "width"))
    curve = seeds(study.trials, ("curve",))
    confirmation = seeds(study.trials, ("confirm",))
    assert curve and selection and not curve & selection
    assert confirmation and not confirmation & (curve | selection)
    assert not seeds(recipe.trials, ("recipe",)) & seeds(study.trials, ("width",))
    assert min(selection | curve | confirmation) >= 2**59  # the cell's own (method 3)
    assert len(recipe.trials) == PLAN.recipe_trials
    assert {t.user_attrs["stage"] for t in study.trials} == {"width", "curve", "confirm"}


def test_a_cell_resumes_without_training_again(cell_store):
    storage, answer, _ = cell_store
    logged = []
    again = run_cell(storage, Cell(0, 1, 200), PLAN, threads=2, log=logged.append, settings=TINY)
    assert again.to_dict() == answer
    assert not any("training" in line for line in logged), logged


def _learned_record(directory):
    """A record of the cell's function ({0,1}^4 -> {0,1}^3, seed 0): 12 neurons trained until
    every bit is right (and an untrained one of 11, which does not verify: the report leaves it
    out)."""
    import torch

    from study import records
    from study.data import boolean_function
    from study.models import build_boolean_net

    fn = boolean_function(4, 0, 3)
    net = build_boolean_net((12,), 4, 3, 0)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(3000):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(fn.inputs), fn.targets)
        loss.backward()
        optimizer.step()
    tensors = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    meta = {"kind": "boolean-record", "hidden_layer_profile": [12], "neurons": 12,
            "function_seed": 0, "input_bits": 4, "output_bits": 3, "target_loss": 0.001,
            "final_loss": float(loss), "epochs_run": 3000, "budget_epochs": 200,
            "init_seed": 0}  # fmt: skip
    path = records.write(directory, tensors, meta)
    assert records.verify(path).holds
    untrained = build_boolean_net((11,), 4, 3, 1).state_dict()
    records.write(directory, {k: v.numpy() for k, v in untrained.items()},
                  {**meta, "hidden_layer_profile": [11], "neurons": 11})  # fmt: skip
    return path


def test_the_report_and_answers_json(cell_store, tmp_path):
    storage, answer, _ = cell_store
    record = _learned_record(tmp_path / "records")
    done = cli("frontier", "report", "--storage", storage, "--out", str(tmp_path / "r"),
               "--records", str(tmp_path / "records"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"w_1 = {answer['neurons']} ")  # the headline, printed
    document = json.loads((tmp_path / "r" / "answers.json").read_text())
    assert document["schema_version"] == SCHEMA_VERSION
    (entry,) = document["answers"]
    widths = entry.pop("fitted_widths")
    assert entry == answer
    assert widths["90%"]["crossing"] == answer["fitted_width_90"]
    assert widths["50%"]["crossing"] < widths["90%"]["crossing"] < widths["99%"]["crossing"]
    (kept,) = document["records"]  # the spoiled copy is not shown
    assert kept["file"] == str(record) and kept["neurons"] == 12
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "## Records: the least width found that learns f" in summary
    assert "**12** (12)" in summary and "f0-d1-12.json" in summary
    assert "The price of reliability" in summary and "w at 99%" in summary
    assert "## The stated widths under the stating rule" in summary
    pooled = answer["all_heldout"]
    assert "| holds |" in " ".join(summary.split())  # stated by the rule of its plan
    assert "Every answer above was stated by it (method 3)." in summary
    rate = f"{pooled['heldout_successes']}/{pooled['heldout_seeds']}"
    assert rate in summary and f"| {answer['neurons']} |" in " ".join(summary.split())
    assert "## The answers (function seed 0)" in summary and "w_1 (1 layer)" in summary
    assert "(not: 2, 3, 4)" in summary  # only one depth was run here
    assert f"{answer['fitted_width_90']:.1f}" in summary
    assert "second" in summary and "## Next to theory" in summary
    assert "about 2 sqrt((m + 2) N) = 18 neurons in two hidden layers" in summary  # N 16, m 3
    assert "{0,1}^4 -> {0,1}^3" in summary
    # the introduction tells the plan the cell ran, not the default one
    intro = " ".join(summary.split())
    assert "; 6 trials, the" in intro and "trained on 20 held-out seeds each" in intro
    assert "Method 3: blocks of 20 seeds" in intro and "numbers at least 40 from two" in intro
    assert "48 trials" not in intro and "96 seeds" not in intro
    assert "numbers at least 40 from at least 2 blocks" in intro  # the rule's section: its own
    for name in ("frontier.png", "success_curves.png"):
        assert (tmp_path / "r" / name).stat().st_size > 10_000, name


def test_frontier_bad_input_is_one_line(tmp_path):
    done = cli("frontier", "run", "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--depths", "5")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "depth" in done.stderr
    for flag in ("--heldout-seeds", "--confirmation-seeds"):
        done = cli("frontier", "run", flag, "10")
        assert done.returncode == 2 and flag in done.stderr and done.stderr.count("\n") == 1
    done = cli("frontier", "run", "--function-seeds", "-1")
    assert done.returncode == 2 and "--function-seeds" in done.stderr
    done = cli("frontier", "run", "--method", "1")
    assert done.returncode == 2  # not a flag: the method is the code's


def test_function_seed_zero_is_a_function_seed():
    from study.cli import build_parser

    args = build_parser().parse_args(["frontier", "run", "--function-seeds", "0,3"])
    assert args.function_seeds == (0, 3)


def _confirm_on(run, monkeypatch, points, heldout, block_rates):
    """Stage 4 of `run` on stubbed evaluations; returns what `_state` would state from."""
    from study import frontier

    run.points, run.heldout, run.block_rates = points, heldout, block_rates
    monkeypatch.setattr(
        frontier,
        "_state",
        lambda run, recipe, trial, chosen_by, failed, blocks: (trial, chosen_by, failed),
    )
    return frontier.confirm(run, Recipe(0.01, 8, "constant"), (0,))


def test_method_3_states_a_width_only_when_the_rule_holds_on_every_seed_pooled(
    tmp_path, monkeypatch
):
    """Stating rule over 60 pooled seeds (20 per block): 8 neurons (the fit's) has 19/20 on its
    curve block and 19/20 on its first confirmation block, too few seeds to decide, so it gets a
    second block (17/20): 55/60 is 0.917 but its one-sided 95% lower bound 0.833 < 0.85, so 8 is
    refused, every block kept. 9 neurons: 20/20 on the curve, 18/20 and 18/20 on two fresh
    blocks: 56/60, lower bound 0.854: stated from the block that decided. Each confirmation is
    told what came before it, so that only the deciding block is feasible for Optuna."""
    from study.answers import BlockRate
    from study.cell_engine import CellRun
    from study.stating_rule import StatingRule
    from study.storage import open_storage

    plan = PLAN.replace(stated_seeds=60)
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    run = CellRun(storage, open_storage(storage, create=True), Cell(0, 1, 200), plan, TINY, 1,
                  print)  # fmt: skip
    curve = {5: 2, 6: 8, 7: 15, 8: 19, 9: 20}
    rates = {(8, CONFIRM_BLOCK): 19, (8, CONFIRM_BLOCK + 1): 17,
             (9, CONFIRM_BLOCK + 2): 18, (9, CONFIRM_BLOCK + 3): 18}  # fmt: skip
    confirmed: dict[int, tuple[int, int]] = {}  # block -> (neurons, successes)
    told = []

    def points(recipe, curve_through, confirm_below):
        mine = [Point(n, k, 20) for b, (n, k) in sorted(confirmed.items()) if b < confirm_below]
        return [Point(n, k, 20) for n, k in curve.items()] + mine

    def block_rates(recipe, neurons, curve_through, confirm_below):
        rows = [BlockRate(0, curve[neurons], 20)] if neurons in curve else []
        return tuple(rows + [BlockRate(b, k, 20) for b, (n, k) in sorted(confirmed.items())
                             if n == neurons and b < confirm_below])  # fmt: skip

    def heldout(recipe, widths, block, stage, pooled_before=None):
        assert stage == "confirm"
        (n,) = widths
        if block not in confirmed:
            confirmed[block] = (n, rates[(n, block)])
            told.append((n, block, pooled_before))
        attrs = {"successes": confirmed[block][1], "seeds_planned": 20, "block": block,
                 "stage": "confirm"}  # fmt: skip
        return {n: SimpleNamespace(user_attrs=attrs, params={"neurons": n})}

    trial, chosen_by, failed = _confirm_on(run, monkeypatch, points, heldout, block_rates)
    assert fit([Point(n, k, 20) for n, k in curve.items()]).smallest() == 8
    assert trial.params["neurons"] == 9 and trial.user_attrs["block"] == CONFIRM_BLOCK + 3
    assert [(w.neurons, w.rate.successes, w.rate.block) for w in failed] == [
        (8, 17, CONFIRM_BLOCK + 1)
    ]
    assert told == [
        (8, CONFIRM_BLOCK, (19, 20, 1)),
        (8, CONFIRM_BLOCK + 1, (38, 40, 2)),
        (9, CONFIRM_BLOCK + 2, (20, 20, 1)),
        (9, CONFIRM_BLOCK + 3, (38, 40, 2)),
    ]
    rule = StatingRule.of(plan)
    assert not rule.holds(55, 60, 3) and rule.holds(56, 60, 3)
    assert Point(8, 19 + 19 + 17, 60) in chosen_by.points  # the refused width's blocks, pooled
    # what Optuna is told: only a block that completes a statement is feasible
    outcome = SimpleNamespace(successes=18, seeds_planned=20)
    unit = SimpleNamespace(pooled_before=(38, 40, 2), stage="confirm")
    assert run.constraint(unit, outcome) == 0.0
    assert run.constraint(SimpleNamespace(pooled_before=(37, 40, 2), stage="confirm"),
                          outcome) == 1.0  # fmt: skip


def test_method_2_a_width_that_fails_its_confirmation_joins_the_fit_and_is_not_stated(
    tmp_path, monkeypatch
):
    """Method 2 (cells stored before method 3 resume with it): the fit places 8 neurons; 8
    fails its confirmation block (15/20): its block joins the fit, and the next width (at
    least 9) is confirmed on the next fresh block."""
    from study.cell_engine import CellRun
    from study.storage import open_storage

    storage = f"sqlite:///{tmp_path / 'c.db'}"
    run = CellRun(storage, open_storage(storage, create=True), Cell(0, 1, 200),
                  PLAN.replace(method=2), TINY, 1, print)  # fmt: skip
    curve = [Point(n, k, 20) for n, k in [(5, 2), (6, 8), (7, 15), (8, 19), (9, 20)]]
    rates = {(8, CONFIRM_BLOCK): 15, (9, CONFIRM_BLOCK + 1): 20}
    confirmed: dict[int, Point] = {}
    seen_by_fits = []

    def points(recipe, curve_through, confirm_below):
        assert curve_through == 0
        mine = [p for block, p in sorted(confirmed.items()) if block < confirm_below]
        seen_by_fits.append(len(mine))
        return curve + mine

    def heldout(recipe, widths, block, stage, pooled_before=None):
        assert stage == "confirm" and pooled_before is None  # method 2: each block alone
        (n,) = widths
        confirmed[block] = Point(n, rates[(n, block)], 20)
        attrs = {"successes": rates[(n, block)], "seeds_planned": 20, "block": block,
                 "stage": "confirm"}  # fmt: skip
        return {n: SimpleNamespace(user_attrs=attrs, params={"neurons": n})}

    def block_rates(recipe, neurons, curve_through, confirm_below):
        from study.answers import BlockRate

        rows = [BlockRate(0, p.successes, 20) for p in curve if p.neurons == neurons]
        return tuple(rows + [BlockRate(b, p.successes, 20) for b, p in sorted(confirmed.items())
                             if p.neurons == neurons and b < confirm_below])  # fmt: skip

    trial, chosen_by, failed = _confirm_on(run, monkeypatch, points, heldout, block_rates)
    assert fit(curve).smallest() == 8
    assert trial.params["neurons"] == 9 and trial.user_attrs["block"] == CONFIRM_BLOCK + 1
    assert [(w.neurons, w.rate.successes, w.rate.block) for w in failed] == [
        (8, 15, CONFIRM_BLOCK)
    ]
    assert seen_by_fits == [0, 1]  # the second fit took the failed block in
    assert Point(8, 19 + 15, 40) in chosen_by.points  # curve and failed block, pooled


def test_an_unconfirmed_answer_is_not_published_and_earlier_cells_are_named(tmp_path):
    from study.report_frontier import frontier_answers, write_frontier_report

    storage = f"sqlite:///{tmp_path / 'u.db'}"
    study = optuna.create_study(study_name="frontier-f5-d1-b100", storage=storage)
    study.set_user_attr("answer", {"neurons": 7, "heldout_successes": 24, "heldout_seeds": 24})
    earlier = optuna.create_study(study_name="frontier-f5-d1-b200", storage=storage)
    earlier.set_user_attr("answer", {"neurons": 7, "chosen_on": {"heldout_block": 0}})
    assert frontier_answers(storage) == []
    write_frontier_report(storage, tmp_path / "r", tmp_path / "r" / "answers.json")
    assert json.loads((tmp_path / "r" / "answers.json").read_text())["answers"] == []
    assert (
        "1 cell(s) of this store answered by the earlier method"
        in (tmp_path / "r" / "summary.md").read_text()
    )


def test_a_cell_of_the_earlier_method_is_not_resumed(tmp_path):
    """A cell stored by method 1 (its plan has no method) is refused in one line, nothing
    written; its answer stays where it is."""
    from study.errors import ConfigError

    storage = f"sqlite:///{tmp_path / 'old.db'}"
    old = optuna.create_study(study_name="frontier-f0-d1-b200", storage=storage)
    old.set_user_attr("plan", {"recipe_trials": 16, "heldout_seeds": 24})
    old.add_trial(optuna.trial.create_trial(value=5.0))
    with pytest.raises(ConfigError, match=r"answered by the earlier method.*another --storage"):
        run_frontier(storage, FrontierGrid((0,), (1,), (200,)), {}, settings=TINY,
                     log=lambda _: None)  # fmt: skip
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [old.study_name]


def test_a_second_cell_starts_from_its_neighbours_recipe_with_its_own_seed(cell_store):
    """Depth 2 next to the answered depth 1: the neighbour's recipe is its first trial, the
    probe comes from the neighbour's fitted crossing, and its sampler seed is its own."""
    from study import probe, recipe_search
    from study.cell_engine import CellRun, cell_seed
    from study.storage import open_storage

    storage, answer, _ = cell_store
    plan = FrontierPlan.from_dict({**PLAN.identity(), "probe_neurons": None})
    cell = Cell(0, 2, 200)
    run = CellRun(storage, open_storage(storage), cell, plan, TINY, 1, lambda _: None)
    recipe_search.begin(run, run.recipes)
    waiting = run.recipes.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [
        Recipe.from_params(answer["recipe"]).search_params()
    ]
    neighbour = FrontierAnswer.from_dict(answer)
    assert run.probe == probe.probe_for(cell, [neighbour])
    assert run.probe == round(answer["fitted_width_90"] * probe.DEPTH_FACTOR[2])
    seeds = {cell_seed(Cell(f, d, b)) for f in (0, 1) for d in (1, 2) for b in (200, 400)}
    assert len(seeds) == 8
    assert stored_attrs(run.recipes)["sampler_seed"] == cell_seed(cell)
    recipe_search.begin(run, run.recipes)  # once per cell: nothing enqueued twice
    assert len(run.recipes.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1


def test_probes_sit_near_the_boundary():
    from study.probe import probe_for

    assert probe_for(Cell(0, 1, 2000)) == 72
    assert probe_for(Cell(0, 2, 2000)) == round(72 * 0.85)
    assert probe_for(Cell(0, 1, 64000)) < probe_for(Cell(0, 1, 16000)) < 60


def _answered(function_seed, depth, budget, crossing):
    """What `probe_for` reads of an answer: its cell and its fitted crossing."""
    return SimpleNamespace(
        cell=Cell(function_seed, depth, budget), curve=SimpleNamespace(crossing=crossing)
    )


def test_probes_follow_the_answered_budgets_of_the_cells_function_and_depth():
    """Between two answered budgets the probe is interpolated in log width over log budget;
    beyond them it continues at the slope of the two nearest (never rising with budget, never
    falling faster than budget^-BUDGET_SHRINK); one answer gives no slope, and other functions
    or depths are used only when the cell's own have no answer."""
    from study.probe import BUDGET_SHRINK, DEPTH_FACTOR, probe_for

    d1 = [_answered(0, 1, 2000, 70.0), _answered(0, 1, 8000, 56.0)]
    assert probe_for(Cell(0, 1, 4000), d1) == round(math.sqrt(70 * 56)) == 63
    assert probe_for(Cell(0, 1, 8000), d1) == 56
    flat = [_answered(0, 1, 8000, 58.0), _answered(0, 1, 16000, 57.0)]
    slope = math.log(58 / 57) / math.log(2)
    assert probe_for(Cell(0, 1, 64000), flat) == round(57 * 4**-slope) == 55
    assert round(57 * 4**-BUDGET_SHRINK) == 48  # what the fixed exponent gave
    rising = [_answered(0, 1, 8000, 55.0), _answered(0, 1, 16000, 57.0)]
    assert probe_for(Cell(0, 1, 32000), rising) == 57
    steep = [_answered(0, 1, 500, 120.0), _answered(0, 1, 1000, 80.0)]
    assert probe_for(Cell(0, 1, 4000), steep) == round(80 * 4**-BUDGET_SHRINK)
    assert probe_for(Cell(0, 1, 250), steep) == round(120 * 2**BUDGET_SHRINK)
    one = [_answered(0, 1, 16000, 57.0)]
    assert probe_for(Cell(0, 1, 32000), one) == round(57 * 2**-BUDGET_SHRINK)
    others = [_answered(1, 1, 16000, 54.0), _answered(0, 2, 16000, 50.0), *one]
    assert probe_for(Cell(0, 1, 16000), others) == 57  # its own function and depth first
    assert probe_for(Cell(0, 3, 16000), others) == round(50 / DEPTH_FACTOR[2] * DEPTH_FACTOR[3])
    assert probe_for(Cell(2, 1, 16000), [others[0]]) == 54  # another function, same cell


def test_the_report_replays_the_probe_rule_on_the_committed_store():
    """Per cell of results/frontier.db, in the order the recipe searches began: the probe each
    used (the one stored with its search), and this version's rule on the answers finished
    before then; the rule probes nearer the boundaries the cells found than the probes used."""
    from pathlib import Path

    from study.cell_engine import PROBE_ATTR
    from study.report_frontier import frontier_answers, probe_lines, probe_table

    storage = f"sqlite:///{Path(__file__).parent.parent / 'results/frontier.db'}"
    answers = frontier_answers(storage)
    table = probe_table(storage, answers)
    assert sorted(table["cell"]) == sorted(a.cell.name for a in answers)
    for cell, used in zip(table["cell"], table["probe used"], strict=True):
        search = optuna.load_study(study_name=f"{cell}-recipe", storage=storage)
        assert used == stored_attrs(search)[PROBE_ATTR]
    known = list(table["answers known"])
    assert known[0] == 0 and known == sorted(known) and known[-1] < len(answers)
    first = table.iloc[0]
    assert first["probe now"] == first["probe used"]  # nothing known: the same table

    def off(column):
        return (table[column] - table["fitted 90% crossing"]).abs()[table["answers known"] > 0]

    assert off("probe now").mean() < off("probe used").mean()
    lines = probe_lines(table)
    assert lines[0] == "## How near the probes were"
    assert f"{off('probe now').mean():.2f} neurons on average" in lines[2]


TWO_PROCESSES = """
import sys
from study.config import BooleanSettings, FrontierGrid
from study.frontier import run_frontier
plan = dict(recipe_trials=8, recipe_seeds=2, selection_seeds=4, heldout_seeds=20,
            confirmation_seeds=20, probe_neurons=16)
grid = FrontierGrid(function_seeds=(0, 1, 2, 3), depths=(1,), budgets=(200,))
answers = run_frontier(sys.argv[1], grid, plan, threads=1, log=lambda line: None,
                       settings=BooleanSettings(input_bits=4, output_bits=3))
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


@pytest.mark.parametrize("path", ["results/answers.json", "results/frontier3/answers.json"])
def test_every_committed_answer_reads_back_typed_with_scipys_intervals(path):
    """The committed answers (method 2's grid, method 3's cells) are the schema's object; every
    answer read and written again is the same, the intervals recomputed by scipy's exact method
    included, and carries what reproduces it."""
    from pathlib import Path

    root = Path(__file__).parent.parent
    document = json.loads((root / path).read_text())
    assert document["schema_version"] == SCHEMA_VERSION and document["answers"]
    for entry in document["answers"]:
        entry = dict(entry)
        widths = entry.pop("fitted_widths")
        answer = FrontierAnswer.from_dict(entry)
        assert answer.to_dict() == entry
        assert widths == fitted_widths(answer.curve)
        for key in (*REPRODUCE, "depth", "fitted_width_90", "fitted_width_90_interval",
                    "confirmation_seeds", "confirmation_successes"):  # fmt: skip
            assert key in entry, key
        assert entry["confirmation_seeds"] >= 96
        assert not entry["code_commit"].endswith("-dirty")
        if entry["method"] >= 3:  # stated by the rule on its own seeds, every block kept
            from study.stating_rule import StatingRule

            pooled = answer.all_heldout
            assert [b.block for b in answer.blocks] == list(pooled.blocks)
            assert sum(b.seeds for b in answer.blocks) == pooled.seeds >= 192
            assert StatingRule.of(answer.plan).holds(pooled.successes, pooled.seeds,
                                                     len(pooled.blocks))  # fmt: skip
            assert all(b.first_seed >= 2**59 for b in answer.blocks)


def test_a_cell_resumed_with_another_plan_is_refused_before_anything_is_written(cell_store):
    from study.errors import ConfigError
    from study.overview import best_of

    storage, answer, _ = cell_store
    before = {t.number for t in stored(storage).trials}
    grid = FrontierGrid((0,), (1,), (200,))
    with pytest.raises(ConfigError, match="exists with another plan: heldout_seeds=24"):
        run_frontier(storage, grid, {"heldout_seeds": 24}, settings=TINY, log=lambda _: None)
    assert {t.number for t in stored(storage).trials} == before
    # flags that repeat the stored plan, or none, resume it; `study best` shows the answer
    again = run_frontier(storage, grid, {"heldout_seeds": 20}, settings=TINY, log=lambda _: None)
    assert [a.to_dict() for a in again] == [answer]
    assert best_of(answer["study"], storage)["answer"] == answer


def test_a_stopped_frontier_fails_its_evaluations_and_says_how_far_it_got(tmp_path, monkeypatch):
    """A stop inside training: the claimed evaluations are failed with the stop's reason (none
    left RUNNING), and the line says how many cells were answered."""
    from study import interrupt

    calls = []

    def stop_on_the_second_check() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise interrupt.Stopped(interrupt.SIGTERM)

    monkeypatch.setattr(interrupt, "check", stop_on_the_second_check)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    grid = FrontierGrid((0,), (1,), (200,))
    with pytest.raises(interrupt.Stopped) as stopped:
        run_frontier(storage, grid, PLAN.identity(), settings=TINY, log=lambda _: None)
    assert str(stopped.value).startswith("terminated (SIGTERM): 0 of 1 frontier cells answered")
    assert interrupt.ending(stopped.value)[1] == 143
    recipes = optuna.load_study(study_name="frontier-f0-d1-b200-recipe", storage=storage)
    assert {t.state.name for t in recipes.trials} == {"FAIL"}
    assert {t.user_attrs["fail_reason"] for t in recipes.trials} == {interrupt.SIGTERM.reason}


@pytest.mark.slow
def test_the_main_job_states_w_1_and_w_2(tmp_path):
    """`make study` is the frontier at 2,000 epochs for one and two hidden layers, then its
    report; the same two commands here at the same 2,000 epochs and a small plan: each answer
    printed as it is stated, then w_1 and w_2 with their rates, the command recorded with the
    answers. (At 1,000 epochs the small plan's three recipe trials find a slow recipe whose
    success curve is shallow at 90%, and whether a width is confirmed within the four attempts
    turns on the machine's rounding; at 2,000 the curve is steep and the first width holds.)"""
    from pathlib import Path

    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    target = makefile.split("\nstudy:", 1)[1].split("\n\n", 1)[0]
    assert "BUDGET ?= 2000" in makefile
    assert "frontier run --budgets $(BUDGET) --depths 1,2 --storage $(STORAGE)" in target
    assert "frontier report --storage $(STORAGE)" in target
    storage = f"sqlite:///{tmp_path / 'mine.db'}"
    plan = ["--recipe-trials", "3", "--recipe-seeds", "2", "--selection-seeds", "4",
            "--heldout-seeds", "20", "--confirmation-seeds", "20",
            "--stated-seeds", "40"]  # fmt: skip
    run = ["frontier", "run", "--budgets", "2000", "--depths", "1,2", "--storage", storage, *plan]
    done = cli(*run, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for depth in (1, 2):
        assert (
            f"frontier-f0-d{depth}-b2000: " in done.stdout
            and "of the seeds it was trained on (95% " in done.stdout
        )
    report = cli("frontier", "report", "--storage", storage, "--out", str(tmp_path / "r"))
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert lines[0].startswith("w_1 = ") and lines[1].startswith("w_2 = ")
    assert " at 2000 epochs: learns f on " in lines[0] and "fitted 90% crossing" in lines[1]
    # the pooled rate over every seed the stated width was trained on, not its best block
    for line, answer in zip(lines[:2], json.loads((tmp_path / "r" / "answers.json").read_text())[
            "answers"], strict=True):  # fmt: skip
        pooled = answer["all_heldout"]
        assert f"{pooled['heldout_successes']}/{pooled['heldout_seeds']} of the seeds" in line
    document = json.loads((tmp_path / "r" / "answers.json").read_text())
    assert [a["depth"] for a in document["answers"]] == [1, 2]
    assert document["answers"][0]["command"] == "study " + " ".join(run)


# ----------------------------------------------------------------------------------------------
# recheck


def _answers_file(tmp_path, answer, name="answers.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "answers": [answer]}))
    return path


def test_a_recheck_retrains_the_stated_width_on_fresh_seeds_and_resumes(cell_store, tmp_path):
    """`study frontier recheck` trains the stated width with its recipe and budget on seeds no
    run used, as a network built and trained here by hand from answers.json's fields does;
    a rerun with more seeds reads the first ones back, a changed recipe trains them anew."""
    import torch

    from study.answers import cell_first_seed
    from study.config import TrainConfig
    from study.data import boolean_function
    from study.models import build_boolean_net
    from study.trainer import train

    _, answer, _ = cell_store
    path = _answers_file(tmp_path, answer)
    done = cli("frontier", "recheck", "--answers", str(path), "--seeds", "4", "--processes", "2")
    assert done.returncode == 0, done.stderr
    assert "4 to train with the sequential engine on 2 processes" in done.stdout
    document = json.loads((tmp_path / "recheck.json").read_text())
    (entry,) = document["rechecks"]
    assert entry["study"] == answer["study"] and entry["neurons"] == answer["neurons"]
    seeds = entry["seeds"]
    first = cell_first_seed(answer["study"], "recheck")  # the cell's own recheck seeds
    assert [s["seed"] for s in seeds] == list(range(first, first + 4))
    assert entry["first_seed"] == first
    pooled = answer["all_heldout"]  # what stated the width (method 3: every seed, pooled)
    assert entry["stated_on"] == [pooled["heldout_successes"], pooled["heldout_seeds"]]
    assert f"stated on {pooled['heldout_successes']}/{pooled['heldout_seeds']}" in done.stdout
    assert entry["successes"] == sum(s["learned"] for s in seeds)
    verdict = f"{entry['successes']}/4 recheck seeds"
    assert (
        verdict in done.stdout
        and f"| {entry['successes']}/4 " in (tmp_path / "recheck.md").read_text()
    )
    recipe, fn = answer["recipe"], boolean_function(4, 0, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the recheck's workers
    try:
        for stored_seed in seeds[:2]:
            config = TrainConfig(optimizer="adam", learning_rate=recipe["learning_rate"],
                                 batch_size=recipe["batch_size"], epochs=answer["budget_epochs"],
                                 lr_schedule=recipe["lr_schedule"],
                                 warmup_fraction=recipe["warmup_fraction"],
                                 lr_floor=recipe["lr_floor"], seed=stored_seed["seed"],
                                 target_loss=answer["target_loss"])  # fmt: skip
            net = build_boolean_net(answer["profile"], 4, 3, stored_seed["seed"])
            result = train(net, fn.task(), config)
            assert stored_seed["learned"] == result.reached_target
            assert stored_seed["epochs"] == result.history[-1].epoch
    finally:
        torch.set_num_threads(threads)
    more = cli("frontier", "recheck", "--answers", str(path), "--seeds", "6", "--quiet")
    assert more.returncode == 0, more.stderr
    again = json.loads((tmp_path / "recheck.json").read_text())["rechecks"][0]
    assert again["seeds"][:4] == seeds and len(again["seeds"]) == 6
    fewer = cli("frontier", "recheck", "--answers", str(path), "--seeds", "2", "--quiet")
    first_two = sum(s["learned"] for s in seeds[:2])
    assert fewer.returncode == 0 and f"{first_two}/2 recheck seeds" in fewer.stdout, fewer.stdout
    kept = json.loads((tmp_path / "recheck.json").read_text())["rechecks"][0]
    assert kept == again  # nothing trained: the stored recheck stays as it was, all six seeds
    # the engine the answer was stated with, on the same seeds, stored beside the sequential
    population = cli("frontier", "recheck", "--answers", str(path), "--seeds", "4",
                     "--engine", "population", "--processes", "2")  # fmt: skip
    assert population.returncode == 0, population.stderr
    assert "4 to train with the population engine on 2 threads" in population.stdout
    stored = json.loads((tmp_path / "recheck.json").read_text())["rechecks"]
    both = {e["engine"]: e for e in stored}
    assert both["sequential"] == again
    assert [s["seed"] for s in both["population"]["seeds"]] == [s["seed"] for s in seeds]
    table = (tmp_path / "recheck.md").read_text()
    assert "| sequential " in table and "| population " in table
    changed = {**answer, "recipe": {**recipe, "learning_rate": recipe["learning_rate"] / 2}}
    _answers_file(tmp_path, changed)
    anew = cli("frontier", "recheck", "--answers", str(path), "--seeds", "2")
    assert anew.returncode == 0 and "2 to train" in anew.stdout, anew.stderr


def test_a_recheck_says_when_a_width_falls_short():
    """Short of the required rate: fewer successes than would happen 5% of the time there."""
    from scipy.stats import binom

    from study.recheck import Recheck, SeedResult

    answer = SimpleNamespace(plan=SimpleNamespace(required_rate=0.9))
    for successes, holds in ((43, True), (40, True), (39, False), (30, False)):
        seeds = tuple(SeedResult(i, i < successes, 10, 0.1, 0.1) for i in range(48))
        check = Recheck(answer, seeds)
        assert check.chance == pytest.approx(binom.cdf(successes, 48, 0.9))
        assert check.holds is holds, successes
    assert binom.cdf(40, 48, 0.9) >= 0.05 > binom.cdf(39, 48, 0.9)


def test_recheck_seeds_are_no_runs_seeds():
    from study.answers import HELDOUT_BLOCK, first_seed
    from study.config import MAX_SEEDS, RECHECK_SEED

    assert SELECTION_SEED + MAX_SEEDS < HELDOUT_SEED
    # confirmation blocks CONFIRM_BLOCK .. CONFIRM_BLOCK + 499 all end below the recheck seeds
    assert first_seed(CONFIRM_BLOCK + 499) + HELDOUT_BLOCK <= RECHECK_SEED


def test_recheck_bad_input_is_one_line(cell_store, tmp_path):
    _, answer, _ = cell_store
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "old.json").write_text(json.dumps([answer]))
    good = _answers_file(tmp_path, answer)
    cases = {
        ("--answers", str(tmp_path / "none.json")): "does not exist",
        ("--answers", str(tmp_path / "bad.json")): "cannot read",
        ("--answers", str(tmp_path / "old.json")): "not a frontier answers file",
        ("--answers", str(good), "--cells", "frontier-f9-d1-b200"): "not in",
        ("--answers", str(good), "--seeds", "0"): "--seeds",
    }
    for args, words in cases.items():
        done = cli("frontier", "recheck", *args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert words in done.stderr, (args, done.stderr)
    assert not (tmp_path / "recheck.json").exists()


@pytest.mark.parametrize(("signum", "status"), [(2, 130), (15, 143)])
def test_a_stopped_recheck_keeps_its_seeds_and_its_workers_end(cell_store, tmp_path, signum,
                                                               status):  # fmt: skip
    """Ctrl-C or SIGTERM: the workers end, the seeds done stay in recheck.json (one line says
    so; an answer not reached yet is not written), and the same command with as many seeds
    trains none again."""
    import os
    import subprocess
    import sys
    import time

    _, answer, _ = cell_store
    shorter = {**answer, "study": "frontier-f0-d1-b100", "budget_epochs": 100}
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "answers": [answer, shorter]}))
    args = [sys.executable, "-m", "study.cli", "frontier", "recheck", "--answers", str(path)]
    parent = subprocess.Popen([*args, "--seeds", "5000", "--processes", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    stored = tmp_path / "recheck.json"
    deadline = time.monotonic() + 120
    while not stored.exists() and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stored.exists(), parent.stderr.read() if parent.poll() is not None else "too slow"
    children = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True,
                              text=True).stdout.split()  # fmt: skip
    parent.send_signal(signum)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == status, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("study: ") and "run the same command again to continue" in last, stderr
    for pid in map(int, children):
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"worker {pid} still running")
    (entry,) = json.loads(stored.read_text())["rechecks"]
    seeds, kept = entry["seeds"], len(entry["seeds"])
    assert entry["study"] == answer["study"] and kept >= 1 and f"{kept} recheck seeds kept" in last
    again = subprocess.run([*args, "--seeds", str(kept), "--cells", answer["study"]],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0 and "0 to train" in again.stdout, again.stderr
    assert json.loads(stored.read_text())["rechecks"][0]["seeds"] == seeds


def test_a_cell_its_plan_cannot_answer_is_a_research_outcome_not_an_error(tmp_path):
    """One epoch is too short for any width to learn f: the cell's width search runs to the
    largest width and the cell states no answer. That is a result (stored with the cell, read
    back without training, listed by the report), not an error that stops the other cells."""
    from study.answers import NoAnswer
    from study.report_frontier import write_frontier_report

    storage = f"sqlite:///{tmp_path / 'n.db'}"
    outcome = run_cell(storage, Cell(0, 1, 1), PLAN, threads=1, log=lambda _: None,
                       settings=TINY)  # fmt: skip
    assert isinstance(outcome, NoAnswer), outcome
    assert outcome.reason.startswith("no width up to ") and outcome.cell == Cell(0, 1, 1)
    cell = optuna.load_study(study_name=Cell(0, 1, 1).name, storage=storage)
    assert stored_attrs(cell)["no_answer"] == outcome.reason and "answer" not in stored_attrs(cell)
    trained = len(cell.trials)
    assert run_cell(storage, Cell(0, 1, 1), PLAN, threads=1, log=lambda _: None,
                    settings=TINY) == outcome  # fmt: skip
    assert len(optuna.load_study(study_name=Cell(0, 1, 1).name, storage=storage).trials) == trained
    summary = write_frontier_report(storage, tmp_path / "r", tmp_path / "r" / "answers.json")
    text = summary.read_text()
    assert "## Cells without an answer" in text and f"- {Cell(0, 1, 1).name}: no width" in text
    assert json.loads((tmp_path / "r" / "answers.json").read_text())["answers"] == []


def test_a_method_2_plan_is_stored_as_its_cells_stored_it():
    """Cells of method 2 resume with their stored plan: its identity has no field only method 3
    reads, and reads back equal; a new cell's plan is method 3 with the rule's fields."""
    old = {k: v for k, v in FrontierPlan().identity().items()
           if k not in ("stated_seeds", "stated_margin")} | {"method": 2}  # fmt: skip
    plan = FrontierPlan.from_dict(old)
    assert plan.identity() == old and FrontierPlan.from_dict(plan.identity()) == plan
    new = FrontierPlan().identity()
    assert new["method"] == 3 and (new["stated_seeds"], new["stated_margin"]) == (192, 0.05)
