import math

import pytest
import torch
from torch import nn

from study import device as dev
from study.data import Task, boolean_function, load_image_dataset
from study.errors import ConfigError
from study.models import ConvBlock, ConvNet, ConvNetSpec, DeepNeuralNet
from study.trainer import OPTIMIZERS, TrainConfig, train

from .conftest import write_fake_dataset


def boolean_run(seed=0, epochs=2000, target=1e-3, **config):
    fn = boolean_function(3, function_seed=5)
    with dev.seeded(seed):
        net = DeepNeuralNet(3, [16], 3)
    cfg = TrainConfig(
        optimizer="adam",
        learning_rate=5e-2,
        batch_size=8,
        epochs=epochs,
        seed=seed,
        target_loss=target,
        **config,
    )
    return train(net, fn.task(), cfg)


def test_learns_a_tiny_boolean_function_and_stops_at_the_target():
    result = boolean_run()
    assert result.reached_target
    assert result.final.eval_loss <= 1e-3
    assert result.final.eval_accuracy == 1.0
    assert result.epochs_run < 2000  # stopped early
    assert result.best_eval_loss == result.final.eval_loss
    assert result.parameters == (3 + 1) * 16 + (16 + 1) * 3
    assert result.device == "cpu"
    assert [m.epoch for m in result.history] == list(range(1, result.epochs_run + 1))


def test_records_the_tutorial_running_loss_and_the_full_table_loss():
    result = boolean_run(epochs=5, target=None)
    first = result.history[0]
    assert first.train_loss > 0 and first.eval_loss > 0
    assert first.train_accuracy is None  # images only
    assert not result.reached_target and result.epochs_run == 5


def test_same_seed_same_result_on_cpu():
    a, b = boolean_run(seed=3, epochs=20, target=None), boolean_run(seed=3, epochs=20, target=None)
    assert [m.eval_loss for m in a.history] == [m.eval_loss for m in b.history]
    assert [m.train_loss for m in a.history] == [m.train_loss for m in b.history]
    c = boolean_run(seed=4, epochs=20, target=None)
    assert [m.eval_loss for m in a.history] != [m.eval_loss for m in c.history]


def test_callback_sees_every_epoch_and_can_stop_the_run():
    seen = []

    def on_epoch(metrics):
        seen.append(metrics.epoch)
        return metrics.epoch == 4

    fn = boolean_function(3, 0)
    result = train(DeepNeuralNet(3, [8], 3), fn.task(), TrainConfig(epochs=50), on_epoch)
    assert seen == [1, 2, 3, 4]
    assert result.stopped_by_callback and result.epochs_run == 4


def test_callback_exception_propagates():
    class Stop(Exception):
        pass

    def on_epoch(metrics):
        raise Stop

    fn = boolean_function(3, 0)
    with pytest.raises(Stop):
        train(DeepNeuralNet(3, [8], 3), fn.task(), TrainConfig(epochs=5), on_epoch)


def test_nan_loss_stops_with_a_distinguishable_reason():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x) * float("nan")

    fn = boolean_function(3, 0)
    result = train(Broken(), fn.task(), TrainConfig(epochs=3))
    assert result.divergence.epoch == 1 and math.isnan(result.divergence.value)
    assert result.epochs_run == 0 and not result.reached_target  # nothing non-finite is kept


@pytest.fixture
def tiny_images(tmp_path):
    source = write_fake_dataset(tmp_path / "files", train=400, test=100)
    return load_image_dataset("fashion-mnist", source, validation_size=100)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_learns_a_tiny_image_subset(tiny_images, optimizer):
    lr = {"sgd": 0.05, "adam": 2e-3, "adamw": 2e-3, "rmsprop": 1e-3}[optimizer]
    with dev.seeded(0):
        net = DeepNeuralNet(28 * 28, [64], 10)
    cfg = TrainConfig(optimizer=optimizer, learning_rate=lr, batch_size=32, epochs=6)
    result = train(net, tiny_images.search_task(), cfg)
    assert result.best_eval_accuracy > 0.5  # chance is 0.1
    assert result.final.train_accuracy is not None and result.final.train_accuracy > 0.3


def test_convnet_trains_with_cosine_schedule(tiny_images):
    with dev.seeded(0):
        net = ConvNet(ConvNetSpec(blocks=(ConvBlock(8), ConvBlock(8)), head_width=32))
    cfg = TrainConfig(
        optimizer="adamw",
        learning_rate=3e-3,
        batch_size=32,
        epochs=3,
        lr_schedule="cosine",
        weight_decay=1e-4,
    )
    result = train(net, tiny_images.search_task(), cfg)
    assert result.best_eval_accuracy > 0.5
    assert result.final.learning_rate < 1e-6  # decayed to ~0 at the end of the budget


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optimizer", "lbfgs"),
        ("learning_rate", 0.0),
        ("batch_size", 0),
        ("epochs", 2.5),
        ("lr_schedule", "exp"),
        ("target_loss", -1.0),
        ("momentum", 1.0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        TrainConfig(**{field: value})


def test_unknown_config_key_is_an_error():
    with pytest.raises(ConfigError, match=r"^learnin_rate: unknown"):
        TrainConfig.from_dict({"learnin_rate": 0.1})
    assert TrainConfig.from_dict({"epochs": 3}).replace(batch_size=7).batch_size == 7


def test_task_rejects_mismatched_lengths():
    x = torch.zeros(4, 3)
    with pytest.raises(Exception, match="differ in length"):
        Task("t", "binary", x, torch.zeros(3, 3), x, torch.zeros(4, 3))


@pytest.mark.parametrize("device_name", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_same_function_and_learning_on_each_device(device_name):
    if device_name == "cuda" and not dev.cuda_available():
        pytest.skip("no CUDA device")
    device = dev.resolve_device(device_name)
    fn = boolean_function(3, 5, device=device)
    assert torch.equal(fn.targets.cpu(), boolean_function(3, 5).targets)
    with dev.seeded(0):
        net = DeepNeuralNet(3, [16], 3)
    cfg = TrainConfig(learning_rate=5e-2, batch_size=8, epochs=2000, target_loss=1e-3)
    result = train(net, fn.task(), cfg)
    assert result.reached_target
    assert result.device.startswith(device.type)
