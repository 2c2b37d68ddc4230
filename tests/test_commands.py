"""What users of Optuna and Ray Tune expect: a time budget, sampler and pruner choices, list,
best and --version, and progress inside a trial. Real subprocesses on real SQLite files."""

import json
import os
import subprocess
import sys
import time

import optuna
import pytest

from study.runner import run_study
from study.studies import stored_attrs
from tests.conftest import TINY, TINY_ARGS, cli, write_fake_dataset

SLOW = ["--no-prune", "--quiet", "--input-bits", "5", "--output-bits", "2", "--max-width", "16",
        "--max-epochs", "2000", "--seeds", "2", "--batch-sizes", "8", "--device", "cpu",
        "--min-learning-rate", "0.002", "--max-learning-rate", "0.0021"]  # fmt: skip


def test_version():
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("study ")


@pytest.mark.slow
def test_timeout_stops_within_an_epoch_and_the_next_run_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path / 't.db'}"
    args = ["run", "boolean-shallow", "--storage", storage, "--trials", "40", *SLOW]
    started = time.monotonic()
    done = cli(*args, "--timeout", "4")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "time budget reached" in done.stderr
    # the budget, the start of the process (imports) and at most one epoch: well under 20 s
    assert took < 20, took
    trials = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    stopped = [t for t in trials if t.state.name == "FAIL"]
    assert stopped and all("time budget" in t.user_attrs["fail_reason"] for t in stopped)
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert waiting and waiting[0].params == stopped[0].params  # re-queued for the next run
    # the next run (a population this time) takes up the re-queued trial and goes on
    again = cli(*args, "--timeout", "6", "--population", "3")
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    assert "RUNNING" not in {t.state.name for t in trials}
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    assert any(retried(t) == stopped[0].number for t in trials if t.state.name != "WAITING")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["random", "qmc", "cmaes", "gp"])
def test_a_sampler_is_stored_and_kept_on_resume(tmp_path, sampler):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    done = cli("run", "boolean-shallow", "--trials", "3", "--storage", storage, "--sampler",
               sampler, *TINY_ARGS)  # fmt: skip
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    assert stored_attrs(study)["run"]["sampler"] == sampler
    assert stored_attrs(study)["sampler_seed"] == 0  # TINY_ARGS: --sampler-seed 0
    again = cli("run", "boolean-shallow", "--trials", "4", "--storage", storage, "--quiet",
                "--sampler-seed", "7")  # fmt: skip
    assert again.returncode == 0, again.stderr
    runs = stored_attrs(optuna.load_study(study_name="boolean-shallow", storage=storage))["runs"]
    assert [r["sampler_seed"] for r in runs] == [0, 7]
    refused = cli("run", "boolean-shallow", "--trials", "5", "--storage", storage,
                  "--sampler", "tpe")  # fmt: skip
    assert refused.returncode == 2 and f"--sampler tpe (stored: {sampler})" in refused.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_fake_dataset(tmp_path_factory.mktemp("images"), train=400, test=100)


