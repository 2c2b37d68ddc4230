"""Runs a user can trust: results apart from the reference, reports bound to their store,
resume from stored settings, validation before writing, exact totals, no lingering RUNNING
trials, no leaked passwords. Real subprocesses on real SQLite files (and the PostgreSQL server
`make test` starts)."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from study.runner import run_study
from study.studies import stored_attrs
from tests.conftest import TINY_ARGS, cli

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("STUDY_TEST_POSTGRES") or None
# a 5-bit function at a low learning rate without pruning: a population trains for seconds,
# long enough to be killed mid-training
SLOW_ARGS = ["--no-prune", "--quiet", "--input-bits", "5", "--output-bits", "2",
             "--max-width", "16", "--max-epochs", "2000", "--seeds", "2", "--batch-sizes", "8",
             "--device", "cpu", "--min-learning-rate", "0.002",
             "--max-learning-rate", "0.0021"]  # fmt: skip


def states(db: Path) -> dict[int, str]:
    """Trial number -> state, read directly (empty while the store is being created)."""
    try:
        with sqlite3.connect(db) as connection:
            return dict(connection.execute("SELECT number, state FROM trials").fetchall())
    except sqlite3.OperationalError:
        return {}


def sampled_running(db: Path) -> int:
    """RUNNING trials whose parameters are all sampled (4 each here): training has started."""
    try:
        with sqlite3.connect(db) as con:
            return (
                con.execute(
                    "select count(*) from trials t join trial_params p on p.trial_id = t.trial_id "
                    "where t.state = 'RUNNING'"
                ).fetchone()[0]
                // 4
            )
    except sqlite3.OperationalError:
        return 0


def wait_for(condition, timeout=180.0, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None:
            assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    pytest.fail("timed out waiting")


def command(storage, *args):
    return [sys.executable, "-m", "study.cli", "run", "boolean-shallow", "--storage", storage,
            *args]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# 1, 2: results a user cannot clobber; a report shows its own store only


@pytest.mark.slow
def test_main_job_and_reports_leave_a_fresh_clone_clean(tmp_path):
    clone = tmp_path / "clone"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=clone, check=True)
    subprocess.run([*git, "add", "-A"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], cwd=clone, check=True)
    # the README's main job (tiny), then reports of the working store and of the reference store
    done = cli("run", "boolean-shallow", "--trials", "2", "--population", "2", "--report",
               *TINY_ARGS, cwd=clone)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (clone / "results" / "runs" / "boolean-shallow" / "summary.md").is_file()
    reference = ["--storage", "sqlite:///results/reference.db"]
    for args in (["report", "boolean-shallow"], ["report", "boolean-shallow", *reference],
                 ["report", "fashion-mlp", *reference]):  # fmt: skip
        done = cli(*args, cwd=clone)
        assert done.returncode == 0, done.stderr
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert status == "", status


@pytest.mark.slow
def test_a_report_shows_its_own_stores_certification_only(tmp_path):
    out = tmp_path / "report"
    first = f"sqlite:///{tmp_path / 'a.db'}"
    assert cli("run", "boolean-shallow", "--trials", "4", "--storage", first,
               *TINY_ARGS).returncode == 0  # fmt: skip
    done = cli("certify", "boolean-shallow", "--storage", first, "--seeds", "2",
               "--device", "cpu", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert cli("report", "boolean-shallow", "--storage", first, "--out", str(out)).returncode == 0
    summary = (out / "summary.md").read_text()
    assert "## Certification" in summary and "certify boolean-shallow" in summary
    stored = stored_attrs(optuna.load_study(study_name="boolean-shallow", storage=first))
    assert len(stored["certification"]["rows"]) >= 1
    # another store reported into the same directory: its own (absent) certification only,
    # although certification.md of the first store lies there
    second = f"sqlite:///{tmp_path / 'b.db'}"
    assert cli("run", "boolean-shallow", "--trials", "2", "--storage", second,
               *TINY_ARGS).returncode == 0  # fmt: skip
    assert cli("report", "boolean-shallow", "--storage", second, "--out", str(out)).returncode == 0
    assert (out / "certification.md").is_file()
    assert "## Certification" not in (out / "summary.md").read_text()


# ----------------------------------------------------------------------------------------------
# 3, 4: resume from stored settings; validate before writing


@pytest.mark.slow
def test_resume_needs_no_flags_and_a_contradicting_flag_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = cli("run", "boolean-shallow", "--trials", "2", "--storage", storage, *TINY_ARGS,
                "--max-epochs", "40", "--seeds", "1")  # fmt: skip
    assert first.returncode == 0, first.stderr
    again = cli("run", "boolean-shallow", "--trials", "3", "--storage", storage, "--quiet",
                "--device", "cpu")  # fmt: skip
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    assert stored_attrs(study)["settings"]["max_epochs"] == 40
    assert stored_attrs(study)["settings"]["seeds"] == 1
    assert len(study.trials) == 3 and all(len(t.user_attrs["seeds"]) == 1 for t in study.trials)
    # repeating a stored value is fine; contradicting one is refused and changes nothing
    same = cli("run", "boolean-shallow", "--trials", "3", "--storage", storage, "--seeds", "1")
    assert same.returncode == 0, same.stderr
    refused = cli("run", "boolean-shallow", "--trials", "4", "--storage", storage, "--seeds", "2")
    assert refused.returncode == 2 and "--seeds 2 (stored: 1)" in refused.stderr
    # a refusal names the flag the user typed, never an internal field
    refused = cli("run", "boolean-shallow", "--trials", "4", "--storage", storage, "--pruner",
                  "none")  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "--pruner none (stored: target-unreachable)" in refused.stderr
    assert "prune=" not in refused.stderr
    assert len(optuna.load_study(study_name="boolean-shallow", storage=storage).trials) == 3
    # the Python API the same way
    resumed = run_study("boolean-shallow", trials=4, storage=storage, device="cpu",
                        quiet=True)  # fmt: skip
    assert len(resumed.trials) == 4


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--function-seed", str(2**64)], "--function-seed:"),
        (["--function-seed", "-1"], "--function-seed:"),
        (["--seeds", "100000"], "--seeds:"),
        (["--max-learning-rate", "20"], "--max-learning-rate:"),
        (["--sampler-seed", str(2**40)], "--sampler-seed:"),
        (["--workers", "64"], "--workers:"),
        (["--population", "10000000"], "--population:"),
        (["--study-name", ""], "--study-name:"),
    ],
)
def test_a_refused_value_leaves_no_store_behind(tmp_path, args, expected):
    db = tmp_path / "s.db"
    done = cli("run", "boolean-shallow", "--trials", "2", "--storage", f"sqlite:///{db}", *args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr
    assert not db.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_an_image_study_with_too_large_a_validation_split_is_not_stored(tmp_path):
    from tests.conftest import write_fake_dataset

    images = write_fake_dataset(tmp_path / "images", train=200, test=50)
    db = tmp_path / "s.db"
    args = ["run", "fashion-mlp", "--trials", "1", "--storage", f"sqlite:///{db}", "--data-dir",
            str(images), "--min-epochs", "1", "--max-epochs", "1", "--device", "cpu",
            "--quiet"]  # fmt: skip
    done = cli(*args, "--validation-size", "200")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "validation_size: must be between 1 and 199" in done.stderr and not db.exists()
    done = cli(*args, "--validation-size", "50")  # the corrected command is not a conflict
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------------------------
# 5: exact totals


def test_workers_with_populations_finish_exactly_the_total(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    done = cli("run", "boolean-shallow", "--trials", "12", "--workers", "2", "--population",
               "4", "--storage", storage, *TINY_ARGS)  # fmt: skip
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    assert [t.state.name for t in trials].count("COMPLETE") + [t.state.name for t in trials].count(
        "PRUNED"
    ) == 12
    assert len(trials) == 12


@pytest.mark.slow
def test_the_parent_of_workers_reads_the_store_only_to_redraw(tmp_path, monkeypatch):
    """The parent sleeps until a worker ends or its bar is due (no polling loop): with the bar
    due once a minute, it reads the finished trials a handful of times in a run of seconds."""
    from study import runner
    from tests.conftest import TINY

    reads = []
    counted = runner.finished_trials
    monkeypatch.setattr(runner, "PROGRESS_SECONDS", 60.0)
    monkeypatch.setattr(runner, "finished_trials", lambda s: reads.append(1) or counted(s))
    started = time.monotonic()
    study = run_study("boolean-shallow", trials=4, storage=f"sqlite:///{tmp_path / 'w.db'}",
                      sampler_seed=0, device="cpu", quiet=False, workers=2,
                      settings={**TINY, "input_bits": 5, "output_bits": 2, "max_width": 16,
                                "max_epochs": 2000, "prune": False})  # fmt: skip
    took = time.monotonic() - started
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 4
    assert took > 8, took  # long enough for a parent that polls each second to read 8 times
    assert len(reads) <= 8, (len(reads), took)  # the bar's first and last, a worker's end


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    POSTGRES is None, reason="set STUDY_TEST_POSTGRES (make test starts one)"))])  # fmt: skip
def test_two_processes_with_populations_on_one_new_store_finish_exactly(tmp_path, backend):
    # on SQLite both processes create the store at the same moment
    storage = f"sqlite:///{tmp_path / 'new.db'}" if backend == "sqlite" else POSTGRES
    name = f"both-{os.getpid()}-{time.monotonic_ns()}"
    args = command(storage, "--trials", "12", "--population", "4", "--study-name", name,
                   *TINY_ARGS)  # fmt: skip
    processes = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]  # fmt: skip
    for p in processes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name=name, storage=storage)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 12 and len(study.trials) == 12
    if backend == "postgresql":
        optuna.delete_study(study_name=name, storage=storage)


RACE = """
import sys, time
import optuna
from study.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:  # every process opens the new store at the same moment
    time.sleep(0.001)
