"""The population trainer's CPU kernel (`population_kernel.c`), built once per machine.

Built with the machine's C compiler (`cc`, or $CC) into a shared library that ctypes loads;
cached under `cache_dir()` by the source, the compiler flags and this CPU's features, so that a
copy built for another CPU is never loaded. Where it cannot be built (no compiler), `load()`
returns None once with one notice line, and the population trainer uses its torch engine:
slower, the same results up to float rounding.

The boundary is one table, `ARGUMENTS`: every argument of `population_epoch` with its C type,
its dtype and its shape. The ctypes signature is made from it, and so is the check that
`Kernel.bind` runs on the buffers before the first call (dtype, device, shape, contiguity and
the bounds the kernel relies on: layer widths, parameter offsets, batch sizes). A bound call
reuses those buffers every epoch; it checks that none was replaced and that the thread count
is sane, and nothing else, so that the check costs the training nothing measurable.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from study.config import cache_dir
from study.errors import ConfigError

SOURCE = Path(__file__).with_name("population_kernel.c")
MAX_DIMS = 34
"""Input, up to 32 hidden layers, output: the kernel's fixed row length of `dims`."""
VECTOR_MATH = ["-DSTUDY_VECTOR_MATH", "-lmvec"]
"""Tried first: the C library's vector exp and log (glibc's libmvec); without them where the
build fails (another C library), the same kernel with scalar calls."""
FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=fast",  # multiply-adds fused, as torch's own CPU kernels do
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c99",
]
STRICT_FLAGS = ["-Wall", "-Wextra", "-Werror"]
"""Added when $STUDY_NATIVE_STRICT is 1 (the tests build so): any compiler warning fails."""


@dataclass(frozen=True)
class Argument:
    """One argument of `population_epoch`: a C int32 scalar (`dtype` None) or a pointer to a
    contiguous CPU tensor of `dtype` and `shape` (names of sizes, or numbers)."""

    name: str
    dtype: torch.dtype | None = None
    shape: tuple[str | int, ...] = ()
    written: bool = False
    """The kernel writes into it."""


ARGUMENTS = (
    Argument("members"),
    Argument("active", torch.uint8, ("members",)),
    Argument("ndims", torch.int32, ("members",)),
    Argument("dims", torch.int32, ("members", MAX_DIMS)),
    Argument("offsets", torch.int64, ("members",)),
    Argument("params", torch.float32, ("parameters",), written=True),
    Argument("exp_avg", torch.float32, ("parameters",), written=True),
    Argument("exp_avg_sq", torch.float32, ("parameters",), written=True),
    Argument("steps", torch.int64, ("members",), written=True),
    Argument("lr", torch.float32, ("members",)),
    Argument("schedule", torch.uint8, ("members",)),
    Argument("warmup", torch.int64, ("members",)),
    Argument("floor", torch.float32, ("members",)),
    Argument("total_steps", torch.int64, ("members",)),
    Argument("batch", torch.int32, ("members",)),
    Argument("rows"),
    Argument("x", torch.float32, ("rows", "inputs")),
    Argument("y", torch.float32, ("rows", "outputs")),
    Argument("orders", torch.int64, ("members", "rows")),
    Argument("train_loss", torch.float32, ("members",), written=True),
    Argument("eval_loss", torch.float32, ("members",), written=True),
    Argument("eval_acc", torch.float32, ("members",), written=True),
    Argument("threads"),
)
"""`population_epoch`'s arguments, in order (see population_kernel.c)."""
BUFFERS = tuple(a.name for a in ARGUMENTS if a.dtype is not None)
INT32_MAX = 2**31 - 1


def _cpu_features() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next(
        (line for line in text.splitlines() if line.startswith(("flags", "Features"))), ""
    )
    return f"{platform.machine()} {flags}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _flags() -> list[str]:
    return FLAGS + (STRICT_FLAGS if os.environ.get("STUDY_NATIVE_STRICT") == "1" else [])


def _build(compiler: str, library: Path, flags: list[str]) -> None:
    """Compile the kernel into `library` (with vector math where the C library has it)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        for extra in (VECTOR_MATH, []):
            done = subprocess.run(
                [compiler, *flags, "-o", str(built), str(SOURCE), *extra, "-lm"],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                break
        else:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr else "")
        built.replace(library)  # atomic: concurrent builders never see half a file


@functools.cache
def load() -> Kernel | None:
    """The kernel, built if needed; None (after one notice line) where it cannot be."""
    if os.environ.get("STUDY_NATIVE", "1") == "0":
        return None  # turned off: the torch engine (e.g. to compare the two)
    compiler, flags = _compiler(), _flags()
    key = hashlib.sha256(
        SOURCE.read_bytes()
        + " ".join([compiler or "", *flags, *VECTOR_MATH, _cpu_features()]).encode()
    ).hexdigest()[:16]
    library = cache_dir() / f"population_kernel-{key}.so"
    try:
        if not library.is_file():
            if compiler is None:
                raise OSError("no C compiler found (cc, gcc or $CC)")
            _build(compiler, library, flags)
        return Kernel(ctypes.CDLL(str(library)))
    except OSError as error:
        print(
            f"study: note: the population kernel could not be built ({error}); the population "
            "trainer uses torch instead (slower, same results)",
            file=sys.stderr,
        )
        return None


class Kernel:
    """The loaded library; its one entry point is typed from `ARGUMENTS`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        self.function = library.population_epoch
        self.function.argtypes = [
            ctypes.c_int32 if a.dtype is None else ctypes.c_void_p for a in ARGUMENTS
        ]
        self.function.restype = ctypes.c_int

    def bind(self, **buffers: torch.Tensor) -> BoundEpoch:
        """Check `buffers` (one tensor per pointer argument) against `ARGUMENTS` and the bounds
        the kernel relies on; return the call that trains one epoch on them."""
        sizes = check_buffers(buffers)
        return BoundEpoch(self.function, buffers, sizes)


