"""Ctrl-C during a study: the running trial fails with its reason, the store stays consistent,
one clear message, and the same command continues the study."""

import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest

from tests.conftest import write_fake_dataset


def _states(db) -> dict[int, str]:
    """Trial number -> state, read directly (empty while the store is being created)."""
    try:
        with sqlite3.connect(db) as connection:
            rows = connection.execute("SELECT number, state FROM trials").fetchall()
    except sqlite3.OperationalError:
        return {}
    return dict(rows)


@pytest.mark.slow
def test_sigint_fails_the_running_trial_and_the_same_command_continues(tmp_path):
    images = write_fake_dataset(tmp_path / "images", train=400, test=100)
    db = tmp_path / "s.db"
    storage = f"sqlite:///{db}"
    command = [
        sys.executable, "-m", "study.cli", "run", "fashion-mlp", "--trials", "3",
        "--storage", storage, "--data-dir", str(images), "--validation-size", "100",
        "--min-epochs", "60", "--max-epochs", "60", "--device", "cpu", "--quiet",
        "--sampler-seed", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # wait until trial 0 is complete and trial 1 is running, then press Ctrl-C
    while time.monotonic() < deadline:
        states = _states(db) if db.exists() else {}
        if states.get(0) == "COMPLETE" and 1 in states:
            break
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    before = optuna.load_study(study_name="fashion-mlp", storage=storage).trials[0]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130
    assert "Traceback" not in stderr, stderr  # a message, not a crash report
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("study: interrupted: 1 of 3 trials") and "run the same command" in last

    study = optuna.load_study(study_name="fashion-mlp", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL"]  # nothing left RUNNING
    assert "interrupted" in study.trials[1].user_attrs["fail_reason"]
    assert study.trials[0].value == before.value
    assert study.trials[0].datetime_complete == before.datetime_complete

    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="fashion-mlp", storage=storage)
    assert [t.state.name for t in study.trials].count("COMPLETE") == 3
    assert study.trials[0].value == before.value


def test_a_second_ctrl_c_stops_at_once_inside_and_after_the_watched_block():
    """First SIGINT: a request, checked at the next epoch; second SIGINT: KeyboardInterrupt at
    once, also while the command is already on its way out; later, Ctrl-C is plain again."""
    import os

    import pytest

    from study import interrupt

    # as in a terminal (a process started in the background may inherit SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _two_ctrl_c(interrupt, pytest, os)
    finally:
        signal.signal(signal.SIGINT, inherited)


def _two_ctrl_c(interrupt, pytest, os) -> None:
    with pytest.raises(KeyboardInterrupt) as stopped, interrupt.watching():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert interrupt.requested()
        with pytest.raises(interrupt.Stopped) as first:
            interrupt.check()
        assert first.value.stop is interrupt.CTRL_C
        os.kill(os.getpid(), signal.SIGINT)  # second one: at once
        time.sleep(1)
        raise AssertionError("the second Ctrl-C did not stop at once")
    assert stopped.value.stop is interrupt.SECOND_CTRL_C
    assert interrupt.ending(stopped.value) == ("study: interrupted at once (second Ctrl-C)", 130)
    with pytest.raises(KeyboardInterrupt) as late:
        with interrupt.watching():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # after the block, while the command ends
        time.sleep(1)
    assert late.value.stop is interrupt.SECOND_CTRL_C
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_stops_table_says_what_each_stop_does():
    """One table: each stop's line, stored reason, exit status and whether it re-queues."""
    from study import interrupt

    assert [s.exit_status for s in interrupt.STOPS] == [130, 130, 143, 0]
    assert [s.at_once for s in interrupt.STOPS] == [False, True, True, False]
    assert [s.requeue for s in interrupt.STOPS] == [False, False, False, True]
    assert len({s.reason for s in interrupt.STOPS}) == len(interrupt.STOPS)
    assert interrupt.stop_of(KeyboardInterrupt()) is interrupt.CTRL_C  # Python's own handler
    assert interrupt.stop_of(ValueError("x")) is None
    assert interrupt.reason_of(ValueError("bad\nmore")) == "stopped by an error: ValueError: bad"
    line, status = interrupt.ending(interrupt.Stopped(interrupt.SIGTERM, "terminated: 3 of 5"))
    assert (line, status) == ("study: terminated: 3 of 5", 143)
    with interrupt.watching(deadline=0.0), pytest.raises(interrupt.Stopped) as spent:
        interrupt.check()
    assert spent.value.stop is interrupt.TIME_BUDGET


def test_a_sigterm_whose_exception_is_swallowed_still_stops_the_run(monkeypatch):
    """A handler's exception that lands in a finaliser (or a library's `except BaseException`)
    is lost; the next `check` (every epoch) raises it again, so a SIGTERM forwarded to a worker
    always stops it. Python does not print the lost one (no traceback for the user); any other
    exception a finaliser loses still reaches the hook that was there before."""
    import gc
    import os
    import sys

    from study import interrupt

    printed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: printed.append(type(u.exc_value)))

    class Finalised:
        def __init__(self, error=None):
            self.error = error

        def __del__(self):  # exceptions raised here are dropped by Python, through the hook
            if self.error is not None:
                raise self.error
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the finaliser

    with interrupt.watching():
        Finalised()  # collected at once: SIGTERM arrives inside __del__
        gc.collect()
        Finalised(ValueError("a bug in a finaliser"))
        gc.collect()
        with pytest.raises(interrupt.Stopped) as stopped:
            interrupt.check()
        assert stopped.value.stop is interrupt.SIGTERM
        with pytest.raises(interrupt.Stopped):  # and again, until the run has stopped
            interrupt.check()
    assert printed == [ValueError]
    interrupt.check()  # a new block starts clean
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_inside_a_held_block_is_handled_when_the_block_ends():
    """Creating a trial and recording its owner is one held block: a SIGTERM or Ctrl-C that
    lands in it is handled right after it, never in the middle, and never lost."""
    import os

    from study import interrupt

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        finished = []
        with pytest.raises(interrupt.Stopped) as stopped, interrupt.watching():
            with interrupt.held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                finished.append("block")  # not cut short
            finished.append("after")  # not reached: the held SIGTERM is raised first
        assert finished == ["block"] and stopped.value.stop is interrupt.SIGTERM
        with interrupt.watching():
            with interrupt.held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                assert not interrupt.requested()
            assert interrupt.requested()  # a first Ctrl-C: a request, as outside the block
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_stop_is_never_raised_inside_a_storage_call(tmp_path):
    """A SIGTERM that lands while a read's cursor is open (here: right after SQLAlchemy ran it)
    is raised once the call has returned: the read returns every row, no frame of the stop is
    storage code, and the store is not locked while the stop is handled (a write from another
    connection that will not wait goes through; raised inside the read, the open cursor kept
    SQLite's lock for as long as the exception lived, and a worker waited out the busy
    timeout failing its trials)."""
    import os
    import traceback

    from study import interrupt

    db = tmp_path / "s.db"
    study, fired = _a_signal_inside_the_next_read(db, signal.SIGTERM)
    trials, started = [], time.monotonic()
    with pytest.raises(interrupt.Stopped) as stopped, interrupt.watching():
        trials = study.get_trials()
        time.sleep(30)  # cut short by the signal, sent again after REDELIVER_SECONDS
        raise AssertionError("the stop was not delivered again")
    assert time.monotonic() - started < 10  # a signal ended the sleep, not its end
    assert fired and len(trials) == 20
    assert stopped.value.stop is interrupt.SIGTERM
    files = [frame.filename for frame in traceback.extract_tb(stopped.value.__traceback__)]
    assert not [f for f in files if "sqlalchemy" in f or os.path.join("optuna", "storages") in f]
    with sqlite3.connect(db, timeout=0) as other:  # raises at once if the store is locked
        other.execute("UPDATE trials SET state = state")