optuna.create_study(study_name="race", storage=open_storage(url, create=True), load_if_exists=True)
"""


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    POSTGRES is None, reason="set STUDY_TEST_POSTGRES (make test starts one)"))])  # fmt: skip
def test_four_processes_creating_one_new_store_at_once_all_succeed(tmp_path, backend):
    """Workers started together on a new store (how a user starts several machines): the
    tables are created once, under a lock file (SQLite) or an advisory lock (PostgreSQL)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT") if POSTGRES else None
    for round_ in range(3):
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / f'race-{round_}.db'}"
        else:
            database = f"race_{os.getpid()}_{round_}"
            with admin.connect() as connection:
                connection.execute(text(f"DROP DATABASE IF EXISTS {database}"))
                connection.execute(text(f"CREATE DATABASE {database}"))
            url = make_url(POSTGRES).set(database=database).render_as_string(hide_password=False)
        start = str(time.time() + 4)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", RACE, url, start], stderr=subprocess.PIPE, text=True
            )
            for _ in range(4)
        ]
        for p in processes:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        assert len(optuna.get_all_study_summaries(url)) == 1
        if backend == "postgresql":
            with admin.connect() as connection:
                connection.execute(text(f"DROP DATABASE {database} WITH (FORCE)"))


# ----------------------------------------------------------------------------------------------
# 6: no trial stays RUNNING