@pytest.mark.slow
@pytest.mark.parametrize(
    "pruner", ["hyperband", "successive-halving", "none", "median", "quartile"]
)
def test_an_image_pruner_is_stored_shown_and_used(tmp_path, images, pruner):
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    done = cli("run", "fashion-mlp", "--trials", "3", "--storage", storage, "--pruner", pruner,
               "--data-dir", str(images), "--validation-size", "100", "--min-epochs", "2",
               "--max-epochs", "3", "--device", "cpu", "--quiet", "--report",
               "--report-dir", str(tmp_path / "r"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="fashion-mlp", storage=storage)
    assert stored_attrs(study)["run"]["pruner"] == pruner
    assert f"pruner {pruner}" in (tmp_path / "r" / "summary.md").read_text()


def test_a_pruner_of_the_other_kind_is_refused(tmp_path):
    done = cli("run", "boolean-shallow", "--trials", "2", "--storage",
               f"sqlite:///{tmp_path / 'x.db'}", "--pruner", "hyperband")  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "target-unreachable, none" in done.stderr and not (tmp_path / "x.db").exists()


@pytest.mark.slow
def test_list_and_best_read_the_store(tmp_path):
    storage = f"sqlite:///{tmp_path / 'l.db'}"
    assert cli("run", "boolean-shallow", "--trials", "4", "--storage", storage,
               *TINY_ARGS).returncode == 0  # fmt: skip
    listed = cli("list", "--storage", storage)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.strip().splitlines()[:2]
    assert header.split()[:3] == ["study", "kind", "trials"]
    assert row.split()[:3] == ["boolean-shallow", "boolean", "4"]
    best = cli("best", "boolean-shallow", "--storage", storage, "--json")
    assert best.returncode == 0, best.stderr
    record = json.loads(best.stdout)  # JSON that parses
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    assert record["kind"] == "boolean" and record["settings"]["input_bits"] == 3
    if record["best"] is not None:
        assert record["best"]["neurons"] == study.best_trial.user_attrs["neurons"]
    missing = cli("best", "nope", "--storage", storage, "--json")
    assert missing.returncode == 2 and "not found" in missing.stderr
    as_json = cli("list", "--storage", storage, "--json")
    assert as_json.returncode == 0, as_json.stderr
    [entry] = json.loads(as_json.stdout)
    assert (entry["study"], entry["kind"], entry["trials"]) == ("boolean-shallow", "boolean", 4)


def test_best_json_has_one_shape_for_every_kind(tmp_path, capsys):
    """Boolean (certified), image, frontier and a plain Optuna study: the same keys, and a
    hidden-layer profile is a list wherever it appears."""
    from study import studies
    from study.cli import main
    from study.config import FrontierCell, ImageSettings
    from study.overview import BEST_KEYS

    storage = f"sqlite:///{tmp_path / 'b.db'}"
    study = run_study("boolean-shallow", trials=2, storage=storage, device="cpu",
                      settings=TINY, quiet=True, sampler_seed=0)  # fmt: skip
    row = {"role": "found", "trial": 0, "hidden_layer_profile": "3-2", "neurons": 5,
           "learns_f": True}  # fmt: skip
    study.set_user_attr(studies.CERTIFICATION_ATTR, {"first_seed": 0, "rows": [row]})
    images = optuna.create_study(storage=storage, study_name="images", direction="maximize")
    for key, value in {studies.SPACE_ATTR: "fashion-mlp", studies.KIND_ATTR: "image",
                       studies.SETTINGS_ATTR: ImageSettings().identity()}.items():  # fmt: skip
        images.set_user_attr(key, value)
    cell = optuna.create_study(storage=storage, study_name="frontier-f0-d1-b300")
    cell.set_user_attr(studies.FRONTIER_ATTR, FrontierCell(0, 1, 300).identity())
    optuna.create_study(storage=storage, study_name="plain")
    records = {}
    for name in ("boolean-shallow", "images", "frontier-f0-d1-b300", "plain"):
        assert main(["best", name, "--storage", storage, "--json"]) in (0, None)
        records[name] = json.loads(capsys.readouterr().out)
        assert tuple(records[name]) == BEST_KEYS, name
    assert records["boolean-shallow"]["certified"]["hidden_layer_profile"] == [3, 2]
    best = records["boolean-shallow"]["best"]
    assert best is None or isinstance(best["hidden_layer_profile"], list)
    assert [records[n]["kind"] for n in records] == ["boolean", "image", "frontier", "other"]


def test_delete_asks_or_takes_yes_and_leaves_other_studies(tmp_path):
    storage = f"sqlite:///{tmp_path / 'd.db'}"
    for name in ("keep", "drop"):
        optuna.create_study(storage=storage, study_name=name).add_trial(
            optuna.trial.create_trial(value=1.0)
        )
    refused = cli("delete", "drop", "--storage", storage)  # no terminal to ask on
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(optuna.get_all_study_summaries(storage)) == 2
    done = cli("delete", "drop", "--storage", storage, "--yes")
    assert done.returncode == 0 and "deleted study 'drop' (1 trials)" in done.stdout, done.stderr
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["keep"]
    missing = cli("delete", "drop", "--storage", storage, "--yes")
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_delete_removes_the_files_stored_with_the_study_only(tmp_path):
    """An export's files (Optuna's artifact store beside the SQLite file) go with their study,
    those of a trial too; another study's stay."""
    from optuna.artifacts import upload_artifact

    from study.storage import artifact_store

    storage = f"sqlite:///{tmp_path / 'd.db'}"
    store = artifact_store(storage)
    ids = {}
    for name in ("keep", "drop"):
        study = optuna.create_study(storage=storage, study_name=name)
        trial = study.ask()  # a file is uploaded while its trial runs
        (tmp_path / f"{name}.txt").write_text(name)
        ids[name] = [
            upload_artifact(artifact_store=store, file_path=str(tmp_path / f"{name}.txt"),
                            study_or_trial=target)
            for target in (study, trial)
        ]  # fmt: skip
        study.tell(trial, 1.0)
    folder = tmp_path / "d.db.artifacts"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ids["keep"] + ids["drop"])
    done = cli("delete", "drop", "--storage", storage, "--yes")
    assert done.returncode == 0, done.stderr
    assert "deleted study 'drop' (1 trials, 2 stored files)" in done.stdout
    assert sorted(p.name for p in folder.iterdir()) == sorted(ids["keep"])


