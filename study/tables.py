"""Tables and figure files shared by the reports: one row per trial, markdown tables.

Only reads: a study's trials become a pandas frame; figures are written with one style.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files, not windows; notebooks display the saved figures or call these
import matplotlib.pyplot as plt
import optuna
import pandas as pd

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
STYLE = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "font.size": 9,
}
"""One style for every figure of the reports."""
plt.rcParams.update(STYLE)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, parameters, value, constraint, user attributes, duration."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.state.name == "COMPLETE" else None,
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
            "duration_seconds": t.duration.total_seconds() if t.duration else None,
        }
        row.update({f"param_{k}": v for k, v in t.params.items()})
        row.update({f"constraint_{k}": v for k, v in t.constraints.items()})
        for key, value in t.user_attrs.items():
            row[key] = json.dumps(value) if isinstance(value, list | dict) else value
        rows.append(row)
    return pd.DataFrame(rows)


def outside_legend(ax, **kwargs) -> None:
    """The legend beside the plot, where it covers no point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, **kwargs)


def save_figure(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(frame: pd.DataFrame) -> str:
    """A markdown table that keeps integer columns integer (pandas' `to_markdown` upcasts whole
    rows to float) and drops columns that are empty throughout."""
    from tabulate import tabulate

    frame = frame.dropna(axis=1, how="all")
    columns = {}
    for name in frame.columns:
        values = frame[name]
        if values.dtype.kind == "f" and values.notna().all() and (values % 1 == 0).all():
            values = values.astype("int64")
        columns[name] = [None if pd.isna(v) else v for v in values.tolist()]
    return tabulate(columns, headers="keys", tablefmt="pipe", floatfmt=".3g", missingval="")