@pytest.mark.slow
def test_killed_population_then_a_run_at_the_same_total_leaves_nothing_running(tmp_path):
    db = tmp_path / "kill.db"
    args = command(f"sqlite:///{db}", "--trials", "4", "--population", "4", *SLOW_ARGS)
    worker = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: sampled_running(db) == 4, process=worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    # at once, well within the heartbeat grace (30 s): the dead owner is seen by its pid
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="boolean-shallow", storage=f"sqlite:///{db}")
    by_state = [t.state.name for t in study.trials]
    assert "RUNNING" not in by_state and by_state.count("FAIL") == 4
    assert by_state.count("COMPLETE") + by_state.count("PRUNED") == 4
    assert all("ended before the trial finished" in t.user_attrs["fail_reason"]
               for t in study.trials if t.state.name == "FAIL")  # fmt: skip
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_a_run_with_nothing_left_to_do_still_fails_dead_trials(tmp_path):
    db = tmp_path / "done.db"
    storage = f"sqlite:///{db}"
    first = subprocess.run(command(storage, "--trials", "2", "--population", "2", *SLOW_ARGS),
                           capture_output=True, text=True)  # fmt: skip
    assert first.returncode == 0, first.stderr
    args = command(storage, "--trials", "6", "--population", "4", *SLOW_ARGS)
    worker = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: sampled_running(db) == 4, process=worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    done = subprocess.run(command(storage, "--trials", "2", "--quiet"), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = states(db)
    assert "RUNNING" not in found.values()
    assert list(found.values()).count("FAIL") == 4
    assert list(found.values()).count("WAITING") == 4  # re-queued for a run with a larger total


@pytest.mark.slow
def test_two_quick_ctrl_c_end_in_one_line_whenever_the_second_lands(tmp_path):
    """The second Ctrl-C may land inside an epoch, in the store writes that fail the trial or
    while the process exits: every time, exit 130, one line, no trial left RUNNING."""
    db = tmp_path / "s.db"
    args = command(f"sqlite:///{db}", "--trials", "3", *SLOW_ARGS)
    for gap in (0.0, 0.05, 0.3):
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: "RUNNING" in states(db).values(), process=process)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        time.sleep(gap)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        # 130, or ended by SIGINT itself: the shell reports 130 for both
        assert process.returncode in (130, -signal.SIGINT), (gap, stderr)
        assert "Traceback" not in stderr, stderr
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        assert lines[-1].startswith("study: interrupted"), stderr
        assert "RUNNING" not in states(db).values()
    study = optuna.load_study(study_name="boolean-shallow", storage=f"sqlite:///{db}")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == 3
    assert all("Ctrl-C" in t.user_attrs["fail_reason"] or "SIGINT" in t.user_attrs["fail_reason"]
               for t in failed)  # fmt: skip


