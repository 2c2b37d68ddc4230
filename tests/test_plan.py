"""The plan of a study with a time budget (study/plan.py): the rule that fits rungs to the
budget and the measured costs, the asynchronous successive-halving schedule, and a planned
image study end to end; checkpoints of trials the budget stopped, resumed by the next run."""

import itertools
import json

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from study import interrupt
from study import plan as plan_mod
from study.errors import ConfigError
from study.plan import Costs, Plan, Promotion, fit, next_job
from study.runner import run_study
from study.studies import stored_attrs
from tests.conftest import write_fake_dataset

# ----------------------------------------------------------------------------------------------
# the rule


@pytest.mark.parametrize(
    ("trial", "export", "max_epochs", "rungs"),
    [(13.5, 14.4, 18, (18,)), (28.0, 20.0, 18, (6, 18)), (55.0, 45.0, 100, (2, 5, 16))],
    ids=["bf16-here", "fp32-here", "slow-fp32"],
)
def test_the_shallowest_halving_that_searches_and_fits_the_budget(trial, export, max_epochs,
                                                                  rungs):  # fmt: skip
    """Two workers, an hour: a fast machine searches 27 configurations at the space's 18
    epochs with no halving; fp32 here needs one rung below (6 epochs) to try 16 or more; a
    machine four times slower needs two (2 and 5 epochs) and gets 16 epochs at the top."""
    costs = Costs(trial, export, overhead_seconds=10.0)
    plan = fit(3600, 2, costs, max_epochs, exports=True, started=0.0)
    assert plan.rungs == rungs
    planned = plan.planned()
    assert planned[0] >= plan_mod.MIN_CONFIGURATIONS
    assert all(a >= b for a, b in itertools.pairwise(planned))
    # what the plan trains (each rung's configurations x its epochs), shared by two workers,
    # and the export of the top rung fit the budget
    per_worker = sum(n * r for n, r in zip(planned, plan.rungs, strict=True)) / 2
    assert 10.0 + per_worker * trial + plan.export_seconds(plan.top) <= 3600 * 1.05
    if len(rungs) > 1:  # without the lowest rung, fewer than the minimum would fit
        shallower = fit(3600, 2, costs, max_epochs, True, 0.0, stored_rungs=rungs[1:])
        assert shallower.configurations < plan_mod.MIN_CONFIGURATIONS
    assert f"{plan.top}" in plan.why() and "measured here" in plan.why()


def test_a_slower_machine_gets_fewer_epochs_at_the_top_and_more_rungs():
    fast = fit(3600, 2, Costs(13.5, 14.4, 10.0), 18, True, 0.0)
    slow = fit(3600, 2, Costs(55.0, 45.0, 10.0), 18, True, 0.0)
    assert slow.top < fast.top and len(slow.rungs) > len(fast.rungs)


def test_a_budget_without_room_for_an_epoch_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^timeout: 60 s holds not one epoch per worker") as e:
        fit(60, 2, Costs(55.0, 45.0, 10.0), 18, True, 0.0)
    assert "\n" not in str(e.value)


def test_a_study_keeps_its_stored_rungs():
    plan = fit(600, 2, Costs(13.5, 14.4, 10.0), 18, True, 0.0, stored_rungs=[2, 6, 18])
    assert plan.rungs == (2, 6, 18) and not plan.fitted and "stored" in plan.why()


def test_the_export_reserve_comes_from_the_measured_export_rate():
    plan = fit(3600, 2, Costs(10.0, 8.0, 5.0), 30, True, 0.0)
    fixed = plan_mod.EXPORT_FIXED_SECONDS
    # a configuration twice as slow as the baseline in a trial is twice as slow to export
    assert plan.export_seconds(10, 2.0) - fixed == pytest.approx(
        2 * (plan.export_seconds(10) - fixed)
    )
    assert plan.export_seconds(10) == pytest.approx(10 * 8.0 * plan_mod.EXPORT_MARGIN + fixed)
    assert fit(3600, 2, Costs(10.0, 8.0, 5.0), 30, False, 0.0).export_seconds(10) == 0.0


# ----------------------------------------------------------------------------------------------
# the schedule


def _plan(budget=1000.0, rungs=(1, 3, 9), started=0.0, exports=False) -> Plan:
    return Plan(budget_seconds=budget, started=started, workers=2, rungs=rungs,
                trial_seconds_per_epoch=10.0, export_seconds_per_epoch=10.0,
                overhead_seconds=0.0, exports=exports)  # fmt: skip


