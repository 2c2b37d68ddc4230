"""Ctrl-C and SIGTERM during a study: the store always ends consistent, the user gets one line.

A SIGINT that lands inside a storage write could leave a trial half-recorded; instead the
first Ctrl-C only sets a flag, which the objectives check after every epoch (`check`). The
running trial is then failed with `fail_reason` "interrupted" (failed trials do not count
towards a study's total, so the next run of the same command redoes it) and the study stops.
A second Ctrl-C, or a SIGTERM, stops at once: the runner fails the trials it was running with
that reason before it exits (128 + the signal's number). Such a stop is also remembered, so
that it is raised again at the next `check` when the handler's exception was swallowed where
it landed (a finaliser, a library's `except BaseException`). A process that starts workers
forwards both signals to them (`deferred(forward=...)`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
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


class OutOfTime(Exception):
    """The run's time budget (`--timeout`) is spent: stop at the next epoch boundary."""


OUT_OF_TIME = "stopped by the run's time budget (--timeout) before it finished; re-queued"
_deadline: list[float] = []


def set_deadline(deadline: float | None) -> None:
    """From now on `check` raises `OutOfTime` once `time.time()` passes `deadline`."""
    _deadline.clear()
    if deadline is not None:
        _deadline.append(deadline)


def out_of_time() -> bool:
    return bool(_deadline) and time.time() >= _deadline[0]


class Terminated(Interrupted):
    """SIGTERM: stop at once."""

    def __init__(self, message: str = TERMINATED) -> None:
        super().__init__(message, signal.SIGTERM)


_requested = threading.Event()
_received: list[int] = []
_raised: list[BaseException] = []
"""What a handler raised at once (SIGTERM, a second Ctrl-C): raised again by every `check`, so
that a handler's exception that lands where it is swallowed (a finaliser, a library's
`except BaseException`) still stops the run at the next epoch boundary."""


def requested() -> bool:
    return _requested.is_set()


def received() -> int | None:
    """The last signal a forwarding `deferred` block received (None: none)."""
    return _received[-1] if _received else None


def check(trial=None) -> None:
    """Raise `Interrupted` once a stop was requested, or `OutOfTime` once the time budget is
    spent, after storing the reason on `trial`."""
    if _raised:
        if trial is not None:
            trial.set_user_attr("fail_reason", reason_of(_raised[-1]))
        raise _raised[-1]
    if _requested.is_set():
        if trial is not None:
            trial.set_user_attr("fail_reason", REASON)
        raise Interrupted(REASON)
    if out_of_time():
        if trial is not None:
            trial.set_user_attr("fail_reason", OUT_OF_TIME)
        raise OutOfTime(OUT_OF_TIME)


def reason_of(error: BaseException) -> str:
    """The `fail_reason` of a trial stopped by `error`."""
    if isinstance(error, Terminated):
        return TERMINATED
    if isinstance(error, Interrupted):
        return REASON
    if isinstance(error, KeyboardInterrupt):
        return AT_ONCE
    if isinstance(error, OutOfTime):
        return OUT_OF_TIME
    first = (str(error).strip().splitlines() or [""])[0]
    return f"stopped by an error: {type(error).__name__}: {first}"


def describe(error: BaseException) -> str:
    """How the command was stopped, for its one line."""
    if isinstance(error, Interrupted):
        return SIGNAL_WORDS.get(error.signum, "interrupted")
    return AT_ONCE_LINE


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
    _raised.clear()
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only
        return

    def on_interrupt(signum, frame) -> None:
        if forward is not None:
            _received.append(signum)
            forward(signum)
            return
        if _requested.is_set():
            _raised.append(KeyboardInterrupt())
            raise _raised[-1]  # second Ctrl-C: now
        _requested.set()
        # one write, so that a second Ctrl-C cannot split the line
        sys.stderr.write(
            "\nstudy: stopping after the current epoch (Ctrl-C again to stop at once)\n"
        )
        sys.stderr.flush()

    def on_terminate(signum, frame) -> None:
        if forward is not None:
            on_interrupt(signum, frame)
            return
        _raised.append(Terminated())
        raise _raised[-1]

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
        stopping = _requested.is_set()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if stopping and forward is None and previous[signal.SIGINT] is signal.default_int_handler:
            # the command is on its way out after a first Ctrl-C: another one is a second one
            signal.signal(signal.SIGINT, _at_once)
        for h in handlers:
            h.removeFilter(quiet)
        _requested.clear()
        _raised.clear()


def _at_once(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt(AT_ONCE_LINE)


AT_ONCE_LINE = "interrupted at once (second Ctrl-C)"


@contextlib.contextmanager
def _stop_signals(handler) -> Iterator[dict]:
    """SIGINT and SIGTERM go to `handler` within the block (main thread only: elsewhere nothing
    changes and the block gets {}); yields the handlers in force before, restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield previous
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs (a write that must not be cut in two, such as
    creating a trial and recording its owner); a signal that arrived meanwhile is handled, by
    the handler in force before the block, as soon as the block ends."""
    arrived: list[int] = []
    previous: dict = {}
    try:
        with _stop_signals(lambda signum, frame: arrived.append(signum)) as previous:
            yield
    finally:
        for signum in arrived:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the block records why a run stopped."""
    with _stop_signals(signal.SIG_IGN):
        yield