class BoundEpoch:
    """One epoch of the kernel on checked buffers: `epoch(threads)` returns the kernel's
    status (0, or -1 when it ran out of memory)."""

    def __init__(self, function, buffers: dict[str, torch.Tensor], sizes: dict[str, int]):
        self.function = function
        self.tensors = tuple(buffers[name] for name in BUFFERS)
        self.pointers = tuple(t.data_ptr() for t in self.tensors)
        pointers = dict(zip(BUFFERS, self.pointers, strict=True))
        # the call's arguments in `ARGUMENTS` order; the last one, threads, is set per call
        self.arguments = [
            sizes.get(a.name, 1) if a.dtype is None else pointers[a.name] for a in ARGUMENTS
        ]

    def epoch(self, threads: int) -> int:
        if not (isinstance(threads, int) and 1 <= threads <= 1024):
            raise ConfigError(f"threads: must be an integer from 1 to 1024, got {threads!r}")
        if tuple(map(torch.Tensor.data_ptr, self.tensors)) != self.pointers:
            raise RuntimeError("population kernel: a bound buffer was replaced after the check")
        self.arguments[-1] = threads
        return self.function(*self.arguments)


def check_buffers(buffers: dict[str, torch.Tensor]) -> dict[str, int]:
    """Raise ValueError unless `buffers` are what `population_epoch` reads and writes; return
    the scalar sizes (members, rows). A failure here is a bug of the caller, never of the user:
    without it, the kernel would read or write outside the buffers."""
    if set(buffers) != set(BUFFERS):
        raise ValueError(f"population kernel: buffers {sorted(buffers)} != {sorted(BUFFERS)}")
    x, y = buffers["x"], buffers["y"]
    sizes = {
        "members": buffers["active"].shape[0] if buffers["active"].dim() == 1 else -1,
        "rows": x.shape[0] if x.dim() == 2 else -1,
        "inputs": x.shape[1] if x.dim() == 2 else -1,
        "outputs": y.shape[1] if y.dim() == 2 else -1,
        "parameters": buffers["params"].numel(),
    }
    for argument in ARGUMENTS:
        if argument.dtype is not None:
            _check_tensor(argument, buffers[argument.name], sizes)
    if not (0 <= sizes["members"] <= INT32_MAX and 1 <= sizes["rows"] <= INT32_MAX):
        raise ValueError(f"population kernel: sizes out of range: {sizes}")
    _check_members(buffers, sizes)
    return {"members": sizes["members"], "rows": sizes["rows"]}


def _check_tensor(argument: Argument, tensor: torch.Tensor, sizes: dict[str, int]) -> None:
    shape = tuple(sizes[s] if isinstance(s, str) else s for s in argument.shape)
    problems = [
        f"dtype {tensor.dtype}, not {argument.dtype}" if tensor.dtype != argument.dtype else "",
        f"on {tensor.device}, not the CPU" if tensor.device.type != "cpu" else "",
        f"shape {tuple(tensor.shape)}, not {shape}" if tuple(tensor.shape) != shape else "",
        "not contiguous" if not tensor.is_contiguous() else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"population kernel: {argument.name}: {'; '.join(problems)}")


def _check_members(buffers: dict[str, torch.Tensor], sizes: dict[str, int]) -> None:
    """Every member's layer widths, its parameters' place in the flat buffers, its batch size
    and its flags: what the kernel indexes with, checked once per binding."""
    ndims, dims = buffers["ndims"].long(), buffers["dims"].long()
    if sizes["members"] == 0:
        return
    if not bool(((ndims >= 2) & (ndims <= MAX_DIMS)).all()):
        raise ValueError("population kernel: ndims: every member needs 2 to 34 layer sizes")
    used = torch.arange(MAX_DIMS)[None, :] < ndims[:, None]
    if not bool((dims[used] >= 1).all()):
        raise ValueError("population kernel: dims: a layer of width 0")
    last = dims.gather(1, (ndims - 1)[:, None])[:, 0]
    if not bool((dims[:, 0] == sizes["inputs"]).all() and (last == sizes["outputs"]).all()):
        raise ValueError("population kernel: dims: first and last sizes must match x and y")
    following = torch.cat([dims[:, 1:], torch.zeros_like(dims[:, :1])], dim=1)
    per_layer = torch.where(used[:, 1:], (dims[:, :-1] + 1) * following[:, :-1], 0)
    size = per_layer.sum(dim=1)  # weights and biases of each member
    offsets = buffers["offsets"]
    if not bool(((offsets >= 0) & (offsets + size <= sizes["parameters"])).all()):
        raise ValueError("population kernel: offsets: a member's parameters outside the buffer")
    if not bool((buffers["batch"] >= 1).all()):
        raise ValueError("population kernel: batch: every batch size must be at least 1")
    if not bool((buffers["total_steps"] >= 1).all()):
        raise ValueError("population kernel: total_steps: every schedule needs a step")
    if not bool((buffers["active"] <= 1).all()):
        raise ValueError("population kernel: active: must be 0 or 1")
    if not bool((buffers["schedule"] <= 2).all()):
        raise ValueError("population kernel: schedule: must be 0, 1 or 2 (SCHEDULE_CODES)")
    warmup, floor = buffers["warmup"], buffers["floor"]
    if not bool(((warmup >= 0) & (warmup <= buffers["total_steps"])).all()):
        raise ValueError("population kernel: warmup: from 0 to the member's total steps")
    if not bool(((floor >= 0) & (floor < 1)).all()):
        raise ValueError("population kernel: floor: must be in [0, 1)")