def _study(values_by_rung: dict[int, list[float]], promoted=()) -> optuna.Study:
    """Complete trials with the given values at each rung (x = the value), 10 s an epoch."""
    study = optuna.create_study(direction="maximize")
    for rung, values in values_by_rung.items():
        for value in values:
            attrs = {plan_mod.RUNG_ATTR: rung, "seconds_per_epoch": 10.0}
            x = {"x": FloatDistribution(0, 1)}
            study.add_trial(
                create_trial(value=value, params={"x": value}, user_attrs=attrs, distributions=x)
            )
    for number in promoted:
        attrs = {plan_mod.RUNG_ATTR: 1, plan_mod.PROMOTED_FROM_ATTR: number}
        study.add_trial(create_trial(state=TrialState.WAITING, user_attrs=attrs))
    return study


def test_asha_promotes_the_best_of_the_top_third_highest_rung_first():
    study = _study({0: [0.5, 0.9, 0.7, 0.6, 0.8, 0.4]})
    job = next_job(study, _plan(), now=0.0)
    assert isinstance(job, Promotion) and job.rung == 1 and job.trial.value == 0.9
    # 0.9 promoted already: the second of the top third (6 // 3 = 2) goes next
    study = _study({0: [0.5, 0.9, 0.7, 0.6, 0.8, 0.4]}, promoted=[1])
    assert next_job(study, _plan(), now=0.0).trial.value == 0.8
    # both promoted: a new configuration
    assert next_job(_study({0: [0.5, 0.9, 0.7, 0.6, 0.8, 0.4]}, promoted=[1, 4]), _plan(), 0.0) \
        == plan_mod.NEW  # fmt: skip
    # three finished at rung 1: its best climbs to rung 2 before anything at rung 0
    study = _study({0: [0.5, 0.9, 0.7], 1: [0.91, 0.93, 0.92]})
    job = next_job(study, _plan(), now=0.0)
    assert job.rung == 2 and job.trial.value == 0.93


def test_near_the_end_only_promotions_run_and_then_nothing():
    study = _study({0: [0.5, 0.9]})  # too few for ASHA's top third
    plan = _plan(budget=1000.0)
    assert next_job(study, plan, now=0.0) == plan_mod.NEW
    # a new configuration could no longer climb (1 + 3 + 9 epochs, 130 s) before the deadline:
    # the best of rung 0 is promoted although its rung has fewer than three
    job = next_job(study, plan, now=1000.0 - 100.0)
    assert isinstance(job, Promotion) and job.trial.value == 0.9 and job.rung == 1
    # and when not even that fits (3 epochs, 30 s), nothing: the worker stops
    assert next_job(study, plan, now=1000.0 - 20.0) is None


def test_the_deadline_leaves_the_export_of_the_best_trial_at_the_top_rung():
    study = _study({0: [0.5, 0.9]})
    plan = _plan(budget=1000.0, exports=True)
    assert plan_mod.deadline(study, plan) == pytest.approx(1000.0 - plan.export_seconds(9))
    # the best trial's epoch took twice the baseline trial's, side by side: twice the export
    attrs = {plan_mod.RUNG_ATTR: 0, "seconds_per_epoch": 5.0, "baseline": True}
    study.add_trial(create_trial(value=0.4, params={"x": 0.4}, user_attrs=attrs,
                                 distributions={"x": FloatDistribution(0, 1)}))  # fmt: skip
    assert plan_mod.deadline(study, plan) == pytest.approx(1000.0 - plan.export_seconds(9, 2.0))


def test_a_promotion_repeats_the_parameters_with_its_rung(tmp_path):
    study = _study({0: [0.5, 0.9, 0.7]})
    plan_mod.promote(study, Promotion(study.trials[1], 1))
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    assert waiting.user_attrs[plan_mod.RUNG_ATTR] == 1
    assert waiting.user_attrs[plan_mod.PROMOTED_FROM_ATTR] == 1
    assert waiting.system_attrs["fixed_params"] == {"x": 0.9}


# ----------------------------------------------------------------------------------------------
# a planned image study, end to end (tiny IDX files)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    return write_fake_dataset(tmp_path_factory.mktemp("images"), train=600, test=100)


SETTINGS = {"validation_size": 200, "min_epochs": 1, "max_epochs": 9}


