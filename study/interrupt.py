"""Ctrl-C during a study: finish the current epoch, fail the running trial with a reason, stop.

A SIGINT that lands inside a storage write could leave a trial half-recorded; instead the
first Ctrl-C only sets a flag, which the objectives check after every epoch (`check`). The
running trial is then failed with `fail_reason` "interrupted" (failed trials do not count
towards a study's total, so the next run of the same command redoes it) and the study stops.
A second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

REASON = "interrupted by the user (SIGINT) before it finished"


class Interrupted(KeyboardInterrupt):
    """The user asked the study to stop; the running trial was failed with a reason."""


_requested = threading.Event()


def requested() -> bool:
    return _requested.is_set()


def check(trial=None) -> None:
    """Raise `Interrupted` once a stop was requested, after storing the reason on `trial`."""
    if _requested.is_set():
        if trial is not None:
            trial.set_user_attr("fail_reason", REASON)
        raise Interrupted(REASON)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block the first SIGINT requests a stop at the next epoch boundary."""
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only
        return

    def handler(signum, frame) -> None:
        if _requested.is_set():
            raise KeyboardInterrupt  # second Ctrl-C: now
        _requested.set()
        print(
            "\nstudy: stopping after the current epoch (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def quiet(record: logging.LogRecord) -> bool:
        # once a stop is requested, Optuna's "trial failed" warning (with a traceback) only
        # repeats what the one-line message and the trial's fail_reason say
        return not (_requested.is_set() and "failed" in record.getMessage())

    handlers = logging.getLogger("optuna").handlers  # Optuna logs through its root logger
    previous = signal.signal(signal.SIGINT, handler)
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for h in handlers:
            h.removeFilter(quiet)
        _requested.clear()
