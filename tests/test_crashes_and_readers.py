"""A store that survives any crash, and runs that no reader can break.

- 50 kill -9 at random moments of `study run` (creating the store, creating the study,
  claiming, training, telling, reaping the previous victim's trials), each followed by `study
  list` and a resumed run that finishes the exact total;
- Optuna's own loader (which creates its tables on a store it opens) racing the creation of
  new stores, 50 times;
- readers in a loop (Optuna's loaders and CLI, `study list`, `study best`) beside a 2-worker
  run and a population on a store they create together, 50 repetitions;
- kills during the frontier's one-time migration of old cells.
"""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from study.cli import main
from study.overview import best_of, list_studies
from study.runner import run_study
from tests.conftest import TINY, TINY_ARGS

OPTUNA = str(os.path.join(os.path.dirname(sys.executable), "optuna"))
REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference.db"

FORKS = """
import os, sys
from study.runner import run_study  # torch and the tool imported once; each run is a fork
settings = {settings!r}
print("ready", flush=True)
for line in sys.stdin:
    url, name = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            run_study("boolean-shallow", settings, trials={total}, population=4, storage=url,
                      study_name=name, device="cpu", threads=1, quiet=True, sampler_seed=0)
        finally:
            os._exit(0)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)  # no zombie: the next run sees the owner gone at once
    print("killed" if os.WIFSIGNALED(status) else "finished", flush=True)
"""