def test_a_planned_study_climbs_its_rungs_and_exports_within_the_budget(tmp_path, images_dir):
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    study = run_study("fashion-cnn", trials=60, storage=url, sampler_seed=0, device="cpu",
                      settings=SETTINGS, quiet=True, data_dir=str(images_dir), timeout=60.0,
                      export=True, export_dir=str(tmp_path / "out"))  # fmt: skip
    (plan,) = stored_attrs(study)[plan_mod.PLANS_ATTR]
    rungs = plan["rungs"]
    assert rungs[-1] <= 9 and plan["fitted"] and "measured here" in plan["why"]
    assert stored_attrs(study)["run"] == {"sampler": "tpe", "pruner": "none", "fidelity": "plan"}
    trials = {t.number: t for t in study.trials}
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    for t in complete:  # each trial trained its rung's epochs, with its full schedule
        rung = t.user_attrs[plan_mod.RUNG_ATTR]
        assert t.user_attrs["config"]["train"]["epochs"] == rungs[rung]
        assert len(t.user_attrs["history"]) == rungs[rung]
        if rung > 0:  # a promotion repeats a finished configuration of the rung below
            below = trials[t.user_attrs[plan_mod.PROMOTED_FROM_ATTR]]
            assert below.user_attrs[plan_mod.RUNG_ATTR] == rung - 1 and below.params == t.params
    assert {t.user_attrs[plan_mod.RUNG_ATTR] for t in complete} == set(range(len(rungs)))
    assert trials[0].user_attrs["baseline"] and trials[0].user_attrs[plan_mod.RUNG_ATTR] == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["trial"] == study.best_trial.number
    assert metrics["study_seconds"] + metrics["export_seconds"] <= 60.0 + 5.0
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_a_planned_study_is_refused_without_a_budget_or_with_a_pruner(tmp_path, images_dir):
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    common = {"storage": url, "device": "cpu", "settings": SETTINGS, "quiet": True,
              "data_dir": str(images_dir)}  # fmt: skip
    with pytest.raises(ConfigError, match=r"^pruner: a study planned by its budget"):
        run_study("fashion-cnn", trials=1, timeout=30.0, pruner="median", **common)
    with pytest.raises(ConfigError, match=r"^timeout: study 'fashion-cnn' is planned"):
        run_study("fashion-cnn", trials=1, fidelity="plan", **common)
    with pytest.raises(ConfigError, match=r"^timeout: 0.2 s holds not one epoch"):
        run_study("fashion-cnn", trials=1, timeout=0.2, **common)
    assert optuna.get_all_study_names(url) == []  # nothing written
    run_study("fashion-cnn", trials=1, timeout=30.0, sampler_seed=0, **common)
    with pytest.raises(ConfigError, match=r"^timeout: study 'fashion-cnn' is planned"):
        run_study("fashion-cnn", trials=2, **common)  # resumed without a budget


# ----------------------------------------------------------------------------------------------
# checkpoints: a trial the budget stopped goes on in the next run, exactly


def test_a_trial_stopped_by_the_budget_goes_on_from_its_checkpoint(tmp_path, images_dir,
                                                                  monkeypatch):  # fmt: skip
    """The baseline, stopped by the time budget after epoch 2 of 4: its checkpoint is stored
    in the store's artifacts and carried by the re-queued copy; the next run trains epochs 3
    and 4 only, and ends with exactly the history and value of a run that was never stopped.
    The spent checkpoint's file is removed."""
    settings = {**SETTINGS, "max_epochs": 4, "min_epochs": 4}
    common = {"trials": 1, "device": "cpu", "settings": settings, "quiet": True,
              "data_dir": str(images_dir), "sampler_seed": 0}  # fmt: skip
    whole = run_study("fashion-cnn", storage=f"sqlite:///{tmp_path / 'whole.db'}", **common)

    import study.image_objective as objective

    real_check, calls = interrupt.check, []

    def budget_after_epoch_two(trial=None):
        calls.append(trial is not None)  # the objective's check, after each epoch but the last
        if sum(calls) == 2:
            interrupt.set_deadline(0.0)  # as if the run's time ran out at this boundary
        real_check(trial)

    monkeypatch.setattr(objective.interrupt, "check", budget_after_epoch_two)
    url = f"sqlite:///{tmp_path / 'stopped.db'}"
    stopped = run_study("fashion-cnn", storage=url, **common)
    monkeypatch.setattr(objective.interrupt, "check", real_check)
    (failed,) = stopped.get_trials(states=(TrialState.FAIL,))
    (waiting,) = stopped.get_trials(states=(TrialState.WAITING,))
    record = waiting.user_attrs["checkpoint"]
    assert record["epoch"] == 2 and failed.user_attrs["checkpoint"] == record
    files = list((tmp_path / "stopped.db.artifacts").iterdir())
    assert [f.name for f in files] == [record["artifact"]]

    resumed = run_study("fashion-cnn", storage=url, **common)
    (done,) = resumed.get_trials(states=(TrialState.COMPLETE,))
    assert done.user_attrs["resumed_after_epoch"] == 2
    (straight,) = whole.get_trials(states=(TrialState.COMPLETE,))
    assert done.value == straight.value
    strip = ("seconds",)
    rows = [{k: v for k, v in r.items() if k not in strip} for r in done.user_attrs["history"]]
    assert rows == [
        {k: v for k, v in r.items() if k not in strip} for r in straight.user_attrs["history"]
    ]
    assert done.intermediate_values == straight.intermediate_values
    assert not (tmp_path / "stopped.db.artifacts" / record["artifact"]).exists()
    assert torch.get_num_threads() >= 1