@pytest.mark.slow
def test_sigterm_to_a_workers_parent_stops_its_workers(tmp_path):
    db = tmp_path / "s.db"
    args = command(f"sqlite:///{db}", "--trials", "8", "--workers", "2", *SLOW_ARGS)
    parent = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(states(db).values()).count("RUNNING") == 2, process=parent)
    children = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True,
                              text=True).stdout.split()  # fmt: skip
    workers = [int(pid) for pid in children]
    assert workers
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=120)
    assert parent.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("study: terminated (SIGTERM)")

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: all(gone(pid) for pid in workers), timeout=30)
    assert "RUNNING" not in states(db).values()


# ----------------------------------------------------------------------------------------------
# 7: no secrets in output


@pytest.mark.slow
@pytest.mark.skipif(POSTGRES is None, reason="set STUDY_TEST_POSTGRES (make test starts one)")
def test_a_storage_password_never_reaches_any_output(tmp_path):
    secret = "s3cret-Pw-4711"
    url = POSTGRES.replace("postgres@", f"postgres:{secret}@", 1)  # trust auth ignores it
    assert secret in url
    name = f"secret-{os.getpid()}-{time.monotonic_ns()}"
    out = tmp_path / "out"
    seen = []
    for args in (["run", "boolean-shallow", "--trials", "2", "--storage", url, "--study-name",
                  name, *TINY_ARGS, "--report", "--report-dir", str(out)],
                 ["report", name, "--storage", url, "--out", str(out)],
                 ["certify", name, "--storage", url, "--seeds", "1", "--device", "cpu",
                  "--out", str(out)],
                 ["export", name, "--storage", url],
                 ["dashboard", "--storage", url.replace("/postgres", "/nodb"), "--port", "1"],
                 ["report", "nope", "--storage", url]):  # fmt: skip
        done = cli(*args)
        seen += [done.stdout, done.stderr]
    seen += [p.read_text() for p in out.iterdir() if p.suffix in (".md", ".csv", ".json")]
    study = optuna.load_study(study_name=name, storage=POSTGRES)
    seen.append(str(stored_attrs(study)))
    assert all(secret not in text for text in seen)
    assert any("***" in text for text in seen)  # the URL is shown, its password hidden
    optuna.delete_study(study_name=name, storage=POSTGRES)


