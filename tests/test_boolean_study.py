"""The Boolean width studies on a tiny 3-bit function: search, feasibility, resume, CLI."""

import sqlite3

import optuna
import pytest

from study.boolean_trial import (
    BooleanTrial,
    CandidateOutcome,
    SeedRun,
    TargetUnreachable,
    train_seeds,
)
from study.config import BooleanCandidate, BooleanSettings
from study.data import boolean_function
from study.errors import ConfigError
from study.runner import best_feasible, run_study
from study.studies import store_attr, stored_attrs
from study.trainer import EpochMetrics, TrainResult
from tests.conftest import TINY, TINY_ARGS, cli, tiny_study

# ----------------------------------------------------------------------------------------------
# feasibility logic


def fake_run(seed, best_loss, learned, stopped=False):
    metrics = EpochMetrics(1, best_loss, best_loss, 1.0 if learned else 0.9, None, 0.1, 1e-2)
    result = TrainResult([metrics], 10, "cpu", 0.1, learned, stopped)
    return SeedRun(seed, result, learned)


def outcome(runs, planned=3, required=2):
    return CandidateOutcome(BooleanCandidate((4,), 1e-2, 8, 100), runs, planned, required, 1e-3)


def test_learns_f_only_at_the_required_rate():
    two_of_three = outcome(
        [fake_run(0, 5e-4, True), fake_run(1, 0.2, False), fake_run(2, 8e-4, True)]
    )
    assert two_of_three.learns and two_of_three.success_share == pytest.approx(2 / 3)
    assert two_of_three.constraint <= 0
    one_of_three = outcome(
        [fake_run(0, 5e-4, True), fake_run(1, 0.2, False), fake_run(2, 0.01, False)]
    )
    assert not one_of_three.learns and one_of_three.constraint > 0
    # the constraint measures how far (in decades) the deciding seed missed the target
    assert one_of_three.constraint == pytest.approx(1.0)


def test_loss_under_target_with_a_wrong_bit_is_not_success():
    # best loss under the target but the run did not count as learned (a wrong bit)
    runs = [fake_run(0, 5e-4, False), fake_run(1, 5e-4, True)]
    result = outcome(runs, planned=2, required=2)
    assert not result.learns and result.constraint > 0


def test_abandoned_when_seeds_were_skipped_or_cut_off():
    assert outcome([fake_run(0, 0.3, False), fake_run(1, 0.3, False)]).abandoned
    assert outcome([fake_run(0, 0.3, False, stopped=True)] * 3).abandoned
    assert not outcome([fake_run(i, 5e-4, True) for i in range(3)]).abandoned


def metrics(epoch, loss):
    return EpochMetrics(epoch, loss, loss, 0.5, None, 0.0, 1e-2)


def test_unreachable_rule_stops_a_plateau_but_not_a_steady_descent():
    plateau = TargetUnreachable(1e-3, max_epochs=200)
    stops = [plateau(metrics(e, 0.3)) for e in range(1, 201)]
    assert any(stops) and stops.index(True) + 1 == plateau.warmup
    descent = TargetUnreachable(1e-3, max_epochs=200)
    # falls by a factor 10 every 50 epochs: 0.5 -> ~0.00013 at epoch 200
    assert not any(descent(metrics(e, 0.5 * 10 ** (-e / 50))) for e in range(1, 201))


def test_a_trial_gives_up_once_the_share_is_out_of_reach():
    fn = boolean_function(3, 0, 3)
    settings = BooleanSettings(**TINY, required_rate=1.0)
    hopeless = BooleanCandidate((1,), 2e-2, 8, 60)
    result = train_seeds(BooleanTrial(hopeless, [0, 1], settings), fn).outcome()
    assert len(result.runs) == 1 and not result.learns and result.abandoned
    full = train_seeds(BooleanTrial(hopeless, [0, 1], settings, prune=False), fn).outcome()
    assert len(full.runs) == 2
    assert all(r.result.epochs_run == 60 for r in full.runs)


def test_settings_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"^max_width: .*inverted width bounds"):
        BooleanSettings(min_width=20, max_width=10)
    with pytest.raises(ConfigError, match=r"^required_rate"):
        BooleanSettings(required_rate=0)
    with pytest.raises(ConfigError, match=r"^widthh: unknown setting"):
        BooleanSettings.from_dict({"widthh": 3})


# ----------------------------------------------------------------------------------------------
# real studies on SQLite files


