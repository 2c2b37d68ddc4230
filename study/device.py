"""The one place that knows about device kinds: choosing a device, autocast, syncs, memory.

Everything else asks this module; no other module names a device kind or calls `.cuda()`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections.abc import Iterator

import torch

from study.errors import ConfigError

_CUDA = "cuda"
_MPS = "mps"
_CPU = "cpu"


def cuda_available() -> bool:
    """True when at least one CUDA device is visible to this process."""
    return torch.cuda.is_available()


def mps_available() -> bool:
    """True on Apple silicon with a working MPS backend."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda", "cuda:N" or "mps" into a usable `torch.device`.

    "auto" picks CUDA, then MPS, then the CPU. Asking for a device that is not there is a
    user error (one clear line), not a crash deep inside the first matrix product.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        if cuda_available():
            return torch.device(_CUDA, torch.cuda.current_device())
        if mps_available():
            return torch.device(_MPS)
        return torch.device(_CPU)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == _CUDA:
        if not cuda_available():
            raise ConfigError(f"device: {name!r} requested but no CUDA device is visible")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {name!r} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible"
            )
        return torch.device(_CUDA, index)
    if device.type == _MPS and not mps_available():
        raise ConfigError(f"device: {name!r} requested but MPS is not available")
    if device.type not in (_CPU, _CUDA, _MPS):
        raise ConfigError(f"device: unsupported device type {device.type!r}")
    return device


@functools.cache
def bf16_native(device_type: str) -> bool:
    """Whether bf16 arithmetic is native here (faster than fp32, not emulated): CUDA GPUs that
    support it; CPUs with AVX512-BF16 or AMX (oneDNN's bf16 kernels)."""
    if device_type == _CUDA:
        return torch.cuda.is_bf16_supported()
    if device_type == _CPU:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


PRECISION_ENV = "STUDY_PRECISION"
"""The process's precision, in the environment so that worker processes inherit it."""


def set_precision(name: str) -> None:
    """Use `name` ("auto" or "fp32", `config.PRECISIONS`, checked by `RunOptions`) in this
    process and the processes it starts."""
    if name not in ("auto", "fp32"):
        raise ConfigError(f"precision: must be auto or fp32, got {name!r}")
    os.environ[PRECISION_ENV] = name


def bf16_used(device: torch.device, enabled: bool = True) -> bool:
    """Whether image models train in bf16 autocast here: asked for, native to the device, and
    the precision is not forced to fp32."""
    return (
        enabled
        and os.environ.get(PRECISION_ENV, "auto") != "fp32"
        and device.type in (_CUDA, _CPU)
        and bf16_native(device.type)
    )


def precision_name(device: torch.device, enabled: bool = True) -> str:
    """ "bf16" or "fp32": what an image model trains in here (stored with every trial)."""
    return "bf16" if bf16_used(device, enabled) else "fp32"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when enabled and bf16 is native to the device (CUDA, or a CPU with
    AVX512-BF16/AMX: 2.4x the fp32 speed of the reference CNN on the project's CPU, `study bench
    cnn`) and the precision is not forced to fp32; a no-op context everywhere else (one code
    path)."""
    if bf16_used(device, enabled):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (host sync); needed before reading a wall clock on CUDA."""
    if device.type == _CUDA:
        torch.cuda.synchronize(device)
    elif device.type == _MPS:
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory measurement (CUDA only; elsewhere nothing to reset)."""
    if device.type == _CUDA:
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since the last reset, or None where not measurable."""
    if device.type == _CUDA:
        return int(torch.cuda.max_memory_allocated(device))
    return None


def release_memory(device: torch.device) -> None:
    """Return cached device memory after a failed run (e.g. out of memory) so the next fits."""
    gc.collect()
    if device.type == _CUDA:
        torch.cuda.empty_cache()


def limit_threads_for_tiny_models(device: torch.device) -> None:
    """One intra-op thread on the CPU: nets of a few thousand parameters only pay threading
    overhead for more, and it leaves the other cores to other workers."""
    if device.type == _CPU:
        torch.set_num_threads(1)


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes this process can still use on `device`, and what bounds them: the GPU's free
    memory; on the CPU the least of the system's available memory (/proc/meminfo) and what
    the address-space limit (`ulimit -v`) leaves."""
    if device.type == _CUDA:
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {describe(device)}"
    import resource

    found = [(2**63, "no known limit")]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "the machine's available memory"))
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = 0
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmSize:"):
                        used = int(line.split()[1]) * 1024
        except OSError:
            pass
        found.append((max(0, soft - used), f"the address-space limit (ulimit -v {soft // 1024})"))
    return min(found)


def describe(device: torch.device) -> str:
    """A short human-readable name, stored with every trial ("cpu", "cuda:0 (NVIDIA H200)")."""
    if device.type == _CUDA:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{_CUDA}:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


def generator_for(device: torch.device, seed: int) -> torch.Generator:
    """A seeded random generator living where the tensors it permutes live."""
    generator = torch.Generator(device=device if device.type == _CUDA else _CPU)
    generator.manual_seed(seed)
    return generator


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (e.g. model initialisation) under a fixed seed without touching global RNG."""
    devices = list(range(torch.cuda.device_count())) if cuda_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "out of memory", "not enough memory")
"""How PyTorch's allocators say that a tensor did not fit (the CPU one raises a plain
RuntimeError)."""


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` says that memory ran out (host or device), not a bug."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        text in str(error).lower() for text in OUT_OF_MEMORY_TEXTS
    )
