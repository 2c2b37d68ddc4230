"""How a run stops: Ctrl-C, a second Ctrl-C, SIGTERM and the time budget, in one table.

A signal that lands inside a storage write could leave a trial half-recorded, so no signal
handler here touches the store. Within `watching()` the handler only records what happened in
one state object; the training loops call `check()` after every epoch, which raises `Stopped`
with the stop's kind. The runner then fails the trials it was running with the stop's
`reason` (re-queued when the stop says so) and the command ends with one line and the stop's
exit status (`ending`). A stop that must act at once (a second Ctrl-C, SIGTERM) is raised by
the handler itself and remembered, so that `check()` raises it again when the handler's
exception was swallowed where it landed (a finaliser, a library's `except BaseException`).

A stop that must act at once never cuts a storage call in two: when the signal lands inside
SQLAlchemy or Optuna's storage code (a read whose cursor is still open, a write not yet
committed), the exception would keep the cursor, and with it SQLite's lock, alive for as long
as its traceback lives, and the trials could not be failed with their reason (a worker waited
out SQLite's 120-second busy timeout that way). The handler then lets the call finish and
delivers the signal again moments later (`REDELIVER_SECONDS`), outside it.

`held()` keeps signals out of a block that must not be cut in two (creating a trial and
recording its owner) and handles them right after it; `shielded()` ignores them while the
stop's reason is being stored. A parent of worker processes forwards signals to them instead
(`watching(forward=...)`).
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
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------
# the stops


@dataclass(frozen=True)
class Stop:
    """One way a run stops: when it acts, what a stopped trial stores, how the command ends."""

    words: str
    """How the command's last line starts (`study: <words>: ...`)."""
    reason: str
    """The `fail_reason` stored on a trial it stops."""
    at_once: bool
    """Raised by the signal handler itself; otherwise at the next epoch boundary (`check`)."""
    exit_status: int
    """The command's exit status: 128 + the signal's number, 0 for the time budget."""
    requeue: bool
    """A stopped trial is re-queued with its parameters (else the next run samples anew)."""


CTRL_C = Stop(
    "interrupted", "interrupted by the user (SIGINT) before it finished", False, 130, False
)
SECOND_CTRL_C = Stop(
    "interrupted at once (second Ctrl-C)",
    "stopped at once by a second Ctrl-C (SIGINT) before it finished",
    True,
    130,
    False,
)
SIGTERM = Stop("terminated (SIGTERM)", "terminated (SIGTERM) before it finished", True, 143, False)
TIME_BUDGET = Stop(
    "time budget reached",
    "stopped by the run's time budget (--timeout) before it finished; re-queued with its "
    "parameters (an image trial with its checkpoint, to go on after its last epoch)",
    False,
    0,
    True,
)
STOPS = (CTRL_C, SECOND_CTRL_C, SIGTERM, TIME_BUDGET)

NOTICE = "\nstudy: stopping after the current epoch (Ctrl-C again to stop at once)\n"
"""Said once at the first Ctrl-C, in one write, so that a second Ctrl-C cannot split it."""


class Stopped(KeyboardInterrupt):
    """The run was stopped (`stop` says how); a KeyboardInterrupt, so that no library's
    `except Exception` swallows it. Its message, when set, is the command's last line."""

    def __init__(self, stop: Stop, message: str = "") -> None:
        super().__init__(message or stop.words)
        self.stop = stop


def detach_worker() -> None:
    """Make this process a worker of its parent: out of the terminal's process group (a
    Ctrl-C reaches only the parent, which stops its workers itself), and on Linux sent SIGTERM
    when the parent dies, even by SIGKILL. Every worker process of this tool starts here."""
    import ctypes

    with contextlib.suppress(OSError):
        os.setpgrp()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def ended(stop: Stop, kept: str) -> Stopped:
    """The command's last line when `stop` ends it: how it stopped, what is kept, and how to go
    on (every command that resumes says it the same way)."""
    return Stopped(stop, f"{stop.words}: {kept}; run the same command again to continue")


def stop_of(error: BaseException) -> Stop | None:
    """The stop behind `error`: a plain KeyboardInterrupt (Python's own handler) is a Ctrl-C;
    None for any other error."""
    if isinstance(error, Stopped):
        return error.stop
    return CTRL_C if isinstance(error, KeyboardInterrupt) else None


def reason_of(error: BaseException) -> str:
    """The `fail_reason` of a trial stopped by `error`."""
    stop = stop_of(error)
    if stop is not None:
        return stop.reason
    first = (str(error).strip().splitlines() or [""])[0]
    return f"stopped by an error: {type(error).__name__}: {first}"


def ending(error: BaseException) -> tuple[str, int]:
    """The one place a stopped command ends: its last line and its exit status."""
    stop = stop_of(error) or CTRL_C
    message = str(error) if isinstance(error, Stopped) else ""
    return f"study: {message or stop.words}", stop.exit_status


# ----------------------------------------------------------------------------------------------
# the state: what has happened in this process since `watching()` began