@pytest.mark.slow
def test_a_trial_of_another_machine_is_failed_once_its_heartbeat_is_stale(tmp_path):
    from study.rdb import trial_id

    storage = f"sqlite:///{tmp_path / 's.db'}"
    env = {**os.environ, "STUDY_HEARTBEAT_SECONDS": "1"}
    first = subprocess.run(command(storage, "--trials", "1", *TINY_ARGS), env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert first.returncode == 0, first.stderr
    # a trial another machine started, then lost: one heartbeat, then silence
    rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=2)
    trial = optuna.load_study(study_name="boolean-shallow", storage=rdb).ask()
    trial.suggest_int("width", 2, 2, log=True)  # it had started: its parameters are re-queued
    rdb.set_trial_system_attr(trial_id(trial), "study:owner", {"host": "elsewhere", "pid": 1})
    rdb.record_heartbeat(trial_id(trial))
    # a grace (8 s) longer than this process takes to start: it has to wait, and says so
    later = {**os.environ, "STUDY_HEARTBEAT_SECONDS": "4"}
    done = subprocess.run(command(storage, "--trials", "1", "--quiet"), env=later,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "waiting for 1 running trial" in done.stderr  # the user is told why it waits
    trials = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    assert [t.state.name for t in trials][1:] == ["FAIL", "WAITING"]
    assert "heartbeat stopped" in trials[1].user_attrs["fail_reason"]


# ----------------------------------------------------------------------------------------------
# 8: a store that cannot be written says why


def _no_file_may_grow_beyond(size: int):
    """For a child process: a file-size limit of `size` bytes (as a full disk would stop it:
    a write past it fails with EFBIG instead of the signal that would kill the process)."""

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


@pytest.mark.slow
def test_a_full_disk_is_said_in_one_line_and_the_store_survives(tmp_path):
    """The store cannot grow (no root needed: the process's file-size limit stands in for a
    full disk): one line, exit 2, what was stored intact."""
    db = tmp_path / "s.db"
    storage = f"sqlite:///{db}"
    first = cli("run", "boolean-shallow", "--trials", "1", "--storage", storage, *TINY_ARGS)
    assert first.returncode == 0, first.stderr
    command = [sys.executable, "-m", "study.cli", "run", "boolean-shallow", "--trials", "3",
               "--storage", storage, *TINY_ARGS]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          preexec_fn=_no_file_may_grow_beyond(db.stat().st_size))  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "the disk is full" in done.stderr or "could not write" in done.stderr, done.stderr
    trials = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    assert trials[0].state.name in ("COMPLETE", "PRUNED")  # what was stored is intact


@pytest.mark.slow
def test_a_store_whose_journal_cannot_be_written_is_said_in_one_line(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    assert cli("run", "boolean-shallow", "--trials", "1", "--storage", storage,
               *TINY_ARGS).returncode == 0  # fmt: skip
    (tmp_path / "s.db-journal").mkdir()  # SQLite cannot create its journal beside the store
    done = cli("run", "boolean-shallow", "--trials", "2", "--storage", storage, *TINY_ARGS)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "journal" in done.stderr and "Traceback" not in done.stderr
