"""One module per study: its question, its search space and its fixed settings.

A space module exposes `NAME`, `KIND` ("boolean" or "image"), `base_settings()` and
`suggest(trial, settings)`; the latter only calls `trial.suggest_*` and returns a config.
Models are built elsewhere. Image spaces also say `DIRECTION` ("maximize").
"""

from __future__ import annotations

import importlib
from types import ModuleType

from study.errors import ConfigError

SPACES = {
    "boolean-shallow": "search_spaces.boolean_shallow",
    "boolean-deep": "search_spaces.boolean_deep",
    "fashion-mlp": "search_spaces.fashion_mlp",
    "fashion-cnn": "search_spaces.fashion_cnn",
}


def get_space(name: str) -> ModuleType:
    """The search-space module of a study, or one clear error listing the known studies."""
    if name not in SPACES:
        raise ConfigError(f"unknown study {name!r}; choose from {', '.join(SPACES)}")
    return importlib.import_module(SPACES[name])
