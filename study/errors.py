"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class StudyError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(StudyError, ValueError):
    """A configuration value is invalid; the message names the field."""


def reject_unknown_fields(cls: type, values, what: str = "setting") -> None:
    """Raise a ConfigError naming the first key of `values` that is not a field of `cls`."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown {what}; known: {sorted(known)}")


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