def _progress_of(*args: str) -> str:
    """stderr of a `study` command with its progress bar on (as in a wide terminal)."""
    wide = {**os.environ, "COLUMNS": "200", "STUDY_PROGRESS": "bar"}
    command = [sys.executable, "-m", "study.cli", *args]
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True, env=wide, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_progress_moves_inside_an_image_trial(tmp_path, images):
    """One trial of several epochs: the bar shows epoch k of E, the validation accuracy and
    seconds per epoch while the trial runs."""
    stderr = _progress_of("run", "fashion-mlp", "--trials", "1", "--storage",
                          f"sqlite:///{tmp_path / 'm.db'}", "--data-dir", str(images),
                          "--validation-size", "100", "--min-epochs", "6", "--max-epochs", "6",
                          "--device", "cpu")  # fmt: skip
    assert "trial 0: epoch 1/6, val " in stderr and " s/epoch" in stderr, stderr


def test_progress_moves_inside_a_boolean_population(tmp_path):
    slow = [a for a in SLOW if a != "--quiet"]
    stderr = _progress_of("run", "boolean-shallow", "--trials", "4", "--population", "4",
                          "--storage", f"sqlite:///{tmp_path / 'p.db'}", *slow)  # fmt: skip
    # 4 trials of 2 seeds each: 8 networks
    assert "population of 8 networks: epoch " in stderr and " still training" in stderr, stderr


@pytest.mark.slow
def test_timeout_with_workers_stops_every_worker_and_leaves_nothing_running(tmp_path):
    """Trials far longer than the budget: whatever the workers run at the deadline is stopped
    at its next epoch, failed with the reason and re-queued; the parent says so once."""
    storage = f"sqlite:///{tmp_path / 'w.db'}"
    long = [*SLOW[: SLOW.index("--max-epochs")], "--max-epochs", "100000",
            *SLOW[SLOW.index("--max-epochs") + 2 :]]  # fmt: skip
    started = time.monotonic()
    done = cli("run", "boolean-shallow", "--storage", storage, "--trials", "8", "--workers",
               "2", "--timeout", "15", *long)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    assert done.stderr.count("time budget reached") == 1, done.stderr
    trials = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states, states
    stopped = [t for t in trials if t.state.name == "FAIL"]
    assert stopped, states
    assert all("time budget" in t.user_attrs["fail_reason"] for t in stopped)
    assert states.count("WAITING") == len(stopped)  # each re-queued with its parameters


