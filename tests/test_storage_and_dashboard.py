"""Crash safety of the sequential path, PostgreSQL workers, the dashboard, bad storages."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from study.runner import run_study
from tests.conftest import TINY, TINY_ARGS, cli

POSTGRES = os.environ.get("STUDY_TEST_POSTGRES") or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigkill_mid_trial_then_the_same_command_finishes_the_study(tmp_path):
    db = tmp_path / "kill.db"
    storage = f"sqlite:///{db}"
    command = [sys.executable, "-m", "study.cli", "run", "boolean-shallow", "--trials", "4",
               "--storage", storage, "--device", "cpu", "--quiet", "--no-prune",
               *TINY_ARGS, "--max-epochs", "3000", "--min-learning-rate", "1e-3",
               "--max-learning-rate", "2e-3"]  # fmt: skip
    env = {**os.environ, "STUDY_HEARTBEAT_SECONDS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once a trial runs after at least one finished
        if db.exists():
            try:
                trials = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
            except Exception:  # the store is still being created
                trials = []
            states = [t.state for t in trials]
            # mid-trial: a trial runs (its parameters sampled) after at least one finished
            if (any(s.is_finished() for s in states) and states[-1].name == "RUNNING"
                    and len(trials[-1].params) == 4):  # fmt: skip
                break
        assert process.poll() is None, "the study finished before it could be killed"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    finished_before = [t for t in before if t.state.is_finished()]
    killed = [t for t in before if t.state.name == "RUNNING"]
    assert len(killed) == 1 and finished_before

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after) == 4
    for old in finished_before:  # finished trials are untouched
        new = after[old.number]
        assert (new.state, new.values, new.params, new.datetime_complete) == (
            old.state, old.values, old.params, old.datetime_complete)  # fmt: skip
    # the killed trial is failed (stale heartbeat) and retried with the same parameters
    assert after[killed[0].number].state.name == "FAIL"
    retried_number = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retried = [t for t in after if retried_number(t) == killed[0].number]
    assert len(retried) == 1 and retried[0].params == killed[0].params
    assert retried[0].state.name in ("COMPLETE", "PRUNED")


@pytest.mark.slow
@pytest.mark.skipif(POSTGRES is None, reason="set STUDY_TEST_POSTGRES (make test starts one)")
def test_two_workers_on_postgresql(tmp_path):
    name = f"pg-{os.getpid()}-{time.monotonic_ns()}"
    study = run_study("boolean-shallow", trials=6, storage=POSTGRES, study_name=name,
                      sampler_seed=0, device="cpu", settings={**TINY, "min_width": 8},
                      quiet=True, workers=2)  # fmt: skip
    states = [t.state.name for t in study.get_trials()]
    assert len(states) == 6 and set(states) <= {"COMPLETE", "PRUNED"}
    assert study.best_trial.user_attrs["neurons"] >= 1
    optuna.delete_study(study_name=name, storage=POSTGRES)


def test_unreachable_postgresql_is_one_clear_line():
    port = _free_port()  # nothing listens there
    done = cli("run", "boolean-shallow", "--trials", "1",
               "--storage", f"postgresql://study@127.0.0.1:{port}/studies")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "cannot open postgresql://study@127.0.0.1" in done.stderr
    assert "refused" in done.stderr.lower() or "failed" in done.stderr.lower()


def test_dashboard_serves_the_store_over_http(tmp_path):
    storage = f"sqlite:///{tmp_path / 'dash.db'}"
    optuna.create_study(storage=storage, study_name="visible-study")
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "study.cli",
            "dashboard",
            "--storage",
            storage,
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            assert server.poll() is None, server.stderr.read()
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/studies", timeout=5
                ) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "the dashboard did not answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["visible-study"]
    finally:
        # Ctrl-C ends it (a user presses again if the first lands while it answers: one CI run
        # on a loaded host saw a dashboard still serving 30 s after a single SIGINT)
        for _ in range(2):
            server.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=30)
            if server.returncode is not None:
                break
    assert server.returncode is not None, "Ctrl-C twice did not end the dashboard"


def test_dashboard_on_a_bad_storage_is_one_clear_line(tmp_path):
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("hello")
    done = cli("dashboard", "--storage", f"sqlite:///{not_a_db}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "not an SQLite database" in done.stderr
    assert not_a_db.read_text() == "hello"


HOT_JOURNAL = """
import os, signal, sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size = 1")  # spill early: the journal is written
connection.execute("BEGIN IMMEDIATE")
for i in range(3000):
    connection.execute("INSERT INTO study_user_attributes (study_id, key, value_json) "
                       "VALUES (1, ?, ?)", (f"k{i}", '"' + "x" * 500 + '"'))
os.kill(os.getpid(), signal.SIGKILL)  # inside the transaction, as kill -9 or power loss
"""


def test_a_store_a_crash_left_with_a_hot_journal_opens_and_is_rolled_back(tmp_path):
    """A process killed inside a write leaves SQLite's rollback journal; a read-only open
    cannot roll it back. Every command opens the store anyway, at its last committed state."""
    db = tmp_path / "s.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="kept")
    study.add_trial(optuna.trial.create_trial(value=1.0))
    killed = subprocess.run([sys.executable, "-c", HOT_JOURNAL, str(db)])
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "s.db-journal").stat().st_size > 0  # hot: the store needs a rollback
    listed = cli("list", "--storage", f"sqlite:///{db}")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:3] == ["kept", "other", "1"]
    assert not (tmp_path / "s.db-journal").exists()
    kept = optuna.load_study(study_name="kept", storage=f"sqlite:///{db}")
    assert kept.user_attrs == {} and len(kept.trials) == 1  # the killed write never happened
