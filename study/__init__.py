"""Optuna studies over PyTorch trainings: Boolean width search and FashionMNIST/MNIST search.

Run a study from a script::

    from study import run_study
    study = run_study("boolean-shallow", trials=20, storage="sqlite:///results/studies.db")
"""

import warnings

from study.errors import ConfigError, DataError, StorageError, StudyError

# in a notebook without ipywidgets, tqdm (imported by Optuna) warns with a path of this machine;
# progress bars still work as text
warnings.filterwarnings("ignore", message="IProgress not found")

__all__ = ["ConfigError", "DataError", "StorageError", "StudyError", "run_study"]


def run_study(*args, **kwargs):
    """Create or resume a named study and run it to a total trial count (see study.runner)."""
    from study.runner import run_study as _run_study

    return _run_study(*args, **kwargs)