@pytest.mark.slow
def test_a_study_stored_before_the_choices_keeps_tpe_and_median(tmp_path, images):
    """Whatever the default pruner and fidelity of new studies, a stored study runs on as it
    was made: TPE, the median pruner, a fixed number of epochs."""
    from study.runner import study_settings
    from study.studies import bind

    storage = f"sqlite:///{tmp_path / 'old.db'}"
    settings = {"validation_size": 100, "min_epochs": 2, "max_epochs": 2}
    old = optuna.create_study(study_name="fashion-mlp", storage=storage, direction="maximize")
    bind(old, "fashion-mlp", study_settings("fashion-mlp", settings))  # no "run" attribute
    done = cli("run", "fashion-mlp", "--trials", "1", "--storage", storage, "--data-dir",
               str(images), "--device", "cpu", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="fashion-mlp", storage=storage)
    assert stored_attrs(study)["run"] == {
        "sampler": "tpe",
        "pruner": "median",
        "fidelity": "fixed",
    }
    refused = cli("run", "fashion-mlp", "--trials", "2", "--storage", storage, "--pruner",
                  "hyperband")  # fmt: skip
    assert refused.returncode == 2 and "--pruner hyperband (stored: median)" in refused.stderr


def test_any_stored_name_maps_to_one_directory_of_its_own_in_results_runs():
    """A study made elsewhere may have any name: its default output directory is still one
    directory in results/runs/, distinct per name; the names a new study may take map as
    they are."""
    from study.config import RUNS_DIR, is_study_name
    from study.storage import default_out

    assert default_out("fashion-mlp") == RUNS_DIR / "fashion-mlp"
    assert default_out("frontier-f0-d1-b500-recipe") == RUNS_DIR / "frontier-f0-d1-b500-recipe"
    hostile = [
        "../boolean-shallow",
        "../../x",
        "/etc",
        ".",
        "..",
        "a\nb",
        "x" * 300,
        "",
        "é",
        "a/b",
        "a b",
        "a\\b",
    ]
    outs = [default_out(name) for name in hostile]
    assert len(set(outs)) == len(hostile)  # no two names share a directory
    for name, out in zip(hostile, outs, strict=True):
        assert not is_study_name(name)
        assert out.parent == RUNS_DIR and out.name not in (".", "..", ""), (name, out)
        assert "/" not in out.name and "\n" not in out.name and len(out.name) <= 60
        assert default_out(name) == out  # the same name, the same directory, every time


