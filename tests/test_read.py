"""Commands that only read: `study list` from a digest of the trials (never the trials), the
same rows as from every trial; no torch behind list, best, --help or a frontier report; and
`study bench read`, which times `study list` against `optuna studies`."""

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from study import rdb, studies
from study.config import ImageSettings
from study.overview import list_studies

FLOAT = optuna.distributions.FloatDistribution(0, 1)


def _trial(state, value=None, constraint=None, values=None):
    attrs = {} if constraint is None else {rdb.constraint_key("neurons"): constraint}
    return create_trial(state=state, value=value, values=values, params={"x": 0.5},
                        distributions={"x": FLOAT}, system_attrs=attrs,
                        intermediate_values={1: 0.3})  # fmt: skip


def _store(tmp_path) -> str:
    """Studies whose list rows differ in every column: the best trial infeasible (so the best
    is the best feasible one), states of every kind, maximise, several objectives, none."""
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    low = optuna.create_study(storage=storage, study_name="low")
    for trial in (
        _trial(TrialState.COMPLETE, 1.0, constraint=3.0),  # best value, infeasible
        _trial(TrialState.COMPLETE, 4.0, constraint=0.0),
        _trial(TrialState.COMPLETE, 2.5, constraint=-1.0),  # the best feasible
        _trial(TrialState.PRUNED),
        _trial(TrialState.FAIL),
        _trial(TrialState.WAITING),
    ):
        low.add_trial(trial)
    high = optuna.create_study(storage=storage, study_name="high", direction="maximize")
    for key, value in {studies.SPACE_ATTR: "fashion-mlp", studies.KIND_ATTR: "image",
                       studies.SETTINGS_ATTR: ImageSettings().identity()}.items():  # fmt: skip
        high.set_user_attr(key, value)
    for value in (0.8, float("inf"), 0.9):
        high.add_trial(_trial(TrialState.COMPLETE, value))
    two = optuna.create_study(storage=storage, study_name="two", directions=["minimize"] * 2)
    two.add_trial(_trial(TrialState.COMPLETE, values=[1.0, 2.0]))
    none = optuna.create_study(storage=storage, study_name="infeasible")
    none.add_trial(_trial(TrialState.COMPLETE, 1.0, constraint=0.5))
    optuna.create_study(storage=storage, study_name="empty")
    return storage


def test_list_reads_a_digest_that_agrees_with_every_trial(tmp_path, monkeypatch):
    storage = _store(tmp_path)
    digested = list_studies(storage)
    rows = {r["study"]: r for r in digested}
    assert rows["low"] | {"last_activity": None} == {
        "study": "low", "kind": "other", "trials": 6, "running": 0, "complete": 3, "pruned": 1,
        "fail": 1, "waiting": 1, "best": 2.5, "last_activity": None}  # fmt: skip
    assert rows["high"]["kind"] == "image" and rows["high"]["best"] == float("inf")
    assert rows["two"]["best"] is None and rows["infeasible"]["best"] is None
    assert rows["empty"] == {"study": "empty", "kind": "other", "trials": 0, "running": 0,
                             "complete": 0, "pruned": 0, "fail": 0, "waiting": 0, "best": None,
                             "last_activity": None}  # fmt: skip
    study = optuna.load_study(study_name="low", storage=storage)
    last = max(t.datetime_complete or t.datetime_start for t in study.trials
               if t.datetime_start or t.datetime_complete)  # fmt: skip
    assert rows["low"]["last_activity"] == last.isoformat(timespec="seconds")
    monkeypatch.setattr(rdb, "backend", lambda storage: None)  # every trial, as Optuna reads
    assert list_studies(storage) == digested


def test_list_does_not_load_the_trials(tmp_path, monkeypatch):
    storage = _store(tmp_path)

    def refused(*args, **kwargs):
        raise AssertionError("the trials were loaded")

    monkeypatch.setattr(optuna.storages.RDBStorage, "get_all_trials", refused)
    monkeypatch.setattr(optuna.storages.RDBStorage, "get_trial", refused)
    assert len(list_studies(storage)) == 5


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--storage", "sqlite:///results/reference.db"],
        ["best", "fashion-cnn", "--storage", "sqlite:///results/reference.db"],
        ["--help"],
        ["frontier", "report", "--storage", "sqlite:///results/frontier.db", "--out", "{tmp}"],
        ["verify"],  # every committed record (results/records)
    ],
)
def test_commands_that_only_read_import_no_torch(tmp_path, argv):
    argv = [a.replace("{tmp}", str(tmp_path / "out")) for a in argv]
    script = (
        "import sys, contextlib, io; from study.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: code = main(sys.argv[1:])\n"
        "    except SystemExit as stop: code = stop.code\n"
        "print(code or 0, sorted(m for m in ('torch', 'study.trainer', 'study.frontier', "
        "'study.cell_engine', 'study.boolean_trial', 'study.image_objective') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)
    assert done.stdout.strip() == "0 []", done.stderr[-2000:]


def test_bench_read_times_both_commands_on_one_store(tmp_path):
    from study.bench_read import bench_read

    storage = _store(tmp_path)
    lines = []
    result = bench_read([storage], repeats=1, log=lines.append)
    entry = result["stores"][storage]
    for name in ("study list", "optuna studies"):
        assert entry[name]["seconds"] > 0.05 and entry[name]["mib"] > 20
    assert entry["seconds_ratio"] == entry["study list"]["seconds"] / entry["optuna studies"][
        "seconds"]  # fmt: skip
    assert result["worst"]["memory_ratio"] == entry["memory_ratio"]
    assert lines[0].startswith(f"{storage}: study list ") and lines[-1].startswith("worst: ")
    with pytest.raises(RuntimeError, match="exit"):
        bench_read([f"sqlite:///{tmp_path / 'absent.db'}"], repeats=1, log=lines.append)


@pytest.mark.parametrize(
    ("store", "names"),
    [
        # one study of each kind and method: Boolean, image, earlier-method cell, its recipe
        (
            "results/reference.db",
            [
                "boolean-shallow",
                "fashion-cnn",
                "frontier-f0-d2-b8000",
                "frontier-f0-d1-b2000-recipe",
            ],
        ),
        ("results/frontier.db", None),  # every cell of today's method and its recipe study
    ],
)
def test_best_answers_whenever_optuna_does_on_the_committed_stores(store, names):
    """Earlier-method cells and recipe studies too: `study best` carries Optuna's best trial
    (`optuna best-trial`), and its plain form leads with one line naming the study and its
    answer."""
    from study.overview import best_of, format_best

    url = f"sqlite:///{store}"
    every = [s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False)]
    assert set(names or every) <= set(every)
    for name in names or every:
        study = optuna.load_study(study_name=name, storage=url)
        record = best_of(name, url)
        try:
            expected = study.best_trial.number
        except ValueError:
            expected = None
        assert (record["best"] or {}).get("number") == expected, name
        text = format_best(record)
        assert text.startswith(f"{name} ({record['kind']}): ") and "{" not in text, text
        if record["kind"] == "frontier" and not name.endswith("-recipe"):
            assert record["answer"] is not None, name  # every cell of these stores answered
            assert text.splitlines()[0].split(": ")[1].split()[1] == "neurons", text
