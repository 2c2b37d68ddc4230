import io
import itertools
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


# ----------------------------------------------------------------------------------------------
# what wins at small compute: augmentation, schedules, smoothing, averaging, test-time flip


def test_augmentation_acts_on_whole_batches_seeded_and_keeps_pixels():
    from study.augment import batch_crop, batch_erase, batch_flip

    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 255, (64, 8, 8), dtype=torch.uint8, generator=g)
    flipped = batch_flip(images, torch.Generator().manual_seed(1))
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    shifted = batch_crop(images, 2, torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    # each image is its own shift: its nonzero pixels are a shifted window of the original
    for original, moved in zip(images, shifted, strict=True):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(torch.roll(original, (dy, dx), (0, 1))[2:-2, 2:-2],
                                moved[2:-2, 2:-2])]  # fmt: skip
        assert found
    erased = batch_erase(images, 1.0, torch.Generator().manual_seed(1))
    black = (erased == 0).flatten(1).sum(1)
    assert bool((black >= 1).all()) and bool((black <= 0.25 * 64 + 8).all())
    assert torch.equal(batch_erase(images, 0.0, torch.Generator().manual_seed(1)), images)
    again = batch_crop(images, 2, torch.Generator().manual_seed(1))
    assert torch.equal(again, shifted)  # seeded: the same draws, the same batch


def test_schedules_warm_up_then_decay_to_zero():
    from study.trainer import _scheduler

    def rates(**config):
        param = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([param], lr=1.0)
        scheduler = _scheduler(optimizer, TrainConfig(learning_rate=1.0, epochs=10, **config), 10)
        seen = []
        for _ in range(100):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    cosine = rates(lr_schedule="cosine")
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[-1] < 1e-3
    warm = rates(lr_schedule="onecycle", warmup_fraction=0.2)
    assert warm[0] == pytest.approx(0.05) and warm[19] == pytest.approx(1.0)
    assert warm[20] == pytest.approx(1.0) and warm[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(warm[19:]))
    assert rates(warmup_fraction=0.1)[50] == 1.0  # constant after its warm-up


def test_every_extra_trains_an_image_model(tiny_images):
    """Nesterov, one-cycle with warm-up, label smoothing, crop, erasing and a weight average,
    together: it learns, the average is what is kept and evaluated. (The tiny images tell
    classes by where a block sits, left or right: flips would make them ambiguous.)"""
    from study.trainer import evaluate

    with dev.seeded(0):
        net = ConvNet(ConvNetSpec(blocks=(ConvBlock(8), ConvBlock(8, residual=True)),
                                  head_width=0, global_pool=True, dropout=0.1))  # fmt: skip
    cfg = TrainConfig(optimizer="sgd", nesterov=True, learning_rate=0.1, batch_size=32,
                      epochs=8, lr_schedule="onecycle", warmup_fraction=0.2,
                      label_smoothing=0.1, crop_padding=1, erase_probability=0.2,
                      ema_decay=0.9)  # fmt: skip
    task = tiny_images.search_task()
    result = train(net, task, cfg)
    assert result.best_eval_accuracy > 0.5
    # the model kept holds the average, whose accuracy the last epoch reported
    _, accuracy = evaluate(net, task, mixed_precision=True)
    assert accuracy == pytest.approx(result.final.eval_accuracy)


def test_test_time_flip_averages_an_image_and_its_mirror():
    from study.trainer import evaluate

    class LeftHalf(nn.Module):  # class 0: the left half is brighter; a mirror says the other
        def forward(self, x):
            side = x[..., :14].mean(dim=(1, 2, 3)) - x[..., 14:].mean(dim=(1, 2, 3))
            return torch.stack([side, -side], dim=1)

    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[:2, :, :14] = 200  # classes 0: bright on the left; 1: bright on the right
    images[2:, :, 14:] = 200
    labels = torch.tensor([0, 0, 1, 1])
    task = Task("t", "multiclass", images, labels, images, labels, 0.0, 1.0)
    assert evaluate(LeftHalf(), task)[1] == 1.0
    _, flipped = evaluate(LeftHalf(), task, test_time_flip=True)
    assert flipped == 0.5  # both views weigh equally: no image is told apart any more


def test_bf16_runs_where_the_cpu_has_it():
    """Autocast is on for image tasks where bf16 is native (this project's CPU has AVX512-BF16)
    and a no-op elsewhere; Boolean nets never use it."""
    on = dev.autocast(torch.device("cpu"), True)
    if dev.bf16_native("cpu"):
        with on:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.is_autocast_enabled("cpu")
    else:
        assert isinstance(on, type(dev.autocast(torch.device("cpu"), False)))
    with dev.autocast(torch.device("cpu"), False):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    ("field", "value"),
    [("nesterov", True), ("warmup_fraction", 1.0), ("label_smoothing", -0.1),
     ("crop_padding", 9), ("erase_probability", 1.5), ("ema_decay", 1.0), ("flip", 1)],
)  # fmt: skip
def test_the_extras_are_checked(field, value):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        TrainConfig(**{field: value})  # nesterov: only with sgd


