"""Tables and figure files shared by the reports: one row per trial, markdown tables.

Only reads: a study's trials become a pandas frame; figures are written with one style.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import pandas as pd
from matplotlib.figure import Figure

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
            # the fidelity a trial reached: epochs (image) or blocks (Boolean) it reported
            "steps_reported": len(t.intermediate_values),
        }
        row.update({f"param_{k}": v for k, v in t.params.items()})
        row.update({f"constraint_{k}": v for k, v in t.constraints.items()})
        for key, value in t.user_attrs.items():
            row[key] = json.dumps(value) if isinstance(value, list | dict) else value
        rows.append(row)
    return pd.DataFrame(rows)


def searched(study: optuna.Study) -> str:
    """What the study searched, from the distributions its trials stored (so a space of one's
    own is described as it ran): "width 16..128 (log), optimizer sgd|adamw", parameters in the
    order first seen; empty when no trial sampled any."""
    from optuna.distributions import CategoricalDistribution

    found: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            found.setdefault(name, distribution)
    parts = []
    for name, d in found.items():
        if isinstance(d, CategoricalDistribution):
            parts.append(f"{name} {'|'.join(map(str, d.choices))}")
        else:
            step = f" step {d.step:g}" if getattr(d, "step", None) not in (None, 1) else ""
            log = " (log)" if d.log else ""
            parts.append(f"{name} {d.low:g}..{d.high:g}{step}{log}")
    return ", ".join(parts)


def engines(frame: pd.DataFrame) -> str:
    """What trained a study's trials, as stored with each (`engine`, `threads`): e.g. "native
    kernel on 2 threads (64 trials)"; trials stored before engines were recorded are counted
    as such."""
    names = {"native": "native kernel", "torch": "torch population", "sequential": "sequential"}
    done = frame[frame["state"].isin(["COMPLETE", "PRUNED", "FAIL"])]
    if done.empty:
        return "nothing yet"
    engine = done["engine"] if "engine" in done else pd.Series([None] * len(done))
    threads = done["threads"] if "threads" in done else pd.Series([None] * len(done))
    counts: dict[str, int] = {}
    for name, count in zip(engine.tolist(), threads.tolist(), strict=True):
        if not isinstance(name, str) or not name:
            key = "not recorded (stored before engines were)"
        else:
            many = "s" if count != 1 else ""
            key = f"{names.get(name, name)} on {int(count)} thread{many}"
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{key} ({n} trials)" for key, n in sorted(counts.items()))


def figure_links(specs: list[tuple[str, str]], written: list[Path] | None) -> list[str]:
    """Markdown links of the figures in `specs` (file name, title) that were written (all of
    them when `written` is None): a report never links a figure it did not draw."""
    names = None if written is None else {p.name for p in written}
    return [f"![{title}]({name})" for name, title in specs if names is None or name in names]


def whole_numbers(axis) -> None:
    """Ticks of a count (neurons, trial numbers, epochs) at whole numbers only, labelled as
    such (never "167.5"), on a linear or a log axis; call after the axis's scale is set."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    low, high = sorted(axis.get_view_interval())
    if axis.get_scale() == "log" and low > 0 and high / low < 10:
        # inside a decade 1-2-5 may leave no tick at all: whole numbers, evenly spaced
        axis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
        axis.set_minor_formatter(NullFormatter())
    elif axis.get_scale() == "log":
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{v:.0f}" if v >= 1 and abs(v - round(v)) < 1e-6 else "")
        )
        axis.set_minor_formatter(NullFormatter())
    else:
        get, set_ = (
            (axis.axes.get_xlim, axis.axes.set_xlim)
            if axis.axis_name == "x"
            else (axis.axes.get_ylim, axis.axes.set_ylim)
        )
        low, high = sorted(get())
        if high - low < 2:  # one trial, one epoch: a span of whole numbers around it
            middle = round((low + high) / 2)
            set_(middle - 1, middle + 1)
        axis.set_major_locator(MaxNLocator(integer=True))


def short_number(value: float) -> str:
    """A tick label that stays short: 0.002, 20, 5000, 50k, 1.5M."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def readable_log_axis(axis, values) -> None:
    """A log axis with labelled ticks whatever the data's span (inside one decade a log axis
    has no major tick, hence no label): ticks at 1, 1.5, 2, 3, 5, 7 x 10^k when the data span
    less than a decade, 1-2-5 up to three decades, powers of ten beyond; plain labels; limits
    fitted to the data with a small margin (no empty decades)."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    data = [float(v) for v in values if v is not None and float(v) > 0]
    (axis.axes.set_xscale if axis.axis_name == "x" else axis.axes.set_yscale)("log")
    subs: tuple[float, ...] = (1.0, 2.0, 5.0)
    if data:
        low, high = min(data) / 1.25, max(data) * 1.25
        (axis.axes.set_xlim if axis.axis_name == "x" else axis.axes.set_ylim)(low, high)
        decades = math.log10(high / low)
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades < 0.8 else subs if decades < 3 else (1.0,)
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: short_number(v)))
    axis.set_minor_formatter(NullFormatter())


def empty_note(ax, text: str) -> None:
    """Say in the panel why it shows nothing (instead of a blank one)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.35")


def outside_legend(ax, **kwargs) -> None:
    """The legend beside the plot, where it covers no point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, **kwargs)


@contextlib.contextmanager
def figure(
    path: Path, nrows: int = 1, ncols: int = 1, figsize=(7, 4.5), **subplots: Any
) -> Iterator[tuple[Figure, Any]]:
    """A figure in the reports' style, saved to `path` when the block ends. Drawn on a bare
    `Figure`, not through pyplot: no backend is switched and no global state changes, so
    reports can be written from a notebook or a script that has its own plots."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=figsize)
        axes = fig.subplots(nrows, ncols, **subplots)
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)


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