def _a_signal_inside_the_next_read(db, signum: int):
    """A store of 20 trials whose next SQL statement sends `signum` to this process right
    after SQLAlchemy ran it (its cursor open); returns the study and a list that records it."""
    import os

    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    study = optuna.create_study(storage=storage, study_name="s")
    for _ in range(20):
        study.ask().report(1.0, 1)
    fired = []

    def fire(*args) -> None:
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signum)

    event.listen(storage.engine, "after_cursor_execute", fire)
    return study, fired


def test_a_second_ctrl_c_on_the_way_out_waits_for_the_storage_call(tmp_path):
    """After the watched block (a first Ctrl-C stops the command, which still writes), a second
    Ctrl-C that lands in a storage call stops the command right after that call."""
    import os

    from study import interrupt

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        study, fired = _a_signal_inside_the_next_read(tmp_path / "s.db", signal.SIGINT)
        fired.append(True)  # not yet: the first Ctrl-C comes from here
        trials, started = [], time.monotonic()
        with pytest.raises(interrupt.Stopped) as stopped:
            with interrupt.watching():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            fired.clear()  # the next read gets the second Ctrl-C
            trials = study.get_trials()
            time.sleep(30)  # cut short by the second Ctrl-C, sent again
            raise AssertionError("the second Ctrl-C was not delivered again")
        assert time.monotonic() - started < 10
        assert fired and len(trials) == 20
        assert stopped.value.stop is interrupt.SECOND_CTRL_C
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