@dataclass
class _State:
    requested: Stop | None = None
    """A stop waiting for the next `check` (a first Ctrl-C)."""
    raised: Stop | None = None
    """A stop the handler raised at once; every `check` raises it again."""
    deadline: float | None = None
    """`time.time()` after which `check` raises the time budget's stop."""
    forward: Callable[[int], None] | None = None
    """A parent of workers: signals go to this instead (and are only recorded here)."""
    forwarded: list[int] = field(default_factory=list)
    pending: bool = False
    """`raised` waits for the main thread to leave a storage call (it is delivered again)."""


_state = _State()


def requested() -> bool:
    """A stop waits for the next epoch boundary."""
    return _state.requested is not None


def forwarded() -> Stop | None:
    """The stop a parent of workers forwarded last (None: none)."""
    if not _state.forwarded:
        return None
    return SIGTERM if _state.forwarded[-1] == signal.SIGTERM else CTRL_C


def set_deadline(deadline: float | None) -> None:
    """Move the time budget's end (`time.time()`) of the run being watched."""
    _state.deadline = deadline


def check(trial=None) -> None:
    """Raise `Stopped` once a stop is due (after storing its reason on `trial`)."""
    stop = _state.raised or _state.requested
    if stop is None and _state.deadline is not None and time.time() >= _state.deadline:
        stop = TIME_BUDGET
    if stop is not None:
        _state.pending = False
        if trial is not None:
            trial.set_user_attr("fail_reason", stop.reason)
        raise Stopped(stop)


STORAGE_CODE = ("sqlalchemy.", "optuna.storages.")
"""Modules a stop must not be raised in (their locks and cursors outlive the exception)."""
REDELIVER_SECONDS = 0.05
"""A signal that landed in storage code is delivered again this much later."""


def in_storage_code(frame) -> bool:
    """`frame` (a signal handler's) is inside a storage call: some caller is in STORAGE_CODE."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(STORAGE_CODE):
            return True
        frame = frame.f_back
    return False


def _deliver_again(signum: int, still: Callable[[], bool]) -> None:
    """Send `signum` to the main thread again after REDELIVER_SECONDS, if `still()` then (a
    signal, so that it also ends a sleep or a wait the main thread has gone into)."""

    def again() -> None:
        if still():
            signal.pthread_kill(threading.main_thread().ident, signum)

    timer = threading.Timer(REDELIVER_SECONDS, again)
    timer.daemon = True
    timer.start()


def _on_signal(signum: int, frame) -> None:
    """The handler of SIGINT and SIGTERM within `watching()`."""
    if _state.forward is not None:
        _state.forwarded.append(signum)
        _state.forward(signum)
        return
    if signum == signal.SIGINT and _state.requested is None:
        _state.requested = CTRL_C
        sys.stderr.write(NOTICE)
        sys.stderr.flush()
        return
    state = _state
    state.raised = SIGTERM if signum == signal.SIGTERM else SECOND_CTRL_C
    if in_storage_code(frame):
        state.pending = True  # `check` raises it too, should the main thread get there first
        _deliver_again(signum, lambda: _state is state and state.pending)
        return
    state.pending = False
    raise Stopped(state.raised)


def _after_first_ctrl_c(signum: int, frame) -> None:
    """The command is on its way out after a first Ctrl-C: another one is a second one."""
    if in_storage_code(frame):
        _deliver_again(signum, lambda: signal.getsignal(signum) is _after_first_ctrl_c)
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise Stopped(SECOND_CTRL_C)


def _unraisable_hook(previous: Callable) -> Callable:
    """Python's hook for exceptions it cannot raise (one in a finaliser): a stop that landed
    there is not printed, since it is remembered and `check` raises it again."""

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, Stopped):
            previous(unraisable)

    return hook


def _quiet(record: logging.LogRecord) -> bool:
    # once a stop is requested, Optuna's "trial failed" warning (with a traceback) only
    # repeats what the one-line message and the trial's fail_reason say
    return not (_state.requested is not None and "failed" in record.getMessage())


@contextlib.contextmanager
def watching(
    deadline: float | None = None, forward: Callable[[int], None] | None = None
) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM act as the table says and `check` honours
    `deadline`; with `forward`, signals are passed to `forward(signum)` instead."""
    global _state
    _state = _State(deadline=deadline, forward=forward)
    handlers = logging.getLogger("optuna").handlers  # Optuna logs through its root logger
    for h in handlers:
        h.addFilter(_quiet)
    unraisable = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook(unraisable)
    previous: dict = {}
    try:
        with _stop_signals(_on_signal) as previous:
            yield
    finally:
        sys.unraisablehook = unraisable
        for h in handlers:
            h.removeFilter(_quiet)
        stopping = _state.requested is not None and forward is None
        if stopping and previous.get(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _after_first_ctrl_c)
        _state = _State(forwarded=_state.forwarded)  # the parent's line reads them after


# ----------------------------------------------------------------------------------------------
# blocks that signals must not cut


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
    """Hold SIGINT and SIGTERM while the block runs (a write that must not be cut in two); a
    signal that arrived meanwhile is handled, by the handler in force before the block, as
    soon as the block ends."""
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
