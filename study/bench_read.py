"""`study bench read`: `study list` against `optuna studies` on the same stores, side by side.

Each command runs as its own process, the two alternating, `repeats` times per store; a
process's wall time and peak resident memory come from `os.wait4` (that child alone). The
medians are compared: `study list` should be no slower than `optuna studies` and use under
twice its memory. Imports neither torch nor the trainers (it times reading, not them).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMITTED = ("results/reference.db", "results/frontier.db", "results/bench/hour.db")
"""The committed stores, relative to the checkout (those present are timed)."""

TARGETS = {"seconds": 1.0, "memory": 2.0}
"""`study list` over `optuna studies`: at most this time, under this memory."""


def _commands(url: str) -> dict[str, list[str]]:
    """Each command as a user types it: the console scripts beside this Python."""
    scripts = Path(sys.executable).parent
    return {
        "study list": [str(scripts / "study"), "list", "--storage", url],
        "optuna studies": [str(scripts / "optuna"), "studies", "--storage", url],
    }


def _timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of one run of `argv` (which must succeed)."""
    with tempfile.TemporaryFile() as errors:  # a file: a long message cannot block the child
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            errors.seek(0)
            said = errors.read().decode(errors="replace").strip()
            raise RuntimeError(f"{' '.join(argv[-4:])}: exit {code}: {said[-300:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def bench_read(stores: list[str] | None = None, repeats: int = 3, log=print) -> dict:
    """Times both commands on each store (SQLite paths or URLs); returns per store the medians
    and the ratios, and `worst` (the largest ratio of each kind over the stores)."""
    if stores is None:
        stores = [p for p in COMMITTED if Path(p).is_file()]
        if not stores:
            raise FileNotFoundError("bench read: no committed store here; run it in a checkout")
    results: dict = {"repeats": repeats, "stores": {}}
    for store in stores:
        url = store if "://" in store else f"sqlite:///{store}"
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in _commands(url)}
        for _ in range(repeats):
            for name, argv in _commands(url).items():  # alternating: the same machine state
                runs[name].append(_timed(argv))
        medians = {
            name: {
                "seconds": statistics.median(s for s, _ in timings),
                "mib": statistics.median(m for _, m in timings),
            }
            for name, timings in runs.items()
        }
        ours, theirs = medians["study list"], medians["optuna studies"]
        entry = {
            **medians,
            "seconds_ratio": ours["seconds"] / theirs["seconds"],
            "memory_ratio": ours["mib"] / theirs["mib"],
        }
        results["stores"][store] = entry
        log(
            f"{store}: study list {ours['seconds']:.2f} s {ours['mib']:.0f} MiB, optuna "
            f"studies {theirs['seconds']:.2f} s {theirs['mib']:.0f} MiB: time "
            f"x{entry['seconds_ratio']:.2f}, memory x{entry['memory_ratio']:.2f} (medians of "
            f"{repeats})"
        )
    entries = results["stores"].values()
    results["worst"] = {
        "seconds_ratio": max(e["seconds_ratio"] for e in entries),
        "memory_ratio": max(e["memory_ratio"] for e in entries),
    }
    worst = results["worst"]
    log(
        f"worst: time x{worst['seconds_ratio']:.2f} (target <= {TARGETS['seconds']}), memory "
        f"x{worst['memory_ratio']:.2f} (target < {TARGETS['memory']})"
    )
    return results
