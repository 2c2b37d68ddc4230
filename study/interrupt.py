"""Ctrl-C and SIGTERM during a study: the store always ends consistent, the user gets one line.

A SIGINT that lands inside a storage write could leave a trial half-recorded; instead the
first Ctrl-C only sets a flag, which the objectives check after every epoch (`check`). The
running trial is then failed with `fail_reason` "interrupted" (failed trials do not count
towards a study's total, so the next run of the same command redoes it) and the study stops.
A second Ctrl-C, or a SIGTERM, stops at once: the runner fails the trials it was running with
that reason before it exits (128 + the signal's number). A process that starts workers
forwards both signals to them (`deferred(forward=...)`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator

REASON = "interrupted by the user (SIGINT) before it finished"
AT_ONCE = "stopped at once by a second Ctrl-C (SIGINT) before it finished"
TERMINATED = "terminated (SIGTERM) before it finished"
SIGNAL_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


class Interrupted(KeyboardInterrupt):
    """The user (or SIGTERM) stopped the study; the running trials were failed with a reason."""

    def __init__(self, message: str = REASON, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


class Terminated(Interrupted):
    """SIGTERM: stop at once."""

    def __init__(self, message: str = TERMINATED) -> None:
        super().__init__(message, signal.SIGTERM)


_requested = threading.Event()
_received: list[int] = []


def requested() -> bool:
    return _requested.is_set()


def received() -> int | None:
    """The last signal a forwarding `deferred` block received (None: none)."""
    return _received[-1] if _received else None


def check(trial=None) -> None:
    """Raise `Interrupted` once a stop was requested, after storing the reason on `trial`."""
    if _requested.is_set():
        if trial is not None:
            trial.set_user_attr("fail_reason", REASON)
        raise Interrupted(REASON)


def reason_of(error: BaseException) -> str:
    """The `fail_reason` of a trial stopped by `error`."""
    if isinstance(error, Terminated):
        return TERMINATED
    if isinstance(error, Interrupted):
        return REASON
    if isinstance(error, KeyboardInterrupt):
        return AT_ONCE
    first = (str(error).strip().splitlines() or [""])[0]
    return f"stopped by an error: {type(error).__name__}: {first}"


def describe(error: BaseException) -> str:
    """How the command was stopped, for its one line."""
    if isinstance(error, Interrupted):
        return SIGNAL_WORDS.get(error.signum, "interrupted")
    return "interrupted at once (second Ctrl-C)"


def exit_status(error: BaseException) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + int(getattr(error, "signum", signal.SIGINT))


@contextlib.contextmanager
def deferred(forward: Callable[[int], None] | None = None) -> Iterator[None]:
    """Within the block the first SIGINT requests a stop at the next epoch boundary; a second
    SIGINT or a SIGTERM raises at once. With `forward`, every SIGINT/SIGTERM is only recorded
    (`received`) and passed to `forward(signum)` (a parent of worker processes)."""
    _requested.clear()
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only
        return

    def on_interrupt(signum, frame) -> None:
        if forward is not None:
            _received.append(signum)
            forward(signum)
            return
        if _requested.is_set():
            raise KeyboardInterrupt  # second Ctrl-C: now
        _requested.set()
        print(
            "\nstudy: stopping after the current epoch (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_terminate(signum, frame) -> None:
        if forward is not None:
            on_interrupt(signum, frame)
            return
        raise Terminated

    def quiet(record: logging.LogRecord) -> bool:
        # once a stop is requested, Optuna's "trial failed" warning (with a traceback) only
        # repeats what the one-line message and the trial's fail_reason say
        return not (_requested.is_set() and "failed" in record.getMessage())

    handlers = logging.getLogger("optuna").handlers  # Optuna logs through its root logger
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_terminate),
    }
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for h in handlers:
            h.removeFilter(quiet)
        _requested.clear()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the block records why a run stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
