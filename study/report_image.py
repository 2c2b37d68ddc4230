"""The report of an image study: its answer (and exported test accuracy), budget, best trials,
and the figures learning rate vs accuracy, accuracy vs size, learning curves, training vs
validation, parameter importances and the timeline."""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path
from typing import Any

import matplotlib.dates as mdates
import numpy as np
import optuna
import pandas as pd

from study import choices
from study.config import IMAGE_DATASETS, ImageCandidate, ImageSettings
from study.plan import PLANS_ATTR, Plan, rung_table
from study.studies import (
    BASELINE_EXPORT_ATTR,
    StudyInfo,
    baseline_trial,
    best_feasible,
    run_seconds,
    stored_attrs,
)
from study.tables import (
    STATES,
    empty_note,
    engines,
    figure,
    figure_links,
    markdown_table,
    outside_legend,
    readable_log_axis,
    searched,
    whole_numbers,
)

# ----------------------------------------------------------------------------------------------
# Image studies (FashionMNIST, MNIST)


def _histories(frame: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """Per-trial learning curves (epoch, train/val loss and accuracy) from the stored history."""
    curves = {}
    if "history" not in frame:
        return curves
    for number, text in zip(frame["number"], frame["history"], strict=True):
        if isinstance(text, str) and text:
            curves[int(number)] = pd.DataFrame(json.loads(text))
    return curves


def image_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Finished trials with the columns the image figures use: optimiser, batch size and
    learning rate (from each trial's stored configuration), parameters, last validation and
    training accuracy, epochs run."""
    done = frame[frame["state"].isin(["COMPLETE", "PRUNED"])].copy()
    if done.empty:
        return done
    curves = _histories(done)
    last = {n: c.iloc[-1] for n, c in curves.items() if len(c)}
    done["val_accuracy"] = [last[n]["val_accuracy"] if n in last else np.nan for n in done.number]
    done["train_accuracy"] = [
        last[n]["train_accuracy"] if n in last else np.nan for n in done.number
    ]
    done["epochs_run"] = [len(curves.get(n, [])) for n in done.number]
    # what the figures group by, from each trial's stored configuration (whatever its space
    # named its parameters, or fixed them)
    configs = [json.loads(c) if isinstance(c, str) else {} for c in done.get("config", [])]
    for key in ("optimizer", "batch_size"):
        done[key] = [c.get("train", {}).get(key) for c in configs] or None
    done["learning_rate"] = done["learning_rate"].astype(float)
    done["parameters"] = done["parameters"].astype(float)
    return done


def image_figures(study: optuna.Study, frame: pd.DataFrame, out: Path) -> list[Path]:
    """Learning rate vs validation accuracy, accuracy vs parameters, learning curves of the top
    trials, training vs validation accuracy, parameter importances (from 4 complete trials on),
    timeline; returns the figures written."""
    done = image_frame(frame)
    if done.empty:
        return []
    floor = max(0.0, float(done["val_accuracy"].quantile(0.1)) - 0.02)
    paths = [
        _accuracy_against(
            done, "learning_rate", "peak learning rate (log scale)",
            "Learning rate vs validation accuracy, by optimiser", floor,
            out / "lr_vs_accuracy.png",
        ),
        _accuracy_vs_cost(done, floor, out / "accuracy_vs_cost.png"),
        _learning_curves(done, floor, out / "learning_curves.png"),
        _train_vs_validation(done, out / "train_vs_validation.png"),
        _importances(study, done, out / "param_importances.png"),
        _timeline(frame, out / "timeline.png"),
    ]  # fmt: skip
    return [p for p in paths if p is not None]


def _accuracy_against(
    done: pd.DataFrame, x: str, xlabel: str, title: str, floor: float, path: Path
) -> Path:
    """Last validation accuracy against column `x` (log scale); complete trials coloured by
    optimiser, pruned ones as grey crosses."""
    complete = done["state"] == "COMPLETE"
    with figure(path) as (_, ax):
        for name, group in done[complete].groupby("optimizer"):
            ax.scatter(group[x], group["val_accuracy"], s=34, label=name)
        pruned = done[done["state"] == "PRUNED"]
        if len(pruned):
            ax.scatter(pruned[x], pruned["val_accuracy"], marker="x", s=30, color="tab:gray",
                       label="pruned")  # fmt: skip
        readable_log_axis(ax.xaxis, done[x])
        ax.set_ylim(bottom=floor)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (last epoch)")
        ax.set_title(title)
        outside_legend(ax, title="optimiser")
    return path


def pareto_max(cost: pd.Series, accuracy: pd.Series) -> pd.DataFrame:
    """The trials no other beats on both counts (less cost and more accuracy), by cost."""
    points = pd.DataFrame({"cost": cost, "accuracy": accuracy}).dropna()
    points = points.sort_values(["cost", "accuracy"], ascending=[True, False])
    best = points["accuracy"].cummax()
    keep = points["accuracy"] > best.shift(1, fill_value=-np.inf)
    return points[keep.to_numpy()]


def _accuracy_vs_cost(done: pd.DataFrame, floor: float, path: Path) -> Path:
    """Validation accuracy of the trials that ran every epoch against their seconds per epoch
    and their parameters, each with its Pareto front; the baseline marked."""
    full = done[(done["state"] == "COMPLETE")].copy()
    full["seconds_per_epoch"] = full["seconds_per_epoch"].astype(float)
    base = full[full["baseline"] == True] if "baseline" in full else full.iloc[:0]  # noqa: E712
    with figure(path, 1, 2, figsize=(11, 4.2), sharey=True) as (_, axes):
        for ax, column, label in (
            (axes[0], "seconds_per_epoch", "seconds per epoch (this machine, log scale)"),
            (axes[1], "parameters", "trainable parameters (log scale)"),
        ):
            ax.scatter(full[column], full["val_accuracy"], s=30, color="tab:blue",
                       label="complete trials")  # fmt: skip
            front = pareto_max(full[column], full["val_accuracy"])
            ax.step(front["cost"], front["accuracy"], where="post", color="black",
                    linewidth=1.0, label="Pareto front")  # fmt: skip
            if len(base):
                ax.scatter(base[column], base["val_accuracy"], s=90, marker="*",
                           color="crimson", label="baseline")  # fmt: skip
            readable_log_axis(ax.xaxis, full[column])
            ax.set_xlabel(label)
        if len(full):  # fitted to the points drawn (complete trials), not to pruned ones
            low, high = float(full["val_accuracy"].min()), float(full["val_accuracy"].max())
            margin = max(0.1 * (high - low), 0.002)
            axes[0].set_ylim(low - margin, high + margin)
        axes[0].set_ylabel("validation accuracy (last epoch)")
        axes[0].set_title("Accuracy against time")
        axes[1].set_title("Accuracy against size")
        outside_legend(axes[1])
    return path


def _learning_curves(done: pd.DataFrame, floor: float, path: Path) -> Path:
    """Validation accuracy per epoch of every trial (the top 5 in colour), and the top 5's
    training against validation accuracy."""
    curves = _histories(done)
    top = done[done["state"] == "COMPLETE"].sort_values("value", ascending=False).head(5)
    with figure(path, 1, 2, figsize=(11, 4.2), sharey=True) as (_, (left, right)):
        for number in done.number:
            if int(number) in curves and number not in set(top.number):
                c = curves[int(number)]
                left.plot(c["epoch"], c["val_accuracy"], color="0.8", linewidth=0.8)
        top = top[top.number.astype(int).isin(curves)]
        for number in top.number:
            c = curves[int(number)]
            # markers: a trial of one epoch is a point, not an invisible line
            line = left.plot(c["epoch"], c["val_accuracy"], "o-", markersize=3, linewidth=1.8,
                             label=f"trial {number}")  # fmt: skip
            color = line[0].get_color()
            right.plot(c["epoch"], c["train_accuracy"], "s--", markersize=3, color=color,
                       linewidth=1.2)  # fmt: skip
            right.plot(c["epoch"], c["val_accuracy"], "o-", markersize=3, color=color,
                       linewidth=1.8)  # fmt: skip
        left.set_ylim(bottom=floor)
        for ax in (left, right):
            whole_numbers(ax.xaxis)
            ax.set_xlabel("epoch")
        left.set_ylabel("accuracy")
        left.set_title("Validation accuracy per epoch (grey: other trials)")
        if top.empty:
            empty_note(left, "no complete trial with a recorded history yet")
        else:
            right.legend(
                handles=left.get_lines()[-len(top) :], title="top 5", loc="lower right",
                fontsize=8,
            )  # fmt: skip
        right.set_title("Top 5: training (dashed) vs validation (solid)")
    return path


def _train_vs_validation(done: pd.DataFrame, path: Path) -> Path:
    finished = done[done["state"] == "COMPLETE"]
    with figure(path, figsize=(6, 5.2)) as (fig, ax):
        scatter = ax.scatter(
            finished["train_accuracy"],
            finished["val_accuracy"],
            c=np.log10(finished["parameters"]),
            cmap="viridis",
            s=36,
            edgecolors="k",
            linewidths=0.4,
        )
        low = float(min(finished["train_accuracy"].min(), finished["val_accuracy"].min())) - 0.01
        high = float(max(finished["train_accuracy"].max(), finished["val_accuracy"].max())) + 0.01
        ax.plot([low, high], [low, high], color="crimson", linestyle="--",
                label="validation = train")  # fmt: skip
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_xlabel("training accuracy (running, last epoch)")
        ax.set_ylabel("validation accuracy (last epoch)")
        ax.set_title("Do training gains carry over? (complete trials)")
        fig.colorbar(scatter, ax=ax, label="log10 parameters")
        ax.legend(loc="upper left")
    return path


IMPORTANCE_TRIALS = 30
"""Below this many complete trials the importances are drawn with a caveat: with few trials
per parameter they rank noise as much as effect."""


def _importances(study: optuna.Study, done: pd.DataFrame, path: Path) -> Path | None:
    """PED-ANOVA importances, from 4 complete trials on (None before), titled with the trial
    count and, below `IMPORTANCE_TRIALS`, a caveat."""
    complete = int((done["state"] == "COMPLETE").sum())
    if complete < 4:
        return None
    with warnings.catch_warnings():  # "few trials per regime": true, and said in the docs
        warnings.simplefilter("ignore")
        importances = optuna.importance.get_param_importances(study)
    with figure(path, figsize=(8, 0.35 * len(importances) + 1.5)) as (_, ax):
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (share of explained variance, PED-ANOVA)")
        ax.set_title(f"Parameter importances for validation accuracy ({complete} complete "
                     f"trials, {len(importances)} parameters)")  # fmt: skip
        if complete < IMPORTANCE_TRIALS:
            ax.text(0.98, 0.02, f"few trials (under {IMPORTANCE_TRIALS}): a rough guide only",
                    transform=ax.transAxes, ha="right", va="bottom", color="crimson")  # fmt: skip
    return path


def _timeline_label(state: str, rows: pd.DataFrame, waiting: int) -> str:
    """A state's legend entry; failed trials say their most common reason and how many copies
    wait re-queued (a re-queued trial has not started: it has no bar of its own)."""
    if state != "FAIL":
        return f"{state.lower()} ({len(rows)})"
    reasons = rows["fail_reason"].dropna() if "fail_reason" in rows else pd.Series(dtype=str)
    import textwrap

    text = f"fail ({len(rows)})"
    if len(reasons):
        text += ": " + textwrap.shorten(str(reasons.mode().iloc[0]), 60, placeholder="...")
    text += f"; {waiting} re-queued, not started" if waiting else ""
    return "\n".join(textwrap.wrap(text, 32))  # a legend beside the plot stays narrow


TIMELINE_COLORS = {
    "COMPLETE": "tab:blue",
    "PRUNED": "tab:orange",
    "FAIL": "tab:red",
    "RUNNING": "tab:green",
}


def _timeline(frame: pd.DataFrame, path: Path) -> Path:
    """One bar per trial from start to end, coloured by state; the legend names only the
    states that occur."""
    timed = frame.dropna(subset=["datetime_start"]).sort_values("number")
    now = pd.Timestamp.now()
    waiting = int((frame["state"] == "WAITING").sum()) if len(frame) else 0
    with figure(path, figsize=(8, max(3.0, 0.18 * len(timed) + 1.5))) as (_, ax):
        for state, rows in timed.groupby("state"):
            ends = rows["datetime_complete"].fillna(now)
            ax.barh(
                rows["number"],
                (ends - rows["datetime_start"]).dt.total_seconds() / 86400,
                left=mdates.date2num(rows["datetime_start"]),
                height=0.7,
                color=TIMELINE_COLORS.get(state, "tab:gray"),
                label=_timeline_label(state, rows, waiting),
            )
        ax.xaxis_date()
        locator = mdates.AutoDateLocator(minticks=3, maxticks=7)  # seconds to days, no repeats
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        whole_numbers(ax.yaxis)
        ax.set_xlabel("wall-clock time")
        ax.set_ylabel("trial number")
        ax.set_title("Timeline of trials")
        outside_legend(ax)
    return path


IMAGE_FIGURES = [
    ("lr_vs_accuracy.png", "Learning rate vs validation accuracy"),
    ("accuracy_vs_cost.png", "Validation accuracy against seconds per epoch and parameters"),
    ("learning_curves.png", "Learning curves of the top trials"),
    ("train_vs_validation.png", "Training vs validation accuracy"),
    ("param_importances.png", "Parameter importances"),
    ("timeline.png", "Timeline of complete and pruned trials"),
]


def _question(study: optuna.Study) -> str:
    """The first paragraph of the space's docstring (a space of one's own says its question
    there), else what every image space asks."""
    from study.errors import StudyError
    from study.studies import space_of

    try:
        doc = (space_of(study).__doc__ or "").strip()
    except (StudyError, KeyError):
        doc = ""
    first = " ".join(doc.split("\n\n")[0].split())
    return first or "which architecture and training give the best validation accuracy?"


def image_summary(
    study: optuna.Study,
    frame: pd.DataFrame,
    info: StudyInfo,
    command: str | None,
    export: dict[str, Any] | None = None,
    figures: list[Path] | None = None,
) -> str:
    """summary.md: the question, the answer (and the exported test accuracy), the budget, the
    best trials and the figures (those written)."""
    s = info.settings
    assert isinstance(s, ImageSettings)
    run = choices.stored_run(study, "image")
    space = searched(study)
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"Question: {_question(study)} Objective: accuracy on {s.validation_size} validation "
        f"images of {IMAGE_DATASETS[s.dataset]} held out of the training set (split seed "
        f"{s.split_seed}), after the last epoch. Sampler {run['sampler']}, pruner "
        f"{run['pruner']}. The test set is not used in the search.",
        "",
        f"Searched (as stored with the trials): {space}." if space else "Nothing was sampled.",
        "",
        "## Answer",
        "",
        *_answer(study, export),
        "",
        "## What the search bought",
        "",
        *_against_baseline(study, export),
        "",
        "## Budget",
        "",
        *_budget(frame, s),
        *_fidelity(study, frame, s),
        *_best_trials(frame),
        "",
        "## Figures",
        "",
    ]
    lines += figure_links(IMAGE_FIGURES, figures)
    if command:
        lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines) + "\n"


def _answer(study: optuna.Study, export: dict[str, Any] | None) -> list[str]:
    best = best_feasible(study)
    if best is None:
        return ["No complete trial yet."]
    a = best.user_attrs
    described = ImageCandidate.from_dict(a["config"]).describe()
    baseline = " (the study's enqueued baseline: the search did not beat it)"
    lines = [
        f"**Validation accuracy {best.value:.4f}**, trial {best.number}"
        f"{baseline if a.get('baseline') else ''} ({a['parameters']:,} parameters, "
        f"{a['seconds_per_epoch']:.1f} s per epoch on {a['device']}): {described}."
    ]
    if export is not None:
        trial = export.get("trial", best.number)
        changed = " (the best trial has changed since: export again)" * (trial != best.number)
        seconds = export.get("export_seconds", export.get("seconds"))
        lines += [
            "",
            f"**Test accuracy {export['test_accuracy']:.4f}** on the {export['test_images']} "
            f"test images, evaluated once, after `study export` retrained trial {trial} "
            f"on all training images ({export['epochs']} epochs, {seconds:.0f} s "
            f"on {export['device']}){changed}; it saved the weights (`model.pt`), the "
            "config (`config.json`) and these metrics (`metrics.json`).",
        ]
        accuracies = export.get("test_accuracy_seeds") or []
        if len(accuracies) > 1:
            lines += [
                "",
                f"Over {len(accuracies)} training seeds ({', '.join(map(str, export['seeds']))}"
                f"), each retrained and tested once: mean test accuracy "
                f"**{statistics.mean(accuracies):.4f}** (sd {statistics.stdev(accuracies):.4f}; "
                f"{', '.join(f'{a:.4f}' for a in accuracies)}).",
            ]
    return lines


def _against_baseline(study: optuna.Study, export: dict[str, Any] | None) -> list[str]:
    """The best trial against the study's enqueued baseline: validation, and test where both
    were exported (`study export`, `study export --baseline`)."""
    base = baseline_trial(study)
    best = best_feasible(study)
    if base is None or best is None:
        return ["No complete baseline trial to compare with."]
    gain = 100 * (best.value - base.value)
    lines = [
        f"- validation accuracy: best {best.value:.4f} (trial {best.number}) against the "
        f"baseline's {base.value:.4f} (trial {base.number}): {gain:+.2f} points"
        + (" (the best is the baseline)" if best.number == base.number else "")
    ]
    ours = (export or {}).get("test_accuracy_seeds") or []
    theirs = (stored_attrs(study).get(BASELINE_EXPORT_ATTR) or {}).get("test_accuracy_seeds") or []
    if ours and theirs:
        test_gain = 100 * (statistics.mean(ours) - statistics.mean(theirs))
        lines.append(
            f"- test accuracy, mean over training seeds: best {statistics.mean(ours):.4f} "
            f"({len(ours)} seeds) against the baseline's {statistics.mean(theirs):.4f} "
            f"({len(theirs)} seeds): {test_gain:+.2f} points"
        )
    return lines


def _fidelity(study: optuna.Study, frame: pd.DataFrame, s: ImageSettings) -> list[str]:
    """Trials per hour of the runs' wall time, and the epochs each trial reached."""
    done = image_frame(frame)
    if not len(done):
        return []
    lines = []
    seconds = run_seconds(study)
    if seconds:
        lines.append(
            f"- {len(done) / seconds * 3600:.1f} finished trials per hour of the runs' "
            f"{seconds / 60:.0f} min of wall time"
        )
    reached = done.groupby("epochs_run").size().sort_index()
    plans = stored_attrs(study).get(PLANS_ATTR) or []
    if not plans:
        lines.append(
            f"- fidelity: every trial is scheduled for {s.max_epochs} epochs; reached "
            + ", ".join(f"{int(e)} epochs: {n} trial{'s' * (n > 1)}" for e, n in reached.items())
        )
        return lines
    lines.append(
        "- fidelity: planned by the time budget (study/plan.py: successive halving over epochs, "
        "every evaluation a trial trained from scratch with its rung's epochs)"
    )
    lines += [f"  - run {i + 1}: {p.get('why', '')}" for i, p in enumerate(plans)]
    plan = Plan.from_dict({k: v for k, v in plans[-1].items() if k != "why"})
    rows = pd.DataFrame(rung_table(study, plan))
    rows["best"] = [f"{v:.4f}" if v is not None else "-" for v in rows["best"]]
    lines += ["", rows.to_markdown(index=False), ""]
    return lines


def _budget(frame: pd.DataFrame, s: ImageSettings) -> list[str]:
    counts = {state: int((frame["state"] == state).sum()) if len(frame) else 0 for state in STATES}
    lines = [
        f"- epochs {s.min_epochs}..{s.max_epochs} per trial, training seed {s.seed}",
        f"- trials: {len(frame)} in total; {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed, {counts['RUNNING']} running"
        + (f", {counts['WAITING']} waiting (re-queued)" if counts["WAITING"] else ""),
    ]
    failed = frame[frame["state"] == "FAIL"]
    if len(failed) and "fail_reason" in failed:
        lines += [
            f"  - trial {n} failed: {r}"
            for n, r in zip(failed.number, failed.fail_reason, strict=True)
        ]
    done = image_frame(frame)
    if len(done):
        span = frame["datetime_complete"].max() - frame["datetime_start"].min()
        devices = ", ".join(sorted(set(done["device"].dropna().astype(str))))
        lines += [
            f"- {int(done['epochs_run'].sum())} epochs trained in all; wall time "
            f"{span.total_seconds() / 60:.0f} min from the first trial's start to the last "
            f"one's end, on {devices}",
            f"- trained by: {engines(frame)}",
        ]
    return lines


def _best_trials(frame: pd.DataFrame) -> list[str]:
    done = image_frame(frame)
    if not len(done):
        return []
    top = done[done["state"] == "COMPLETE"].sort_values("value", ascending=False).head(8)
    baselines = top["baseline"] if "baseline" in top else [None] * len(top)
    shown = pd.DataFrame(
        {
            "trial": top["number"],
            "val_accuracy": top["value"].round(4),
            "train_accuracy": top["train_accuracy"].round(4),
            "parameters": top["parameters"].astype(int),
            "epochs": top["epochs_run"],
            "s/epoch": top["seconds_per_epoch"].astype(float).round(1),
            "configuration": [
                ImageCandidate.from_dict(json.loads(c)).describe()
                + (" (baseline)" if b is True else "")
                for c, b in zip(top["config"], baselines, strict=True)
            ],
        }
    )
    return ["", "## Best trials", "", markdown_table(shown), ""]