@pytest.mark.cuda
def test_augmentation_and_extras_run_on_cuda(tiny_images):
    """The same batched augmentation on the device the images live on (its own seeded
    generator there), bf16 autocast, a weight average and test-time flip, on CUDA."""
    if not dev.cuda_available():
        pytest.skip("no CUDA device")
    from study.augment import augment

    device = dev.resolve_device("cuda")
    images = torch.randint(0, 255, (32, 28, 28), dtype=torch.uint8, device=device)
    config = TrainConfig(crop_padding=2, flip=True, erase_probability=0.5)
    out = augment(images, config, dev.generator_for(device, 0))
    assert out.device == images.device and out.shape == images.shape
    with dev.seeded(0):
        net = ConvNet(ConvNetSpec(blocks=(ConvBlock(8), ConvBlock(8, residual=True))))
    task = tiny_images.search_task()
    task = Task(task.name, task.kind, task.train_inputs.to(device), task.train_targets.to(device),
                task.eval_inputs.to(device), task.eval_targets.to(device), task.pixel_mean,
                task.pixel_std)  # fmt: skip
    cfg = TrainConfig(optimizer="sgd", nesterov=True, learning_rate=0.05, batch_size=32,
                      epochs=2, ema_decay=0.9, test_time_flip=True, crop_padding=1)  # fmt: skip
    result = train(net, task, cfg)
    assert result.device.startswith("cuda") and result.epochs_run == 2


class _StopAfter(Exception):
    pass


def _extras_net():
    with dev.seeded(0):
        return ConvNet(ConvNetSpec(blocks=(ConvBlock(8), ConvBlock(8, residual=True)),
                                   head_width=16, dropout=0.2))  # fmt: skip


@pytest.mark.parametrize("schedule", ["onecycle", "constant"])
def test_a_resumed_run_goes_on_exactly_as_the_run_that_was_not_stopped(tiny_images, schedule):
    """Stopped after epoch 2 (its checkpoint saved and read back as a file, weights only), then
    resumed in a new model: the same weights, history and decisions as 4 epochs in one go, with
    every part of the state in play (Nesterov momentum, a schedule with warm-up, a weight
    average, augmentation, dropout)."""
    cfg = TrainConfig(optimizer="sgd", nesterov=True, learning_rate=0.05, batch_size=64,
                      epochs=4, lr_schedule=schedule, warmup_fraction=0.2, crop_padding=1,
                      flip=True, erase_probability=0.3, ema_decay=0.9, seed=3)  # fmt: skip
    task = tiny_images.search_task()
    straight = _extras_net()
    whole = train(straight, task, cfg)

    saved = {}

    def stop_at_two(metrics):
        if metrics.epoch == 2:
            raise _StopAfter

    def keep(error, snapshot):
        saved["state"] = snapshot()

    with pytest.raises(_StopAfter):
        train(_extras_net(), task, cfg, stop_at_two, on_stop=keep)
    buffer = io.BytesIO()
    torch.save(saved["state"], buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    resumed_net = _extras_net()
    seen = []
    resumed = train(resumed_net, task, cfg, lambda m: seen.append(m.epoch), resume=state)
    assert seen == [3, 4]  # the callback sees the epochs it trains
    assert [m.epoch for m in resumed.history] == [1, 2, 3, 4]
    strip = ("seconds",)
    rows = [{k: v for k, v in vars(m).items() if k not in strip} for m in resumed.history]
    assert rows == [{k: v for k, v in vars(m).items() if k not in strip} for m in whole.history]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed_net.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    assert resumed.history[1].seconds == pytest.approx(state["seconds"])


def test_no_checkpoint_without_a_stop_callback_and_other_errors_pass_through(tiny_images):
    cfg = TrainConfig(optimizer="adamw", learning_rate=1e-3, batch_size=64, epochs=2)
    calls = []

    def boom(metrics):
        raise _StopAfter

    with pytest.raises(_StopAfter):
        train(_extras_net(), tiny_images.search_task(), cfg, boom,
              on_stop=lambda error, snapshot: calls.append(type(error)))  # fmt: skip
    assert calls == [_StopAfter]  # told once, with the error; the snapshot only if asked


def test_fp32_precision_turns_bf16_autocast_off(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(dev.PRECISION_ENV, "fp32")
    assert not dev.bf16_used(cpu) and dev.precision_name(cpu) == "fp32"
    with dev.autocast(cpu, True):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(dev.PRECISION_ENV, "auto")
    assert dev.precision_name(cpu) == ("bf16" if dev.bf16_native("cpu") else "fp32")
    with pytest.raises(ConfigError, match=r"^precision:"):
        dev.set_precision("fp16")


def test_the_weight_average_spans_a_share_of_the_run_whatever_its_length(tiny_images):
    """ema_horizon h over E epochs of S steps trains exactly as ema_decay 1 - 1/(h E S)."""
    task = tiny_images.search_task()  # 300 images: 5 steps of 64 an epoch
    base = TrainConfig(optimizer="adamw", learning_rate=2e-3, batch_size=64, epochs=3, seed=1)
    by_share = train(_extras_net(), task, base.replace(ema_horizon=0.2))
    by_decay = train(_extras_net(), task, base.replace(ema_decay=1 - 1 / (0.2 * 3 * 5)))
    assert [m.eval_loss for m in by_share.history] == [m.eval_loss for m in by_decay.history]
    plain = train(_extras_net(), task, base)
    assert [m.eval_loss for m in plain.history] != [m.eval_loss for m in by_share.history]
    with pytest.raises(ConfigError, match=r"^ema_horizon: give ema_decay or ema_horizon"):
        base.replace(ema_decay=0.9, ema_horizon=0.1)