def test_the_report_shows_the_plan_and_what_each_rung_holds(tmp_path, images_dir):
    from study.report import write_report

    url = f"sqlite:///{tmp_path / 'plan.db'}"
    run_study("fashion-cnn", trials=6, storage=url, sampler_seed=0, device="cpu",
              settings=SETTINGS, quiet=True, data_dir=str(images_dir), timeout=40.0)  # fmt: skip
    write_report("fashion-cnn", url, tmp_path / "report")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "fidelity: planned by the time budget" in summary
    assert "run 1: budget 40 s, 1 worker(s); measured here: a trial's epoch" in summary
    assert "| rung | epochs | planned | complete |" in summary.replace("   ", " ").replace(
        "  ", " "
    )


# ----------------------------------------------------------------------------------------------
# study bench hour, on tiny IDX files and a half-minute "hour"


@pytest.mark.slow
def test_a_baseline_hour_serves_the_runs_whose_epochs_are_within_five_percent():
    from study.bench_hour import _near

    key = {"study": "fashion-cnn", "cpu": "x", "precision": "bf16", "minutes": 60.0}
    rows = [{**key, "epochs": 172}, {**key, "epochs": 309}, {**key, "precision": "fp32",
            "epochs": 200}]  # fmt: skip
    assert _near(rows, key, 170)["epochs"] == 172
    assert _near(rows, key, 300)["epochs"] == 309
    assert _near(rows, key, 240) is None  # neither is within 5%
    assert _near(rows, {**key, "precision": "fp32"}, 172) is None


def test_bench_hour_runs_the_search_hour_and_the_baseline_hour_and_resumes(tmp_path, images_dir):
    """The search hour as the user's command, three seeds of its export, the baseline trained
    for the same budget with three seeds; a second call reads everything back and trains
    nothing; an hour cut short is refused in one line, not resumed."""
    from search_spaces import get_space
    from study import bench_hour

    url = f"sqlite:///{tmp_path / 'hour.db'}"
    out = tmp_path / "bench"
    tiny = {"precision": "fp32", "minutes": 0.5, "workers": 1, "data_dir": str(images_dir),
            "settings": SETTINGS}  # fmt: skip
    run = bench_hour.bench_hour(url, out, log=lambda *a: None, baseline_jobs=2, **tiny)
    for key in ("precision", "cpu", "sampler_seed", "study_seconds", "export_seconds",
                "best_is_baseline", "test_accuracy_seeds", "baseline_hour_epochs",
                "baseline_hour_test_accuracy_seeds"):  # fmt: skip
        assert key in run, key
    assert run["precision"] == "fp32" and len(run["test_accuracy_seeds"]) == 3
    assert len(run["baseline_hour_test_accuracy_seeds"]) == 3 and run["baseline_hour_epochs"] >= 1
    assert len(run["baseline_epoch_seconds"]) == 2 and run["machine_drift"] >= 1
    assert (
        run["baseline_hour_epochs"]
        == run["baseline_hour_epochs_fitting"]
        == max(1, int(30 // (sum(run["baseline_epoch_seconds"]) / 2)))
    )
    assert "steady_machine" in run["targets_met"]
    baseline = json.loads((out / "hour-baseline-cpu.json").read_text())[0]
    first = get_space("fashion-cnn").base_settings().seed
    assert baseline["seeds"] == [first, first + 1, first + 2]
    assert baseline["seed_jobs"] == 2 and run["baseline_hour_seed_jobs"] == 2
    assert run["command_seconds"] <= 30 + 30  # the budget, and a subprocess's start-up
    assert run["rungs"] and "measured here" in run["plan"]
    stored = json.loads((out / "hour-cpu.json").read_text())
    assert stored == [run]
    assert "| fp32 | 0 |" in (out / "hour-cpu.md").read_text()
    again = bench_hour.bench_hour(url, out, log=lambda *a: None, **tiny)
    assert again == run  # read back, nothing trained again

    # an hour that was cut short (its study exists, its record does not) is never resumed
    (out / "hour-cpu.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"^study 'hour-fp32-s0-0.5m' .* did not finish"):
        bench_hour.bench_hour(url, out, **tiny)