# ----------------------------------------------------------------------------------------------
# the time budget keeps finished work


def _budget_after(calls: int):
    """A stand-in for `interrupt.check`: the time budget runs out at its `calls`-th call."""
    from study import interrupt

    seen = []

    def check(trial=None) -> None:
        seen.append(1)
        if len(seen) >= calls:
            if trial is not None:
                trial.set_user_attr("fail_reason", interrupt.TIME_BUDGET.reason)
            raise interrupt.Stopped(interrupt.TIME_BUDGET)

    return check


def test_an_image_trial_that_trained_its_last_epoch_is_kept_when_time_runs_out(
    tmp_path, monkeypatch
):
    """The budget runs out during the last epoch: the trial is COMPLETE, not failed and
    re-queued to train again."""
    from study import interrupt
    from study.runner import run_study

    images = write_fake_dataset(tmp_path / "images", train=300, test=60)
    monkeypatch.setattr(interrupt, "check", _budget_after(3))  # the loop, epoch 1, the loop
    settings = {"validation_size": 60, "min_epochs": 2, "max_epochs": 2}
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = run_study("fashion-mlp", trials=3, storage=storage, data_dir=str(images),
                      device="cpu", quiet=True, settings=settings)  # fmt: skip
    states = [t.state.name for t in study.trials]
    assert states[0] == "COMPLETE", states
    assert "FAIL" not in states and "RUNNING" not in states


def test_a_population_keeps_the_trials_decided_before_the_time_budget(tmp_path, monkeypatch):
    """One trial of the population has ended (a 5-epoch budget), the other still trains when
    the budget runs out: the first is told, the second left for the runner to fail."""
    import types

    from study import claims, interrupt
    from study.boolean_objective import PopulationBatch
    from study.config import BooleanCandidate, BooleanSettings
    from study.storage import open_storage

    space = types.ModuleType("two_budgets")

    def suggest(trial, settings):
        short = trial.number == 0
        rate = trial.suggest_float("learning_rate", 1e-5, 1e-5)
        return BooleanCandidate((4,), rate, 8, 5 if short else 500)

    space.suggest = suggest
    settings = BooleanSettings(input_bits=3, output_bits=3, seeds=2, prune=False,
                               min_learning_rate=1e-5, max_learning_rate=1e-5)  # fmt: skip
    study = optuna.create_study(
        study_name="two", storage=open_storage(f"sqlite:///{tmp_path / 's.db'}", create=True)
    )
    trials = claims.claim(study, 2)
    monkeypatch.setattr(interrupt, "check", _budget_after(10))  # after epoch 10
    with pytest.raises(interrupt.Stopped):
        PopulationBatch(space, settings, "cpu").train(study, trials)
    first, second = study.get_trials()
    assert first.state.name == "COMPLETE" and first.user_attrs["epochs_run"] == [5, 5]
    assert second.state.name == "RUNNING"
