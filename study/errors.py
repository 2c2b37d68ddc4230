"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class StudyError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(StudyError, ValueError):
    """A configuration value is invalid; the message names the field."""


class DataError(StudyError):
    """A dataset is missing, truncated or corrupted; the message says how to get it."""


class StorageError(StudyError):
    """A storage URL is malformed, unreachable, or not an Optuna database."""


class NonFiniteLossError(ArithmeticError):
    """Training produced a NaN or infinite loss; the run is stopped, never silently kept."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"non-finite training loss ({value}) in epoch {epoch}")
        self.epoch = epoch
        self.value = value