def test_a_short_study_finds_a_feasible_width(tmp_path):
    study = tiny_study(tmp_path, trials=6)
    best = best_feasible(study)
    assert best is not None
    attrs = best.user_attrs
    assert attrs["learns_f"] and attrs["success_share"] == 1.0
    assert all(loss <= 1e-3 for loss in attrs["best_full_table_loss"])
    assert all(acc == 1.0 for acc in attrs["bit_accuracy"])
    assert best.value == attrs["neurons"] == attrs["hidden_layer_profile"][0]
    assert attrs["parameters"] == (3 + 1) * attrs["neurons"] + (attrs["neurons"] + 1) * 3
    assert best.constraints["learns_f"] <= 0
    for key in ("best_running_loss", "seconds", "device", "seeds", "epochs_run"):
        assert key in attrs
    assert stored_attrs(study)["settings"]["input_bits"] == 3
    # every finished trial is either feasible-complete, infeasible-complete or pruned
    for trial in study.trials:
        assert trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert (trial.constraints["learns_f"] <= 0) == trial.user_attrs["learns_f"]


def test_resume_continues_to_the_total_and_keeps_finished_trials(tmp_path):
    first = tiny_study(tmp_path, trials=3)
    before = [(t.number, t.state, t.params, t.value, t.user_attrs) for t in first.trials]
    assert len(before) == 3
    resumed = tiny_study(tmp_path, trials=5)
    after = [(t.number, t.state, t.params, t.value, t.user_attrs) for t in resumed.trials]
    assert len(after) == 5
    assert after[:3] == before
    again = tiny_study(tmp_path, trials=5)
    assert len(again.trials) == 5


def test_resume_with_other_fixed_settings_is_refused(tmp_path):
    tiny_study(tmp_path, trials=1)
    with pytest.raises(ConfigError, match=r"--function-seed 1 \(stored: 0\)"):
        run_study(
            "boolean-shallow",
            trials=2,
            storage=f"sqlite:///{tmp_path / 'studies.db'}",
            settings={**TINY, "function_seed": 1},
            quiet=True,
        )
    with sqlite3.connect(tmp_path / "studies.db") as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == 1


def test_deep_space_samples_two_to_four_layers(tmp_path):
    study = run_study(
        "boolean-deep",
        trials=3,
        storage=f"sqlite:///{tmp_path / 'deep.db'}",
        sampler_seed=1,
        device="cpu",
        settings={**TINY, "max_width": 6},
        quiet=True,
    )
    for trial in study.trials:
        profile = trial.user_attrs["hidden_layer_profile"]
        assert 2 <= len(profile) <= 4
        assert trial.user_attrs["neurons"] == sum(profile)
        assert len(profile) == trial.params["layers"]


# ----------------------------------------------------------------------------------------------
# the CLI as a subprocess


@pytest.mark.slow
def test_cli_runs_resumes_and_reports(tmp_path):
    storage = f"sqlite:///{tmp_path / 'cli.db'}"
    report_dir = tmp_path / "report"
    done = cli(
        "run",
        "boolean-shallow",
        "--trials",
        "2",
        "--storage",
        storage,
        *TINY_ARGS,
        "--report",
        "--report-dir",
        str(report_dir),
    )
    assert done.returncode == 0, done.stderr
    assert "boolean-shallow:" in done.stdout
    assert (report_dir / "summary.md").is_file() and (report_dir / "trials.csv").is_file()
    done = cli("run", "boolean-shallow", "--trials", "3", "--storage", storage, *TINY_ARGS)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    assert len(study.trials) == 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trials", "2", "--min-width", "20", "--max-width", "10"], "inverted width bounds"),
        (["--trials", "0"], "--trials: must be an integer from 1"),
        (["--trials", "2", "--device", "cuda:7"], "device"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, args, expected):
    storage = f"sqlite:///{tmp_path / 'bad.db'}"
    done = cli("run", "boolean-shallow", "--storage", storage, *args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]
    assert "Traceback" not in done.stderr


def test_cli_unknown_study_name_is_one_clear_line(tmp_path):
    done = cli("run", "boolean-wide", "--trials", "2")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "boolean-wide" in done.stderr and "boolean-shallow" in done.stderr


