"""Worker processes on one storage: exactly the requested number of trials, none failed."""

import itertools

import optuna
import pytest

from study.runner import run_study
from tests.conftest import TINY


@pytest.mark.slow
def test_three_workers_finish_exactly_twelve_trials_on_sqlite(tmp_path):
    storage = f"sqlite:///{tmp_path / 'parallel.db'}"
    study = run_study(
        "boolean-shallow",
        trials=12,
        storage=storage,
        sampler_seed=0,
        device="cpu",
        settings={**TINY, "max_epochs": 300},
        quiet=True,
        workers=3,
    )
    states = [t.state.name for t in study.get_trials()]
    assert len(states) == 12, states
    assert set(states) <= {"COMPLETE", "PRUNED"}, states
    # the trials really ran in parallel: some started before another one ended
    trials = sorted(study.get_trials(), key=lambda t: t.datetime_start)
    pairs = itertools.pairwise(trials)
    overlaps = sum(1 for a, b in pairs if b.datetime_start < a.datetime_complete)
    assert overlaps > 0
    # running it again with the same total does nothing new
    again = run_study("boolean-shallow", trials=12, storage=storage, device="cpu",
                      settings={**TINY, "max_epochs": 300}, quiet=True, workers=3)  # fmt: skip
    assert len(again.get_trials()) == 12
    assert optuna.load_study(study_name="boolean-shallow", storage=storage).user_attrs["kind"]


def test_workers_get_one_gpu_each_when_several_are_visible(monkeypatch):
    from study.runner import assign_gpus, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    assert assign_gpus(3, visible_gpus()) == ["2", "5", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert assign_gpus(2, visible_gpus()) == [None, None]  # one GPU: both share it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == [] and assign_gpus(2, []) == [None, None]
