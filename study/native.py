"""The population trainer's CPU kernel (`population_kernel.c`), built once per machine.

Built with the machine's C compiler (`cc`, or $CC) into a shared library that ctypes loads;
cached under $STUDY_CACHE_DIR (default ~/.cache/study) by the source, the compiler flags and
this CPU's features, so that a copy built for another CPU is never loaded. Where it cannot be
built (no compiler), `load()` returns None once with one notice line, and the population
trainer uses its torch engine: slower, the same results up to float rounding.
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
from pathlib import Path

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


def cache_dir() -> Path:
    env = os.environ.get("STUDY_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "study"


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


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library, built if needed; None (after one notice line) where it cannot be."""
    if os.environ.get("STUDY_NATIVE", "1") == "0":
        return None  # turned off: the torch engine (e.g. to compare the two)
    compiler = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join([compiler or "", *FLAGS, *VECTOR_MATH, _cpu_features()]).encode()
    ).hexdigest()[:16]
    library = cache_dir() / f"population_kernel-{key}.so"
    try:
        if not library.is_file():
            if compiler is None:
                raise OSError("no C compiler found (cc, gcc or $CC)")
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
                built = Path(tmp) / library.name
                for extra in (VECTOR_MATH, []):
                    done = subprocess.run(
                        [compiler, *FLAGS, "-o", str(built), str(SOURCE), *extra, "-lm"],
                        capture_output=True,
                        text=True,
                    )
                    if done.returncode == 0:
                        break
                else:
                    raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr else "")
                built.replace(library)  # atomic: concurrent builders never see half a file
        lib = ctypes.CDLL(str(library))
    except OSError as error:
        print(
            f"study: note: the population kernel could not be built ({error}); the population "
            "trainer uses torch instead (slower, same results)",
            file=sys.stderr,
        )
        return None
    fn = lib.population_epoch
    pointer = ctypes.c_void_p
    fn.argtypes = [
        ctypes.c_int32,  # members
        pointer,  # active (uint8)
        pointer,  # ndims (int32)
        pointer,  # dims (int32, members x MAX_DIMS)
        pointer,  # offsets (int64)
        pointer,  # params (float32)
        pointer,  # exp_avg
        pointer,  # exp_avg_sq
        pointer,  # steps (int64)
        pointer,  # lr (float32)
        pointer,  # cosine (uint8)
        pointer,  # total_steps (int64)
        pointer,  # batch (int32)
        ctypes.c_int32,  # rows
        pointer,  # x (float32, rows x inputs)
        pointer,  # y (float32, rows x outputs)
        pointer,  # orders (int64, members x rows)
        pointer,  # train_loss (float32)
        pointer,  # eval_loss
        pointer,  # eval_acc
        ctypes.c_int32,  # threads
    ]
    fn.restype = ctypes.c_int
    return lib
