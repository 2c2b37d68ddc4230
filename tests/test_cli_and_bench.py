"""The `data` and `bench` commands at tiny sizes (benchmarks are timed only by their commands)."""

import subprocess
import sys

import pytest

from study.bench import bench_trainer
from study.bench_population import bench_boolean

from .conftest import write_fake_dataset


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_data_command_prepares_a_dataset_from_a_directory(tmp_path):
    source = write_fake_dataset(tmp_path / "mnist", train=12_000, test=100, gz=True)
    done = run("data", "mnist", "--data-dir", str(source))
    assert done.returncode == 0, done.stderr
    assert "2000 train + 10000 validation + 100 test images" in done.stdout


def test_data_command_without_files_is_one_clear_line(tmp_path):
    done = run("data", "mnist", "--data-dir", str(tmp_path / "nothing"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--data-dir" in lines[0]


def test_bench_boolean_trains_the_same_configurations_three_ways():
    logged = []
    result = bench_boolean(trials=2, epochs=3, device_name="cpu", log=logged.append)
    for key in ("tutorial", "sequential", "population"):
        assert result[f"{key}_trials_per_second"] > 0
    # the sequential and population trainers compute the same thing
    assert result["population_median_final_loss"] == pytest.approx(
        result["sequential_median_final_loss"], rel=1e-4
    )
    assert any("(c)/(a)" in line for line in logged)


def test_bench_trainer_runs_both_pipelines(tmp_path):
    source = write_fake_dataset(tmp_path / "fashion", train=11_000, test=200)
    logged = []
    result = bench_trainer(source, "cpu", repeats=1, log=logged.append)
    assert result["tutorial_seconds"] > 0 and result["trainer_seconds"] > 0
    assert any("speed-up" in line for line in logged)


@pytest.mark.slow
def test_bench_pruners_runs_the_pruners_side_by_side(tmp_path):
    from study.bench import bench_pruners

    source = write_fake_dataset(tmp_path / "fashion", train=11_000, test=100)
    logged = []
    best = bench_pruners(minutes=0.25, repeats=1, data_dir=source, log=logged.append)
    assert set(best) == {"median", "hyperband"}
    assert all(len(v) == 1 for v in best.values())  # nan: no trial completed in the budget
    assert any("hyperband" in line and "best validation accuracy" in line for line in logged)
    assert any("searched trials only" in line for line in logged)
    assert logged[-1].split("better: ")[1].split()[0] in ("median", "hyperband")


@pytest.mark.slow
def test_bench_cnn_compares_a_plain_script_with_the_trainer(tmp_path):
    """The plain DataLoader script and the trainer's variants train the same network one epoch
    each and report a ratio; on the CPU, threads against processes side by side."""
    from study.bench import bench_cnn

    source = write_fake_dataset(tmp_path / "fashion", train=10_300, test=100)
    logged = []
    result = bench_cnn(source, "cpu", repeats=1, log=logged.append, compiled=False)
    plain = result["seconds[(a) plain script, fp32]"]
    assert plain > 0 and result["seconds[(c) trainer, bf16 autocast, channels_last]"] > 0
    assert any("(c) trainer, bf16 autocast" in line and "x" in line for line in logged)
    assert any("two processes with 1 thread each" in line for line in logged)
    assert any("torch.compile unavailable here" in line for line in logged)  # left out here
    assert result["epochs_per_minute[2 processes x 1 thread]"] > 0


def test_bench_pruners_refuses_a_nonsense_budget_in_one_line():
    for minutes in ("nan", "-1", "inf"):
        done = run("bench", "pruners", "--minutes", minutes)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "--minutes" in done.stderr
    done = run("bench", "pruners", "--pruners", "median,target-unreachable")
    assert done.returncode == 2 and "pruner" in done.stderr
