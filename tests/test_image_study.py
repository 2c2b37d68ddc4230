"""FashionMNIST/MNIST studies on tiny IDX files the tests write: spaces, pruning, OOM,
workers, export and predict."""

import json
import types

import optuna
import pytest
import torch

from search_spaces import _training, fashion_cnn, fashion_mlp
from study import device as dev
from study import trainer as trainer_module
from study.choices import make_image_pruner
from study.config import ImageCandidate, ImageSettings
from study.data import load_image_dataset
from study.errors import ConfigError
from study.export import export_model, load_exported, predict, read_image_file
from study.image_objective import ImageObjective
from study.runner import best_feasible, run_study, study_settings
from study.studies import stored_attrs
from study.trainer import evaluate, train
from tests.conftest import cli, make_images, write_fake_dataset

FAST = {"validation_size": 100, "min_epochs": 1, "max_epochs": 2}


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """400 training and 100 test images in FashionMNIST's IDX format."""
    return write_fake_dataset(tmp_path_factory.mktemp("images"), train=400, test=100)


def tiny_study(tmp_path, images_dir, name="fashion-mlp", trials=2, **kwargs):
    settings = {**FAST, **kwargs.pop("settings", {})}
    return run_study(
        name,
        trials=trials,
        storage=f"sqlite:///{tmp_path / 'images.db'}",
        sampler_seed=0,
        device="cpu",
        settings=settings,
        quiet=True,
        data_dir=str(images_dir),
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# every configuration of both spaces builds and trains


def _corners(space):
    """Fixed trials at the edges of a space: every layer/block count, the extreme widths, heads,
    residual units, both optimisers and schedules, every extra on and off."""
    trainings = [
        {**_training.plain_training("sgd", 0.4, 2e-3), "lr_schedule": "onecycle",
         "warmup_fraction": 0.3, "batch_size": 256, "label_smoothing": 0.15, "crop_padding": 2,
         "flip": True, "erase_probability": 0.4, "ema_horizon": 0.08, "test_time_flip": True},
        {**_training.plain_training("adamw", 3e-4, 0.2), "batch_size": 128},
    ]  # fmt: skip
    params = []
    if space is fashion_mlp:
        for layers in (1, 2, 3, 4):
            for width in (fashion_mlp.MIN_WIDTH, fashion_mlp.MAX_WIDTH):
                widths = {f"width_{i}": width for i in range(layers)}
                training = trainings[(layers + width) % 2]
                params.append({"layers": layers, **widths, "dropout": 0.5, **training})
    else:
        for blocks in (2, 3):
            for pick, residual, head in [(0, False, 0), (-1, True, 128)]:
                channels = {f"channels_{i}": fashion_cnn.WIDTHS[i][pick] for i in range(blocks)}
                params.append({"blocks": blocks, "residual": residual, **channels,
                               "head_width": head, "dropout": 0.3,
                               **trainings[blocks % 2]})  # fmt: skip
    return params


@pytest.mark.parametrize("space", [fashion_mlp, fashion_cnn], ids=["mlp", "cnn"])
def test_every_corner_of_the_space_builds_and_trains(space, images_dir):
    settings = space.base_settings().replace(**FAST)
    dataset = load_image_dataset("fashion-mnist", images_dir, validation_size=100)
    for params in _corners(space):
        candidate = space.suggest(optuna.trial.FixedTrial(params), settings)
        model = candidate.build(dataset.image_shape, dataset.num_classes)
        result = train(model, dataset.search_task(), candidate.train)
        assert result.epochs_run == settings.max_epochs == candidate.train.epochs, params
        assert 0.0 <= result.final.eval_accuracy <= 1.0
        # the stored config rebuilds the same network
        again = ImageCandidate.from_dict(json.loads(json.dumps(candidate.to_dict())))
        assert again == candidate


def test_a_study_of_an_older_space_is_refused_before_anything_is_written(
    tmp_path, images_dir, monkeypatch
):
    """A study made when the space had other batch sizes: Optuna cannot store a trial of the
    new choices beside the old ones, so the resumed run is refused in one line, store intact;
    a change Optuna can store (a wider float range) resumes."""
    monkeypatch.setattr(_training, "BATCH_SIZES", (128, 256, 512))
    tiny_study(tmp_path, images_dir, trials=1)
    monkeypatch.undo()
    db = tmp_path / "images.db"
    before = db.read_bytes()
    done = cli("run", "fashion-mlp", "--trials", "2", "--storage", f"sqlite:///{db}",
               "--data-dir", str(images_dir), "--device", "cpu", "--quiet")  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "'batch_size' had choices (128, 256, 512), the space now has choices (128, 256)" in (
        done.stderr
    )
    assert "another --study-name" in done.stderr and db.read_bytes() == before
    monkeypatch.setattr(_training, "BATCH_SIZES", (128, 256, 512))
    monkeypatch.setattr(_training, "LEARNING_RATES", {"sgd": (0.001, 1.0), "adamw": (1e-5, 0.1)})
    assert len(tiny_study(tmp_path, images_dir, trials=2).trials) == 2


@pytest.mark.parametrize("name", ["fashion-mlp", "fashion-cnn"])
def test_two_sampled_trials_of_each_space_complete(tmp_path, images_dir, name):
    study = tiny_study(tmp_path, images_dir, name, trials=2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        attrs = t.user_attrs
        assert attrs["parameters"] > 0 and attrs["device"] == "cpu"
        assert attrs["seconds_per_epoch"] > 0
        assert "peak_memory_bytes" in attrs  # None on the CPU: not measurable there
        assert (
            len(attrs["history"])
            == len(t.intermediate_values)
            == attrs["config"]["train"]["epochs"]
        )
        assert t.value == pytest.approx(attrs["history"][-1]["val_accuracy"], abs=1e-5)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    # a new study starts from the space's baseline, scheduled for the study's epochs as
    # every trial is (the epochs are the pruners' resource, not a searched parameter)
    space = fashion_mlp if name == "fashion-mlp" else fashion_cnn
    expected = space.baseline(study_settings(name, FAST))
    assert trials[0].user_attrs["baseline"] is True and trials[0].params == expected
    assert {t.user_attrs["config"]["train"]["epochs"] for t in trials} == {FAST["max_epochs"]}


def test_search_trains_on_the_split_and_validates_without_the_test_set(images_dir):
    space = fashion_mlp
    objective = ImageObjective(space, space.base_settings().replace(**FAST), "cpu", images_dir)
    assert len(objective.task.train_inputs) == 300
    assert objective.task.eval_inputs is objective.dataset.validation_images
    assert len(objective.task.eval_inputs) == 100


# ----------------------------------------------------------------------------------------------
# pruning, out of memory


GOOD = {
    "layers": 1,
    "width_0": 64,
    "dropout": 0.0,
    **_training.plain_training("adamw", 1e-2, 1e-4),
}
# few SGD steps per epoch at the smallest rate: stays near chance while the good ones learn
BAD = {**_training.plain_training("sgd", 0.02, 1e-5), "layers": 1, "width_0": 32,
       "dropout": 0.5, "batch_size": 256, "warmup_fraction": 0.3}  # fmt: skip


@pytest.mark.parametrize(("first_judged", "expected"), [(1, "PRUNED"), (4, "COMPLETE")])
def test_a_weak_trial_is_pruned_in_a_rigged_study(tmp_path, images_dir, first_judged, expected):
    """After 4 finished trials the median pruner stops a weak one; never at its last epoch
    (with `min_epochs` 4 of 4, its first judged epoch is its last: it completes)."""
    storage = f"sqlite:///{tmp_path / 'images.db'}"
    study = optuna.create_study(storage=storage, study_name="fashion-mlp", direction="maximize")
    for _ in range(4):  # the median pruner waits for 4 finished trials
        study.enqueue_trial(GOOD)
    study.enqueue_trial(BAD)
    settings = {"max_epochs": 4, "min_epochs": first_judged}
    study = tiny_study(tmp_path, images_dir, trials=5, settings=settings, pruner="median")
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE"] * 4 + [expected]
    weak = study.trials[4]
    if expected == "PRUNED":
        assert len(weak.intermediate_values) < 4  # stopped before its budget
        assert weak.user_attrs["history"]  # what it learned before it was stopped is kept
    else:
        # weaker than every other where the other case cut it (epoch 1), yet not cut after its
        # training was done
        first = min(t.intermediate_values[1] for t in study.trials[:4])
        assert weak.intermediate_values[1] < first and len(weak.intermediate_values) == 4


@pytest.mark.parametrize(("pruner", "pruned"), [("median", [0.80, 0.855]), ("quartile", [0.80])])
def test_the_quartile_pruner_stops_only_the_lowest_quarter(pruner, pruned):
    """Finished trials stood at 0.82, 0.86, 0.88 and 0.90 at epoch 3: the median pruner stops a
    trial at 0.855 there (median 0.87), the quartile pruner only one below their lowest quarter
    (0.85): 0.855 goes on."""
    settings = ImageSettings(min_epochs=3, max_epochs=9)
    study = optuna.create_study(direction="maximize", pruner=make_image_pruner(pruner, settings))
    for value in (0.82, 0.86, 0.88, 0.90):
        trial = study.ask()
        for epoch in range(1, 4):
            trial.report(value, epoch)
        study.tell(trial, value)
    stopped = []
    for value in (0.80, 0.855, 0.875, 0.95):
        trial = study.ask()
        for epoch in range(1, 4):
            trial.report(value, epoch)
            if trial.should_prune():
                assert epoch == settings.min_epochs  # not judged before its first rung
                stopped.append(value)
                break
    assert stopped == pruned


def test_out_of_memory_fails_one_trial_and_the_study_goes_on(tmp_path, images_dir, monkeypatch):
    real = trainer_module.make_optimizer
    calls = {"optimizers": 0}

    def make_optimizer(parameters, config):
        optimizer = real(parameters, config)
        calls["optimizers"] += 1
        if calls["optimizers"] == 2:  # the second trial runs out of memory in its first step

            def step(self, *args, **kwargs):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

            optimizer.step = types.MethodType(
                step, optimizer
            )  # a bound method, as schedulers expect
        return optimizer

    monkeypatch.setattr(trainer_module, "make_optimizer", make_optimizer)
    study = tiny_study(tmp_path, images_dir, trials=3)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    failed = study.trials[1]
    assert "out of memory" in failed.user_attrs["fail_reason"]
    assert best_feasible(study) is not None


# ----------------------------------------------------------------------------------------------
# MNIST, workers, CLI


def test_dataset_mnist_runs_the_space_on_mnist_under_its_own_name(tmp_path, images_dir):
    storage = f"sqlite:///{tmp_path / 'cli.db'}"
    done = cli(
        "run", "fashion-cnn", "--dataset", "mnist", "--trials", "1", "--storage", storage,
        "--data-dir", str(images_dir), "--validation-size", "100", "--min-epochs", "1",
        "--max-epochs", "1", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "mnist-cnn: best validation accuracy" in done.stdout
    study = optuna.load_study(study_name="mnist-cnn", storage=storage)
    assert stored_attrs(study)["settings"]["dataset"] == "mnist"
    assert study.user_attrs["space"] == "fashion-cnn"


def test_workers_share_one_sqlite_storage(tmp_path, images_dir):
    study = tiny_study(tmp_path, images_dir, trials=4, workers=2)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE"] * 4  # exactly the total, none failed
    assert len({t.user_attrs["config"]["architecture"]["hidden_layer_profile"][0] for t in
                study.trials}) > 1  # fmt: skip  # workers sample different points


def test_population_is_refused_for_image_studies(tmp_path, images_dir):
    with pytest.raises(ConfigError, match="population"):
        tiny_study(tmp_path, images_dir, population=4)


def test_image_settings_reject_boolean_fields():
    with pytest.raises(ConfigError, match="input_bits: unknown setting"):
        study_settings("fashion-mlp", {"input_bits": 4})


# ----------------------------------------------------------------------------------------------
# export and predict


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images_dir):
    tmp = tmp_path_factory.mktemp("export")
    settings = {**FAST, "min_epochs": 3, "max_epochs": 3}
    tiny_study(tmp, images_dir, trials=2, settings=settings)
    storage = f"sqlite:///{tmp / 'images.db'}"
    out = tmp / "results" / "runs" / "fashion-mlp"
    done = export_model("fashion-mlp", storage, out, "cpu", images_dir, log=lambda *_: None)
    return storage, out, done


def test_export_writes_weights_config_and_test_accuracy(exported, images_dir):
    _, out, done = exported
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["dataset"] == "fashion-mnist" and config["architecture"]["type"] == "mlp"
    assert metrics["test_images"] == 100
    assert metrics["test_accuracy"] == pytest.approx(done.test_accuracy)
    assert len(metrics["history"]) == 3
    # the saved weights reproduce the reported test accuracy (evaluated as the export did)
    model, config = load_exported(out)
    dataset = load_image_dataset("fashion-mnist", images_dir, validation_size=100)
    train = config["train"]
    _, accuracy = evaluate(model, dataset.final_task(), mixed_precision=train["mixed_precision"],
                           test_time_flip=train["test_time_flip"])  # fmt: skip
    assert accuracy == pytest.approx(metrics["test_accuracy"])
    assert accuracy > 0.5  # the fake classes are easy: a trained model is far above chance
    assert metrics["test_accuracy_seeds"] == [metrics["test_accuracy"]] and metrics["seeds"] == [0]
    assert metrics["baseline_validation_accuracy"] is not None
    assert metrics["best_is_baseline"] == (metrics["trial"] == 0)


def test_export_more_seeds_reads_back_the_ones_done_and_the_baseline_too(
    tmp_path, images_dir, monkeypatch
):
    """Seeds already exported for the same trial are not retrained; the saved model stays the
    first seed's; the baseline's export is recorded apart and the report compares both."""
    from study import export as export_module
    from study.report import write_report

    settings = {**FAST, "min_epochs": 2, "max_epochs": 2}
    tiny_study(tmp_path, images_dir, trials=2, settings=settings)
    storage = f"sqlite:///{tmp_path / 'images.db'}"
    out = tmp_path / "out"
    first = export_model("fashion-mlp", storage, out, "cpu", images_dir, log=lambda *_: None)
    weights = (out / "model.pt").read_bytes()
    trained = []
    real = export_module.retrain
    monkeypatch.setattr(export_module, "retrain", lambda c, d, seed, t: trained.append(seed)
                        or real(c, d, seed, t))  # fmt: skip
    more = export_model("fashion-mlp", storage, out, "cpu", images_dir, log=lambda *_: None,
                        seeds=3)  # fmt: skip
    assert trained == [1, 2]  # seed 0 was read back
    assert more.test_accuracy == first.test_accuracy and len(more.test_accuracy_seeds) == 3
    assert (out / "model.pt").read_bytes() == weights  # still the first seed's model
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1, 2]
    assert metrics["test_accuracy_mean"] == pytest.approx(more.test_accuracy_mean)
    assert len(metrics["history"]) == 2
    base = export_model("fashion-mlp", storage, out / "baseline", "cpu", images_dir,
                        log=lambda *_: None, seeds=2, baseline=True)  # fmt: skip
    assert base.trial == 0 and (out / "baseline" / "model.pt").is_file()
    # the store keeps the files of the exports on record only (3 each), none superseded
    kept = [p for p in (tmp_path / "images.db.artifacts").rglob("*") if p.is_file()]
    assert len(kept) == 6
    summary = (write_report("fashion-mlp", storage, tmp_path / "r") / "summary.md").read_text()
    assert "## What the search bought" in summary
    assert "test accuracy, mean over training seeds: best" in summary
    assert "3 seeds) against the baseline's" in summary and "(2 seeds)" in summary


def test_run_export_fits_the_time_budget_and_records_both_times(tmp_path, images_dir):
    """`study run --export`: the study leaves the export of its best trial the time it needs
    (measured seconds per epoch), records its run, and the export says both wall times."""
    from study import interrupt
    from study.runner import _reserve_export_time

    settings = {**FAST, "min_epochs": 2, "max_epochs": 2}
    typed = "study run fashion-mlp --export --timeout 3600"
    study = tiny_study(
        tmp_path,
        images_dir,
        trials=2,
        settings=settings,
        export=True,
        export_dir=str(tmp_path / "exported"),
        timeout=3600,
        command=typed,
    )
    runs = stored_attrs(study)["runs"]
    assert len(runs) == 1 and runs[0]["finished_after"] == 2 and runs[0]["timeout"] == 3600
    metrics = json.loads((tmp_path / "exported" / "metrics.json").read_text())
    assert metrics["command"] == typed  # what produced the export: the run's command line
    assert 0 < metrics["study_seconds"] <= runs[0]["seconds"] + 60
    assert metrics["export_seconds"] > 0  # retraining and the one test, timed
    # the reserve: the budget's end for trials moves back by the best trial's export time
    best = study.best_trial
    per_epoch = best.user_attrs["seconds_per_epoch"]
    threads = best.user_attrs["threads"]
    with interrupt.watching(deadline=10_000.0):
        _reserve_export_time(10_000.0, 1.5, threads)(study)  # 300 training images, 200 in a trial
        moved = interrupt._state.deadline
        # an export on more threads than the trial had trains faster: a shorter reserve
        _reserve_export_time(10_000.0, 1.5, threads + 1)(study)
        moved_more_threads = interrupt._state.deadline
    expected = per_epoch * 2 * 1.5 * 1.1
    assert moved == pytest.approx(10_000.0 - expected)
    assert moved_more_threads == pytest.approx(10_000.0 - expected / 1.5)


def test_predict_by_index_and_from_a_png_round_trip(exported, images_dir, tmp_path):
    from PIL import Image

    _, out, _ = exported
    rows = predict(out, indices=[0, 1, 2], data_dir=images_dir)
    test_images, test_labels = make_images(100, seed=1)  # what write_fake_dataset wrote
    names = load_exported(out)[1]["class_names"]
    assert [r["actual"] for r in rows] == [names[int(c)] for c in test_labels[:3]]
    # a PNG of test image 0, saved as a user would (dark object on a light background)
    path = tmp_path / "image.png"
    Image.fromarray((255 - test_images[0]).numpy(), mode="L").save(path)
    assert torch.equal(read_image_file(path, (28, 28)), test_images[0])
    from_file = predict(out, files=[path])[0]
    assert from_file["predicted"] == rows[0]["predicted"]
    assert from_file["probability"] == pytest.approx(rows[0]["probability"], abs=1e-5)


def test_predict_reads_a_thin_strip_without_padding_it_to_a_huge_square(exported, tmp_path):
    """A 4,000,000 x 1 picture (within the pixel limit) is scaled down before it is padded."""
    from PIL import Image

    _, out, _ = exported
    strip = tmp_path / "strip.png"
    Image.new("L", (4_000_000, 1), 200).save(strip)
    assert read_image_file(strip, (28, 28)).shape == (28, 28)
    (row,) = predict(out, files=[strip])
    assert row["source"] == str(strip) and 0 < row["probability"] <= 1


@pytest.mark.slow
def test_predict_reads_the_export_from_the_stores_artifacts(exported, images_dir, tmp_path):
    storage, out, _ = exported
    study = optuna.load_study(study_name="fashion-mlp", storage=storage)
    record = stored_attrs(study)["export"]
    assert set(record["artifacts"]) == {"model.pt", "config.json", "metrics.json"}
    from optuna.artifacts import get_all_artifact_meta

    attached = {m.artifact_id for m in get_all_artifact_meta(study)}
    assert set(record["artifacts"].values()) <= attached  # the dashboard lists them
    assert record["trial"] == best_feasible(study).number
    done = cli("predict", "fashion-mlp", "--storage", storage, "--index", "0", "5",
               "--data-dir", str(images_dir), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    from_files = cli("predict", "fashion-mlp", "--dir", str(out), "--index", "0", "5",
                     "--data-dir", str(images_dir))  # fmt: skip
    assert done.stdout == from_files.stdout and done.stdout.count('Predicted: "') == 2


@pytest.mark.slow
def test_cli_export_and_predict(exported, images_dir, tmp_path):
    storage, _, _ = exported
    out = tmp_path / "cli-export"
    done = cli("export", "fashion-mlp", "--storage", storage, "--out", str(out),
               "--data-dir", str(images_dir), "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and (out / "model.pt").is_file()
    done = cli("predict", "fashion-mlp", "--dir", str(out), "--index", "0", "5",
               "--data-dir", str(images_dir))  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith('Predicted: "') for line in lines)
    assert ', Actual: "' in lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["export", "nope"], "study 'nope' not found"),
        (["export", "tiny-bool"], "not an image study"),
        (["predict", "nope", "--index", "0"], "study 'nope' not found"),
        (["predict", "fashion-mlp", "--dir", "no-such-dir", "--index", "0"], "no exported model"),
        (["predict", "fashion-mlp", "--index", "100"], "test images are numbered 0..99"),
        (["predict", "fashion-mlp", "--image", "missing.png"], "no such image file"),
        (["predict", "fashion-mlp", "--image", "config.json"], "not a readable PNG/JPEG"),
        (["predict", "fashion-mlp"], "give test image indices and/or image files"),
    ],
)
def test_export_and_predict_bad_input_is_one_clear_line(exported, images_dir, args, expected):
    storage, out, _ = exported
    run_dir = out.parent.parent.parent
    optuna.create_study(storage=storage, study_name="tiny-bool", load_if_exists=True)
    optuna.load_study(study_name="tiny-bool", storage=storage).set_user_attr(
        "kind", "boolean-shallow"
    )
    if args[0] == "export":
        args = [*args, "--storage", storage]
    else:  # predict: the export stored with the study, in its store's artifacts
        args = [*args, "--storage", storage, "--data-dir", str(images_dir)]
    if "--image" in args and "config.json" in args:
        args[args.index("config.json")] = str(out / "config.json")
    before = (out / "model.pt").read_bytes()
    done = cli(*args, cwd=run_dir)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    assert (out / "model.pt").read_bytes() == before