def test_cli_unwritable_storage_path_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = cli(
        "run",
        "boolean-shallow",
        "--trials",
        "1",
        "--storage",
        f"sqlite:///{blocker / 'sub' / 'x.db'}",
        *TINY_ARGS,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "storage: cannot create" in done.stderr


@pytest.mark.slow
def test_cli_report_of_unknown_study_is_one_clear_line(tmp_path):
    storage = f"sqlite:///{tmp_path / 'cli.db'}"
    assert (
        cli("run", "boolean-shallow", "--trials", "1", "--storage", storage, *TINY_ARGS).returncode
        == 0
    )
    done = cli("report", "nope", "--storage", storage, "--out", str(tmp_path / "r"))
    assert done.returncode == 2
    assert "study 'nope' not found" in done.stderr and "boolean-shallow" in done.stderr


@pytest.mark.slow
def test_certify_retrains_the_best_and_the_next_smaller_width(tmp_path):
    storage = f"sqlite:///{tmp_path / 'cert.db'}"
    assert (
        cli("run", "boolean-shallow", "--trials", "5", "--storage", storage, *TINY_ARGS).returncode
        == 0
    )
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    best = best_feasible(study)
    assert best is not None
    done = cli(
        "certify",
        "boolean-shallow",
        "--storage",
        storage,
        "--seeds",
        "3",
        "--device",
        "cpu",
        "--top",
        "3",
        "--out",
        str(tmp_path / "cert"),
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "cert" / "certification.csv").read_text().splitlines()
    header = table[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in table[1:]]
    width = best.user_attrs["neurons"]
    assert rows[0]["role"] == "found" and int(rows[0]["neurons"]) == width
    if width > 1:
        assert rows[1]["role"] == "one fewer" and int(rows[1]["neurons"]) == width - 1
    for row in rows:
        share = float(row["success_share"])
        assert 0 <= share <= 1 and row["seeds"] == "3"
        assert (row["learns_f"] == "True") == (share >= 1.0)
    assert "success_share" in done.stdout
    # --top 3: up to two runners-up, distinct feasible profiles no smaller than the best
    feasible = {
        tuple(t.user_attrs["hidden_layer_profile"])
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["learns_f"]
    }
    runners = [r for r in rows if r["role"].startswith("found #")]
    assert len(runners) == min(2, len(feasible) - 1)
    assert all(int(r["neurons"]) >= width for r in runners)
    assert len({r["hidden_layer_profile"] for r in runners}) == len(runners)
    passed = [r for r in rows if r["learns_f"] == "True"]
    if passed:
        fewest = min(int(r["neurons"]) for r in passed)
        assert f"Certified: {fewest} hidden neurons" in done.stdout
    else:
        assert "None of the retrained configurations" in done.stdout
    # the same certification again has nothing to do: nothing retrained, the store unchanged
    store = tmp_path / "cert.db"
    before = store.read_bytes()
    again = cli("certify", "boolean-shallow", "--storage", storage, "--seeds", "3", "--device",
                "cpu", "--top", "3", "--out", str(tmp_path / "again"))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "certified already" in again.stdout and "training" not in again.stdout
    assert store.read_bytes() == before
    assert (tmp_path / "again" / "certification.csv").read_text().splitlines() == table
    # other seeds are other work
    other = cli("certify", "boolean-shallow", "--storage", storage, "--seeds", "2", "--device",
                "cpu", "--out", str(tmp_path / "other"))  # fmt: skip
    assert other.returncode == 0 and "training" in other.stdout, other.stderr
    assert store.read_bytes() != before


@pytest.mark.slow
def test_a_run_with_nothing_to_do_leaves_the_store_byte_for_byte(tmp_path):
    tiny_study(tmp_path, trials=3)
    store = tmp_path / "studies.db"
    before = store.read_bytes()
    for total in ("3", "2"):
        done = cli("run", "boolean-shallow", "--trials", total, "--storage",
                   f"sqlite:///{store}", "--quiet")  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert store.read_bytes() == before


def test_cli_malformed_storage_url_is_one_clear_line():
    done = cli("run", "boolean-shallow", "--trials", "1", "--storage", "not a url", *TINY_ARGS)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "malformed URL" in lines[0]


def test_cli_storage_file_that_is_not_a_database_is_left_alone(tmp_path):
    notes = tmp_path / "notes.db"
    notes.write_text("these are my notes, not a database\n")
    done = cli(
        "run", "boolean-shallow", "--trials", "1", "--storage", f"sqlite:///{notes}", *TINY_ARGS
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "is not an SQLite database" in done.stderr
    assert notes.read_text() == "these are my notes, not a database\n"


def test_a_store_that_named_the_required_rate_required_share_still_resumes(tmp_path):
    """The Boolean settings' `required_share` is `required_rate` now (the frontier's name): a
    study stored with the old name is described and resumed as it was made."""
    import optuna

    from study.runner import run_study
    from study.studies import describe

    storage = f"sqlite:///{tmp_path / 's.db'}"
    settings = {"input_bits": 3, "output_bits": 2, "max_epochs": 40, "seeds": 2}
    run_study("boolean-shallow", settings, trials=1, storage=storage, device="cpu", quiet=True)
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    stored = dict(stored_attrs(study)["settings"])
    stored["required_share"] = stored.pop("required_rate")  # as an older version stored it
    store_attr(study, "settings", stored)
    assert describe(study).settings.required_rate == stored["required_share"]
    again = run_study("boolean-shallow", settings, trials=2, storage=storage, device="cpu",
                      quiet=True)  # fmt: skip
    assert len(again.trials) == 2
