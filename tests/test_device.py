import contextlib

import pytest
import torch

from study import device as dev
from study.errors import ConfigError


def test_auto_picks_an_available_device():
    device = dev.resolve_device("auto")
    if dev.cuda_available():
        assert device.type == "cuda"
    elif dev.mps_available():
        assert device.type == "mps"
    else:
        assert device == torch.device("cpu")


def test_cpu_is_always_there_and_autocast_follows_native_bf16():
    cpu = dev.resolve_device("CPU")
    assert cpu.type == "cpu"
    assert isinstance(dev.autocast(cpu, enabled=False), contextlib.nullcontext)
    native = dev.bf16_native("cpu")  # AVX512-BF16 or AMX: this project's CPU has it
    assert isinstance(dev.autocast(cpu, enabled=True), contextlib.nullcontext) != native
    assert dev.peak_memory_bytes(cpu) is None
    assert dev.describe(cpu) == "cpu"


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown device"):
        dev.resolve_device("tpu-ish")


@pytest.mark.skipif(dev.cuda_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        dev.resolve_device("cuda")


def test_seeded_block_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with dev.seeded(7):
        a = torch.rand(3)
    with dev.seeded(7):
        b = torch.rand(3)
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.cuda
def test_cuda_autocast_and_memory():
    if not dev.cuda_available():
        pytest.skip("no CUDA device")
    cuda = dev.resolve_device("cuda")
    with dev.autocast(cuda, enabled=True):
        y = torch.ones(4, 4, device=cuda) @ torch.ones(4, 4, device=cuda)
    assert y.dtype == torch.bfloat16
    assert dev.peak_memory_bytes(cuda) > 0