@pytest.mark.skipif(not dev.cuda_available(), reason="needs CUDA")
def test_cnn_trial_on_cuda_uses_channels_last_and_bf16(tmp_path, images_dir):
    study = run_study(
        "fashion-cnn",
        trials=1,
        storage=f"sqlite:///{tmp_path / 'cuda.db'}",
        device="cuda",
        settings=FAST,
        quiet=True,
        data_dir=str(images_dir),
    )
    trial = study.trials[0]
    assert trial.state.name == "COMPLETE"
    assert trial.user_attrs["device"].startswith("cuda")
    assert trial.user_attrs["peak_memory_bytes"] > 0


def test_a_trial_that_does_not_fit_in_memory_fails_with_one_line(tmp_path, images_dir,
                                                                  monkeypatch):  # fmt: skip
    """The CPU allocator's dozens of lines become the trial's one-line reason; the study goes
    on with the next trial. Any other error keeps its traceback."""
    import study.image_objective as objective_module

    calls = []

    def too_big(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 81920000000000 bytes.\n" + "frame\n" * 50
            )
        return train(*args, **kwargs)

    monkeypatch.setattr(objective_module, "train", too_big)
    study = tiny_study(tmp_path, images_dir, trials=2)  # a failed trial does not count
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"], states
    reason = study.trials[0].user_attrs["fail_reason"]
    assert reason.startswith("does not fit in memory: [enforce fail") and "\n" not in reason

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(objective_module, "train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        tiny_study(tmp_path, images_dir, trials=3)
