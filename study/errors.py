"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class StudyError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(StudyError, ValueError):
    """A configuration value is invalid; the message names the field (`field`, when it is
    one field of a configuration dataclass: the command line names its flag instead)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DataError(StudyError):
    """A dataset is missing, truncated or corrupted; the message says how to get it."""


class StorageError(StudyError):
    """A storage URL is malformed, unreachable, or not an Optuna database."""


class TrialFailed(RuntimeError):
    """A trial failed for a reason stored with it (a diverged loss, out of memory); the study
    fails that trial and goes on. Not a user error: raised inside objectives only."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for a one-line reason (allocator and decoder
    messages run to dozens of lines)."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