def test_report_of_a_study_named_like_a_path_stays_in_results_runs(tmp_path, monkeypatch):
    """`study report` without --out of a stored study called '../boolean-shallow' (made with
    Optuna directly) writes under results/runs/ and nowhere else."""
    from study.cli import main

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    run_study("boolean-shallow", trials=2, storage=storage, device="cpu", settings=TINY,
              quiet=True, sampler_seed=0, study_name="made-here")  # fmt: skip
    optuna.copy_study(from_study_name="made-here", from_storage=storage, to_storage=storage,
                      to_study_name="../boolean-shallow")  # fmt: skip
    (tmp_path / "results" / "boolean-shallow").mkdir(parents=True)
    assert main(["report", "../boolean-shallow", "--storage", storage]) == 0
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*")
               if p.is_file() and not p.name.startswith("elsewhere.db")]  # fmt: skip
    assert any(p.name == "summary.md" for p in written)
    assert all(p.parts[:2] == ("results", "runs") and len(p.parts) >= 4 for p in written), written
    assert not any((tmp_path / "results" / "boolean-shallow").iterdir())


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`study best ... | head`: the reader goes away; no traceback, the status of SIGPIPE."""
    storage = f"sqlite:///{tmp_path / 'piped.db'}"
    run_study("boolean-shallow", trials=2, storage=storage, device="cpu", settings=TINY,
              quiet=True, sampler_seed=0)  # fmt: skip
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line is written
    done = subprocess.run([sys.executable, "-m", "study.cli", "best", "boolean-shallow",
                           "--storage", storage, "--json"], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=300)  # fmt: skip
    os.close(write)
    assert done.stderr == "" and done.returncode == 141, done.stderr


LOUD_ARGS = [a for a in TINY_ARGS if a != "--quiet"]


def test_trials_at_or_below_the_stored_total_say_that_nothing_is_trained(tmp_path):
    """--trials is the study's total: a run that asks for no more than is finished trains
    nothing and says so in one line, with the flag that would add that many."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = cli("run", "boolean-shallow", "--trials", "2", "--storage", storage, "--quiet",
                *TINY_ARGS)  # fmt: skip
    assert first.returncode == 0, first.stderr
    again = cli("run", "boolean-shallow", "--trials", "2", "--storage", storage, "--quiet",
                *TINY_ARGS)  # fmt: skip
    assert again.returncode == 0, again.stderr
    said = [line for line in again.stderr.splitlines() if "nothing to train" in line]
    assert said == [
        "study: boolean-shallow: 2 trials are finished already and --trials is the total (2): "
        "nothing to train; --trials 4 trains 2 more"
    ]
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    assert len(study.trials) == 2
    # without --quiet: that line, no progress bar of a run that trains nothing
    shown = cli("run", "boolean-shallow", "--trials", "1", "--storage", storage, *LOUD_ARGS)
    assert shown.returncode == 0 and shown.stderr.count("\n") == 1, shown.stderr
    assert "nothing to train" in shown.stderr


def test_a_bar_with_a_time_budget_shows_the_budget_left_not_a_trial_estimate(
    tmp_path, monkeypatch
):
    """`--timeout 3600 --trials 1000`: the trial count is a ceiling; an estimate from the trial
    rate would say 121 hours. The bar shows the time used and the budget left."""
    from study import runner

    monkeypatch.setenv(runner.PROGRESS_VARIABLE, "bar")  # as on a terminal

    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="b", direction="maximize"
    )
    study.add_trial(optuna.trial.create_trial(value=1.0))
    budget = runner._progress_bar(study, 1000, True, time.time() + 1800)
    budget.update(1)
    runner._show(budget, "epoch 3")
    shown = str(budget)
    assert shown.startswith("b: 2/1000 trials [00:00, ") and "of the budget left, epoch 3" in shown
    assert "29:5" in shown and "<" not in shown and "trial/s" not in shown
    plain = runner._progress_bar(study, 1000, True)
    assert "<" in str(plain) and "budget" not in str(plain)  # no budget: tqdm's own estimate
    budget.close()
    plain.close()


def test_a_log_gets_one_line_per_finished_trial_and_verbose_adds_optunas(tmp_path):
    """Output that is no terminal (a log file, a pipe) gets one readable line per finished
    trial (number, state, parameters, the best so far, seconds), no carriage returns;
    --verbose adds Optuna's own log lines, --quiet drops the trial lines."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    done = cli("run", "boolean-shallow", "--trials", "3", "--storage", storage, *LOUD_ARGS)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if ": trial " in line]
    assert [line.split(": trial ")[1].split()[0] for line in lines] == ["0", "1", "2"]
    for line in lines:
        assert line.startswith("boolean-shallow: trial ") and "width=" in line
        assert line.endswith(" s") and ("none yet" in line or "best feasible" in line)
    verbose = cli("run", "boolean-shallow", "--trials", "4", "--storage", storage, "--verbose",
                  *LOUD_ARGS)  # fmt: skip
    assert verbose.returncode == 0 and "[I " in verbose.stderr, verbose.stderr
    assert "boolean-shallow: trial 3 " in verbose.stderr
    quiet = cli("run", "boolean-shallow", "--trials", "5", "--storage", storage, "--quiet",
                *TINY_ARGS)  # fmt: skip
    assert quiet.returncode == 0 and ": trial " not in quiet.stderr, quiet.stderr
