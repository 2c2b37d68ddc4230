import gzip

import pytest
import torch

from study.data import (
    IDX_FILES,
    boolean_function,
    load_image_dataset,
    prepare_raw_files,
)
from study.errors import DataError

from .conftest import write_fake_dataset, write_idx


def test_boolean_function_is_the_full_truth_table_in_tutorial_order():
    fn = boolean_function(8, function_seed=0)
    assert fn.inputs.shape == (256, 8) and fn.targets.shape == (256, 8)
    expected = torch.tensor([[(i >> k) & 1 for k in range(8)] for i in range(256)]).float()
    assert torch.equal(fn.inputs, expected)
    assert set(fn.targets.unique().tolist()) == {0.0, 1.0}


def test_boolean_function_is_determined_by_its_seed():
    a, b, c = boolean_function(8, 7), boolean_function(8, 7), boolean_function(8, 8)
    assert torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)
    # uniform random bits: about half ones
    assert 0.4 < a.targets.mean().item() < 0.6


def test_boolean_function_task_evaluates_on_the_whole_table():
    fn = boolean_function(3, 1, output_bits=2)
    task = fn.task()
    assert task.kind == "binary"
    assert task.train_inputs.shape == (8, 3) and task.eval_targets.shape == (8, 2)
    assert task.eval_inputs is task.train_inputs


def test_boolean_function_rejects_bad_sizes():
    with pytest.raises(DataError, match="input_bits"):
        boolean_function(0)


@pytest.mark.parametrize("gz", [False, True])
def test_loads_idx_files_written_by_the_test(tmp_path, gz):
    source = write_fake_dataset(tmp_path / "files", train=300, test=100, gz=gz)
    ds = load_image_dataset("mnist", source, validation_size=50, split_seed=3)
    assert ds.train_images.dtype == torch.uint8
    assert ds.train_images.shape == (250, 28, 28)
    assert ds.validation_images.shape == (50, 28, 28)
    assert ds.test_images.shape == (100, 28, 28)
    assert ds.train_labels.dtype == torch.int64
    # unpacked where torchvision's reader expects the raw files
    for name in IDX_FILES:
        assert (source / "MNIST" / "raw" / name).is_file()
    # the split is seeded, disjoint and covers the training set
    again = load_image_dataset("mnist", source, validation_size=50, split_seed=3)
    assert torch.equal(ds.validation_images, again.validation_images)
    other = load_image_dataset("mnist", source, validation_size=50, split_seed=4)
    assert not torch.equal(ds.validation_labels, other.validation_labels)
    full = torch.cat([ds.train_images, ds.validation_images]).flatten(1)
    assert full.unique(dim=0).shape[0] == 300


def test_final_task_trains_on_all_training_images_and_tests_on_the_test_set(tmp_path):
    source = write_fake_dataset(tmp_path / "files", train=200, test=60)
    ds = load_image_dataset("fashion-mnist", source, validation_size=40)
    final = ds.final_task()
    assert final.train_size == 200 and len(final.eval_inputs) == 60
    search = ds.search_task()
    assert search.train_size == 160 and len(search.eval_inputs) == 40
    assert ds.class_names[0] == "T-shirt/top"


def test_batches_are_normalised_on_the_device(tmp_path):
    source = write_fake_dataset(tmp_path / "files", train=200, test=60)
    task = load_image_dataset("mnist", source, validation_size=40).search_task()
    x = task.prepare(task.train_inputs)
    assert x.dtype == torch.float32 and x.shape == (160, 1, 28, 28)
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1) < 1e-2


def test_missing_files_give_one_clear_error(tmp_path):
    with pytest.raises(DataError) as info:
        prepare_raw_files("mnist", tmp_path / "empty", download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "--data-dir" in message
    assert "\n" not in message


def test_missing_fashion_mnist_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr("study.data.SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "none",)})
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare_raw_files("fashion-mnist", tmp_path / "empty", download=False)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    source = write_fake_dataset(tmp_path / "files", train=100, test=50)
    images = source / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1000])
    with pytest.raises(DataError, match="truncated or corrupted") as info:
        load_image_dataset("mnist", source, validation_size=10)
    assert "train-images-idx3-ubyte" in str(info.value)


def test_corrupted_gzip_is_a_clear_error(tmp_path):
    source = write_fake_dataset(tmp_path / "files", train=100, test=50, gz=True)
    packed = source / "t10k-labels-idx1-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:20])
    with pytest.raises(DataError, match="cannot be read"):
        prepare_raw_files("mnist", source)
    assert not (source / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()


def test_bad_magic_number_is_a_clear_error(tmp_path):
    source = write_fake_dataset(tmp_path / "files", train=100, test=50)
    (source / "t10k-labels-idx1-ubyte").write_bytes(b"\x12\x34" * 40)
    with pytest.raises(DataError, match="magic"):
        load_image_dataset("mnist", source, validation_size=10)


def test_write_idx_round_trip(tmp_path):
    array = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x.gz", array)
    raw = gzip.decompress(path.read_bytes())
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert torch.equal(torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8), array.flatten())


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        prepare_raw_files("cifar", tmp_path)


@pytest.mark.slow
def test_processes_preparing_one_directory_at_once_all_succeed(tmp_path):
    """Workers or side-by-side studies may unpack the same files at the same moment."""
    import subprocess
    import sys

    source = write_fake_dataset(tmp_path / "fashion", train=3000, test=500, gz=True)
    code = (
        "import sys; from study.data import prepare_raw_files; "
        "prepare_raw_files('fashion-mnist', sys.argv[1])"
    )
    command = [sys.executable, "-c", code, str(source)]
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    assert not list(source.rglob("*.partial"))
    root = prepare_raw_files("fashion-mnist", source)  # all there: nothing left to unpack
    unpacked = root / "FashionMNIST" / "raw" / IDX_FILES[0]
    assert unpacked.stat().st_size == 16 + 3000 * 28 * 28
