"""Search spaces: one module per study, found without registration.

The contract (`check` says in one line what a module lacks):

- `NAME`: the study's name (1-100 of letters, digits, `.`, `_`, `-`);
- `KIND`: "boolean" (the fewest neurons that learn a Boolean function; Optuna minimises them)
  or "image" (validation accuracy on FashionMNIST or MNIST; Optuna maximises it);
- `base_settings()`: the study's fixed settings, a `study.config.BooleanSettings` or
  `study.config.ImageSettings` (the CLI overrides single fields; they are stored with the study);
- `suggest(trial, settings)`: calls only `trial.suggest_*` and returns a config (a
  `study.config.BooleanCandidate`, or for images a `study.config.ImageCandidate`);
- optional `DIRECTION`: the kind's own ("minimize" for Boolean, "maximize" for images);
- optional `baseline(settings)`: parameters of a known-good trial, enqueued first in a new study.

Where spaces come from, in this order:

1. this package: every module `search_spaces/<file>.py` whose name does not start with `_` is
   the study `<file>` with `-` for `_` (a new file is a new study);
2. installed packages: the entry-point group `study.search_spaces` (name: the study, value:
   its module), e.g. in a package's pyproject.toml
   `[project.entry-points."study.search_spaces"] my-study = "my_package.my_space"`;
3. a file anywhere: `study run --space path/to/space.py` (or `run_study(module)`).

A study records where its space came from (`source_of`), so that report, best, export and a
resumed run find a space from a file again (`from_source`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from study.errors import ConfigError, first_line

ENTRY_POINT_GROUP = "study.search_spaces"
DIRECTIONS = {"boolean": "minimize", "image": "maximize"}
"""What Optuna optimises for each kind: the neurons of a feasible width, validation accuracy."""

_loaded: dict[str, ModuleType] = {}
"""Spaces given as files or modules in this process, by name."""


def builtin() -> dict[str, str]:
    """The spaces of this package: study name -> module."""
    return {
        info.name.replace("_", "-"): f"{__name__}.{info.name}"
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_")
    }


def installed() -> dict[str, str]:
    """The spaces of installed packages (entry-point group `study.search_spaces`)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _modules() -> dict[str, str]:
    return {**installed(), **builtin()}  # this package's own names win


def names() -> list[str]:
    """Every study name this process can run: this package's, installed ones, given files."""
    return sorted(set(_modules()) | set(_loaded))


def get_space(name: str) -> ModuleType:
    """The search-space module of study `name`, or one clear error listing the known ones."""
    if name in _loaded:
        return _loaded[name]
    module_name = _modules().get(name)
    if module_name is None:
        raise ConfigError(
            f"unknown study {name!r}; choose from {', '.join(names())}, or give your own "
            "space with --space FILE"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        message = f"space {name!r} ({module_name}) cannot be imported: {_says(error)}"
        raise ConfigError(message) from None
    check(module, module_name)
    if name != module.NAME:
        raise ConfigError(
            f"space {module_name} says NAME {module.NAME!r}, but is found as {name!r} (a file "
            "in search_spaces/ is named after its study, with _ for -)"
        )
    _loaded[name] = module  # checked once per process
    return module


def load_file(path: str | Path) -> ModuleType:
    """The space defined in the Python file `path`, checked and known by its NAME from now on."""
    path = Path(path).expanduser()
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(f"--space: {path} is not a Python file (a space is a .py file)")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_study_space_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--space: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ConfigError(f"--space: {path} fails to load: {_says(error)}") from None
    return register(module, str(path))


def register(module: ModuleType, where: str | None = None) -> ModuleType:
    """Check a space given as a module (a file, or `run_study(module)`) and know it by NAME; a
    NAME that another space has already is refused."""
    where = where or getattr(module, "__file__", None) or module.__name__
    check(module, where)
    name = module.NAME
    found = _modules().get(name)
    if found is not None and found != module.__name__:
        raise ConfigError(f"space {where}: NAME {name!r} is taken by {found}; choose another NAME")
    known = _loaded.get(name)
    if known is not None and getattr(known, "__file__", None) != getattr(module, "__file__", None):
        raise ConfigError(f"space {where}: NAME {name!r} is taken by {known.__file__}")
    _loaded[name] = module
    return module


def check(module: ModuleType, where: str) -> ModuleType:
    """Refuse, in one line naming `where`, a module that does not keep the contract above."""
    from study.config import SETTINGS_OF_KIND, is_study_name

    def refuse(what: str) -> ConfigError:
        return ConfigError(f"space {where}: {what} (see search_spaces/__init__.py)")

    name = getattr(module, "NAME", None)
    if not is_study_name(name):
        raise refuse(f"NAME must be a study name (1-100 of A-Z a-z 0-9 . _ -), got {name!r}")
    kind = getattr(module, "KIND", None)
    if kind not in DIRECTIONS:
        raise refuse(f"KIND must be one of {', '.join(DIRECTIONS)}, got {kind!r}")
    for function in ("base_settings", "suggest"):
        if not callable(getattr(module, function, None)):
            raise refuse(f"it has no function {function}()")
    if hasattr(module, "baseline") and not callable(module.baseline):
        raise refuse("baseline must be a function of the settings")
    direction = getattr(module, "DIRECTION", DIRECTIONS[kind])
    if direction != DIRECTIONS[kind]:
        raise refuse(f"DIRECTION of {kind} studies is {DIRECTIONS[kind]!r}, got {direction!r}")
    try:
        settings = module.base_settings()
    except Exception as error:
        raise refuse(f"base_settings() fails: {_says(error)}") from None
    expected = SETTINGS_OF_KIND[kind]
    if not isinstance(settings, expected):
        raise refuse(f"base_settings() must return {expected.__name__} for a {kind} study")
    return module


def direction(module: ModuleType) -> str:
    """What Optuna optimises in a study of this space."""
    return DIRECTIONS[module.KIND]


def source_of(module: ModuleType) -> dict[str, Any]:
    """Where `module` came from, as stored with a study: {"module": ...} for a space of this
    package or an installed one, {"file": ...} for a file."""
    if module.__name__ in _modules().values():
        return {"module": module.__name__}
    return {"file": str(Path(module.__file__).resolve())} if module.__file__ else {}


def from_source(name: str, source: dict[str, Any] | None) -> ModuleType:
    """The space of a stored study: by its name, else from the file its study recorded."""
    if name in _loaded or name in _modules():
        return get_space(name)
    path = (source or {}).get("file")
    if path is None:
        return get_space(name)  # the unknown-study line
    if not Path(path).is_file():
        raise ConfigError(f"study space {name!r} came from {path}, which no longer exists")
    module = load_file(path)
    if name != module.NAME:
        raise ConfigError(f"{path} now defines space {module.NAME!r}, not {name!r}")
    return module


def _says(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"