@pytest.mark.slow
def test_fifty_kills_at_random_moments_each_leave_a_store_the_next_command_finishes(
    tmp_path, capsys
):
    total, kills, runs = 6, 0, 0
    settings = {**TINY, "max_epochs": 300}  # short trials: a run lasts about a second
    rng = random.Random(0)
    forks = subprocess.Popen(
        [sys.executable, "-c", FORKS.format(settings=settings, total=total)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert forks.stdout.readline().strip() == "ready"
        while kills < 50:
            assert runs < 150, f"only {kills} of {runs} runs were killed before they finished"
            url = f"sqlite:///{tmp_path / f's{runs // 5}.db'}"  # a new store every 5 runs
            name = f"k{runs}"
            forks.stdin.write(f"{url} {name}\n")
            forks.stdin.flush()
            pid = int(forks.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.8))  # creation, claims, training, tells, reaps
            with contextlib.suppress(ProcessLookupError):  # it finished first
                os.kill(pid, signal.SIGKILL)
            killed = forks.stdout.readline().strip() == "killed"
            kills, runs = kills + killed, runs + 1
            path = url.removeprefix("sqlite:///")
            if not os.path.exists(path):
                continue  # killed before the file existed: nothing to open
            listed = main(["list", "--storage", url])
            said = capsys.readouterr().err
            if os.path.getsize(path) == 0:  # killed before the first table: said in one line
                assert listed == 2 and said.count("\n") == 1 and "is empty" in said, said
            else:
                assert listed in (0, None), said
            study = run_study("boolean-shallow", settings, trials=total, population=4, storage=url,
                              study_name=name, device="cpu", quiet=True)  # fmt: skip
            states = [t.state.name for t in study.get_trials()]
            assert states.count("COMPLETE") + states.count("PRUNED") == total, states
            assert "RUNNING" not in states and "WAITING" not in states, states
        print(f"{kills} kills in {runs} runs")
    finally:
        forks.kill()
        forks.wait()


RACE = """
import sys, time
import optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
role, base, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
failures = 0
for i in range(50):
    url = f"sqlite:///{base}/s{i}.db"
    while time.time() < start + i * 0.12:
        pass
    if role == "tool":
        from study.storage import open_storage
        try:
            study = optuna.create_study(study_name="x", storage=open_storage(url, create=True))
            study.tell(study.ask(), 1.0)
        except Exception as error:
            failures += 1
            print(type(error).__name__, error, file=sys.stderr)
    else:  # Optuna's own loader creates its tables on the store it opens
        try:
            optuna.get_all_study_summaries(optuna.storages.RDBStorage(url))
        except Exception:
            pass
print(failures)
"""


@pytest.mark.slow
def test_optunas_loaders_racing_the_creation_of_fifty_stores_never_fail_the_tool(tmp_path):
    start = time.time() + 3.0
    processes = [
        subprocess.Popen([sys.executable, "-c", RACE, role, str(tmp_path), str(start)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for role in ("tool", "reader", "reader")
    ]  # fmt: skip
    out, err = processes[0].communicate(timeout=300)
    for other in processes[1:]:
        other.communicate(timeout=300)
    assert processes[0].returncode == 0 and out.strip() == "0", err
    for i in range(50):
        study = optuna.load_study(study_name="x", storage=f"sqlite:///{tmp_path / f's{i}.db'}")
        assert [t.state.name for t in study.trials] == ["COMPLETE"]


@pytest.mark.slow
def test_readers_in_a_loop_never_break_a_two_worker_run_and_a_population(tmp_path):
    db = tmp_path / "shared.db"
    url = f"sqlite:///{db}"
    common = ["--storage", url, *TINY_ARGS, "--max-epochs", "600"]
    runs = [
        subprocess.Popen([sys.executable, "-m", "study.cli", "run", "boolean-shallow",
                          "--trials", "10", "--workers", "2", *common],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-m", "study.cli", "run", "boolean-shallow",
                          "--study-name", "population", "--trials", "24", "--population", "8",
                          *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]  # fmt: skip
    for repetition in range(50):
        if db.exists():
            storage = optuna.storages.RDBStorage(url)  # as a notebook or the dashboard opens it
            for summary in optuna.get_all_study_summaries(storage):
                study = optuna.load_study(study_name=summary.study_name, storage=storage)
                assert all(t.number >= 0 for t in study.trials)
                assert best_of(summary.study_name, url)["study"] == summary.study_name
            list_studies(url)
            if repetition % 10 == 0:
                shown = subprocess.run([OPTUNA, "studies", "--storage", url],
                                       capture_output=True, text=True, timeout=120)  # fmt: skip
                assert shown.returncode == 0 or "no such table" in shown.stderr, shown.stderr
        time.sleep(0.1)
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    for name, total in (("boolean-shallow", 10), ("population", 24)):
        states = [t.state.name for t in optuna.load_study(study_name=name, storage=url).trials]
        assert states.count("COMPLETE") + states.count("PRUNED") == total, (name, states)
        assert "RUNNING" not in states, (name, states)


def test_a_study_whose_run_died_while_storing_its_settings_is_taken_up(tmp_path):
    """Killed after the study and its space were stored, before its settings (stored last):
    no trial can have run, and the next run binds it as new."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    half = optuna.create_study(study_name="half", storage=url)
    half.set_user_attr("space", "boolean-shallow")
    half.set_user_attr("kind", "boolean")
    study = run_study("boolean-shallow", TINY, trials=2, storage=url, study_name="half",
                      device="cpu", quiet=True)  # fmt: skip
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials()) == 2
    assert main(["best", "half", "--storage", url]) in (0, None)


MIGRATE = """
import sys
from study.frontier import align_with_optuna
from study.storage import open_storage
storage = open_storage(sys.argv[1])
print("ready", flush=True)
print(align_with_optuna(storage), flush=True)
"""


def _dealigned_copy(path) -> None:
    """The committed reference store with every cell's evaluations as earlier versions stored
    them (no constraint): what `align_with_optuna` migrates."""
    import shutil
    import sqlite3

    from study import rdb
    from study.frontier import STATED

    shutil.copy(REFERENCE, path)
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("DELETE FROM trial_system_attributes WHERE key = ?",
                           (rdb.constraint_key(STATED),))  # fmt: skip


def _values_and_constraints(path) -> list[tuple]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute(
            "SELECT t.trial_id, v.value, a.value_json FROM trials t "
            "LEFT JOIN trial_values v USING (trial_id) "
            "LEFT JOIN trial_system_attributes a ON a.trial_id = t.trial_id "
            "AND a.key LIKE 'constraints%' ORDER BY t.trial_id"
        ).fetchall()


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.exists(), reason="no committed reference store")
def test_kills_during_the_frontier_migration_leave_a_store_the_next_run_migrates(tmp_path):
    """The frontier's one-time migration of old cells, killed at random moments 5 times: each
    cell is one transaction, so every next command opens the store and the migration that
    finally completes leaves exactly what an unkilled one does."""
    clean = tmp_path / "clean.db"
    _dealigned_copy(clean)
    from study.frontier import align_with_optuna
    from study.storage import open_storage

    assert align_with_optuna(open_storage(f"sqlite:///{clean}")) > 0
    killed = tmp_path / "killed.db"
    _dealigned_copy(killed)
    url, rng = f"sqlite:///{killed}", random.Random(1)
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", MIGRATE, url], stdout=subprocess.PIPE,
                                 text=True)  # fmt: skip
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.5))  # the migration takes about a second
        child.kill()
        child.wait()
        assert main(["list", "--storage", url]) in (0, None)
    align_with_optuna(open_storage(url))
    assert _values_and_constraints(killed) == _values_and_constraints(clean)
