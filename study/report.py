"""Reports from a stored study: a pandas table of trials, a summary and matplotlib figures.

This module only reads a storage. `write_report` puts `trials.csv`, `summary.md` and PNG
figures under `results/<study>/`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files, not windows; notebooks display the saved figures or call these
import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd

from study.runner import KIND_ATTR, SETTINGS_ATTR, best_feasible
from study.storage import load_study, open_storage

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


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


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Boolean studies


def pareto_front(neurons: pd.Series, loss: pd.Series) -> pd.DataFrame:
    """The non-dominated (neurons, loss) points, by increasing neurons (decreasing loss)."""
    points = pd.DataFrame({"neurons": neurons, "median_best_loss": loss}).dropna()
    points = points.sort_values(["neurons", "median_best_loss"])
    best = points["median_best_loss"].cummin()
    keep = points["median_best_loss"] < best.shift(1, fill_value=np.inf)
    return points[keep.to_numpy()]


def boolean_figures(frame: pd.DataFrame, settings: dict[str, Any], out: Path) -> list[Path]:
    """Neurons vs best loss, success share vs width, best feasible width over trials."""
    done = frame[frame["state"].isin(["COMPLETE", "PRUNED"])].copy()
    if done.empty or "neurons" not in done:
        return []
    target = settings["target_loss"]
    required = settings["required_share"]
    done["median_best_loss"] = done["median_best_loss"].astype(float)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    scatter = ax.scatter(
        done["neurons"],
        done["median_best_loss"],
        c=done["success_share"].astype(float),
        cmap="viridis",
        vmin=0,
        vmax=1,
        s=36,
        edgecolors="k",
        linewidths=0.4,
    )
    ax.axhline(target, color="crimson", linestyle="--", label=f"target loss {target:g}")
    front = pareto_front(done["neurons"], done["median_best_loss"])
    ax.step(
        front["neurons"],
        front["median_best_loss"],
        where="post",
        color="black",
        linewidth=1.0,
        label="Pareto front (no trial has fewer neurons and lower loss)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hidden neurons (sum of widths)")
    ax.set_ylabel("median best full-table loss (mean BCE)")
    ax.set_title("Hidden neurons vs best loss, one point per trial")
    fig.colorbar(scatter, ax=ax, label="success share of seeds")
    ax.legend(loc="center left", fontsize=8)
    paths.append(_save(fig, out / "neurons_vs_loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    jitter = np.random.default_rng(0).uniform(-0.02, 0.02, len(done))
    ax.scatter(
        done["neurons"],
        done["success_share"].astype(float) + jitter,
        c=np.where(done["state"] == "PRUNED", "tab:gray", "tab:blue"),
        s=30,
    )
    ax.axhline(required, color="crimson", linestyle="--", label=f"required share {required:.0%}")
    ax.set_xscale("log")
    ax.set_ylim(-0.08, 1.08)
    ax.set_xlabel("hidden neurons (sum of widths)")
    ax.set_ylabel("share of seeds that learned f")
    ax.set_title("Success share vs width (grey: pruned trials)")
    ax.legend(loc="lower right")
    paths.append(_save(fig, out / "success_share_vs_width.png"))

    order = frame.sort_values("number")
    best, history = None, []
    for _, row in order.iterrows():
        if row["state"] == "COMPLETE" and bool(row.get("learns_f")):
            best = row["neurons"] if best is None else min(best, row["neurons"])
        history.append(best)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(order["number"], [np.nan if b is None else b for b in history], where="post")
    feasible = order[(order["state"] == "COMPLETE") & order.get("learns_f", False).astype(bool)]
    ax.scatter(
        feasible["number"], feasible["neurons"], s=14, color="tab:green", label="feasible trials"
    )
    ax.set_xlabel("trial number")
    ax.set_ylabel("hidden neurons")
    ax.set_title("Best feasible width so far")
    ax.legend(loc="upper right")
    paths.append(_save(fig, out / "best_width_history.png"))
    return paths


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


def boolean_summary(
    study: optuna.Study,
    frame: pd.DataFrame,
    settings: dict[str, Any],
    command: str | None,
    certification: str | None = None,
) -> str:
    counts = {s: int((frame["state"] == s).sum()) if len(frame) else 0 for s in STATES}
    best = best_feasible(study)
    s = settings
    lines = [f"# Study `{study.study_name}`", ""]
    doc = (study.user_attrs.get(KIND_ATTR) or "").replace("-", " ")
    lines += [
        f"Question ({doc}): the least number of hidden ReLU neurons with which the network "
        f"learns a random Boolean function {{0,1}}^{s['input_bits']} -> "
        f"{{0,1}}^{s['output_bits']} (function seed {s['function_seed']}) to a full-table "
        f"mean BCE of at most {s['target_loss']:g} with every bit right, on at least "
        f"{s['required_share']:.0%} of {s['seeds']} initialisation seeds.",
        "",
        "## Answer",
        "",
    ]
    if best is None:
        lines.append("No feasible configuration found yet.")
    else:
        a = best.user_attrs
        profile = "-".join(map(str, a["hidden_layer_profile"]))
        lines += [
            f"**{a['neurons']} hidden neurons** (profile [{profile}], {a['parameters']} "
            f"parameters), trial {best.number}: learning rate "
            f"{best.params['learning_rate']:.3g}, batch {best.params['batch_size']}, "
            f"budget {best.params['epochs']} epochs; success share {a['success_share']:.0%}, "
            f"median best loss {a['median_best_loss']:.3g}.",
            "",
            "This is an upper bound found by the search under the budget below, on "
            f"{s['seeds']} seeds; `study certify` retrains it, the next smaller configuration "
            "and the runners-up on fresh seeds (see Certification).",
        ]
    lines += [
        "",
        "## Budget",
        "",
        f"- Adam, fp32, full truth table ({2 ** s['input_bits']} rows); learning rate "
        f"{s['min_learning_rate']:g}..{s['max_learning_rate']:g} (log), batch sizes "
        f"{s['batch_sizes']}, epochs {max(1, s['max_epochs'] // 4)}..{s['max_epochs']} "
        "(log), stop at the target",
        f"- widths {s['min_width']}..{s['max_width']} per layer, "
        f"{s['min_layers']}..{s['max_layers']} hidden layers",
        f"- {s['seeds']} seeds per trial; early-stop rule: {'on' if s['prune'] else 'off'}",
        f"- trials: {len(frame)} in total; {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed, {counts['RUNNING']} running",
    ]
    if len(frame) and "device" in frame:
        span = frame["datetime_complete"].max() - frame["datetime_start"].min()
        population = (
            f"; trained in populations of up to {int(frame['population_size'].max())} networks"
            if "population_size" in frame and frame["population_size"].notna().any()
            else ""
        )
        devices = ", ".join(sorted(set(frame["device"].dropna().astype(str))))
        lines.append(
            f"- wall time {span.total_seconds() / 60:.0f} min from the first trial's start to "
            f"the last one's end, on {devices}{population}"
        )
    feasible = frame[(frame["state"] == "COMPLETE") & frame.get("learns_f", False).astype(bool)]
    if len(feasible):
        top = feasible.sort_values(["neurons", "median_best_loss"]).head(8)
        cols = [c for c in top.columns if c.startswith("param_")]
        shown = top[
            ["number", "neurons", "parameters", "success_share", "median_best_loss", *cols]
        ]
        lines += [
            "",
            "## Smallest feasible trials",
            "",
            markdown_table(shown),
            "",
        ]
    if certification is not None:
        lines += ["", "## Certification", "", certification.strip(), ""]
    lines += ["", "## Figures", ""]
    for name, title in [
        ("neurons_vs_loss.png", "Hidden neurons vs best loss"),
        ("success_share_vs_width.png", "Success share vs width"),
        ("best_width_history.png", "Best feasible width over trials"),
    ]:
        lines.append(f"![{title}]({name})")
    if command:
        lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines) + "\n"


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
    """Finished trials with the columns the image figures use: optimiser, learning rate,
    parameters, last validation and training accuracy, epochs run."""
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
    done["learning_rate"] = done["learning_rate"].astype(float)
    done["parameters"] = done["parameters"].astype(float)
    return done


def image_figures(study: optuna.Study, frame: pd.DataFrame, out: Path) -> list[Path]:
    """Learning rate vs validation accuracy, accuracy vs parameters, learning curves of the top
    trials, training vs validation accuracy, parameter importances, timeline."""
    done = image_frame(frame)
    if done.empty:
        return []
    paths = []
    complete = done["state"] == "COMPLETE"
    floor = max(0.0, float(done["val_accuracy"].quantile(0.1)) - 0.02)

    def accuracy_against(x: str, xlabel: str, title: str, filename: str, legend: str) -> Path:
        """Last validation accuracy against column `x` (log scale); complete trials coloured
        by optimiser, pruned ones as grey crosses."""
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, group in done[complete].groupby("param_optimizer"):
            ax.scatter(group[x], group["val_accuracy"], s=34, label=name)
        pruned = done[done["state"] == "PRUNED"]
        if len(pruned):
            ax.scatter(pruned[x], pruned["val_accuracy"], marker="x", s=30, color="tab:gray",
                       label="pruned")  # fmt: skip
        ax.set_xscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (last epoch)")
        ax.set_title(title)
        ax.legend(title="optimiser", loc=legend)
        return _save(fig, out / filename)

    paths.append(
        accuracy_against(
            "learning_rate",
            "peak learning rate (log scale)",
            "Learning rate vs validation accuracy, by optimiser",
            "lr_vs_accuracy.png",
            "lower left",
        )
    )
    paths.append(
        accuracy_against(
            "parameters",
            "trainable parameters (log scale)",
            "Validation accuracy vs model size",
            "accuracy_vs_parameters.png",
            "lower right",
        )
    )

    curves = _histories(done)
    top = done[complete].sort_values("value", ascending=False).head(5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for number in done.number:
        if int(number) in curves and number not in set(top.number):
            c = curves[int(number)]
            left.plot(c["epoch"], c["val_accuracy"], color="0.8", linewidth=0.8)
    for number in top.number:
        c = curves[int(number)]
        line = left.plot(c["epoch"], c["val_accuracy"], linewidth=1.8, label=f"trial {number}")
        color = line[0].get_color()
        right.plot(c["epoch"], c["train_accuracy"], "--", color=color, linewidth=1.2)
        right.plot(c["epoch"], c["val_accuracy"], color=color, linewidth=1.8)
    left.set_ylim(bottom=floor)
    left.set_xlabel("epoch")
    left.set_ylabel("accuracy")
    left.set_title("Validation accuracy per epoch (grey: other trials)")
    right.legend(
        handles=left.get_lines()[-len(top) :], title="top 5", loc="lower right", fontsize=8
    )
    right.set_xlabel("epoch")
    right.set_title("Top 5: training (dashed) vs validation (solid)")
    paths.append(_save(fig, out / "learning_curves.png"))

    fig, ax = plt.subplots(figsize=(6, 5.2))
    finished = done[complete]
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
    ax.plot([low, high], [low, high], color="crimson", linestyle="--", label="validation = train")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("training accuracy (running, last epoch)")
    ax.set_ylabel("validation accuracy (last epoch)")
    ax.set_title("Do training gains carry over? (complete trials)")
    fig.colorbar(scatter, ax=ax, label="log10 parameters")
    ax.legend(loc="upper left")
    paths.append(_save(fig, out / "train_vs_validation.png"))

    if int(complete.sum()) >= 4:
        from optuna.visualization.matplotlib import plot_param_importances

        with warnings.catch_warnings():  # "few trials per regime": true, and said in the docs
            warnings.simplefilter("ignore")
            importances = plot_param_importances(study)
        fig = importances.figure
        fig.set_size_inches(8, 5)
        importances.set_title("", loc="left")  # Optuna's own title would overlap ours
        importances.set_title("Parameter importances for validation accuracy (PED-ANOVA)")
        importances.set_xlabel("importance (share of explained variance)")
        importances.set_ylabel("parameter")
        if importances.get_legend() is not None:
            importances.get_legend().remove()
        paths.append(_save(fig, out / "param_importances.png"))

    from optuna.visualization.matplotlib import plot_timeline

    timeline = plot_timeline(study)
    fig = timeline.figure
    fig.set_size_inches(8, max(3.0, 0.18 * len(frame) + 1.5))
    timeline.set_title("", loc="left")
    timeline.set_title("Timeline of trials (complete vs pruned)")
    timeline.set_xlabel("wall-clock time")
    timeline.set_ylabel("trial number")
    paths.append(_save(fig, out / "timeline.png"))
    return paths


IMAGE_FIGURES = [
    ("lr_vs_accuracy.png", "Learning rate vs validation accuracy"),
    ("accuracy_vs_parameters.png", "Validation accuracy vs parameters"),
    ("learning_curves.png", "Learning curves of the top trials"),
    ("train_vs_validation.png", "Training vs validation accuracy"),
    ("param_importances.png", "Parameter importances"),
    ("timeline.png", "Timeline of complete and pruned trials"),
]


def image_summary(
    study: optuna.Study,
    frame: pd.DataFrame,
    settings: dict[str, Any],
    command: str | None,
    export: dict[str, Any] | None = None,
) -> str:
    from study.config import ImageCandidate

    counts = {s: int((frame["state"] == s).sum()) if len(frame) else 0 for s in STATES}
    kind = study.user_attrs.get(KIND_ATTR, "")
    model = "convolutional networks" if kind.endswith("cnn") else "multilayer perceptrons"
    dataset = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[settings["dataset"]]
    s = settings
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"Question: which training (optimiser, learning rate, schedule, batch size, epochs, "
        f"weight decay) and which architecture give {model} the best accuracy on {dataset}? "
        f"Objective: accuracy on {s['validation_size']} validation images held out of the "
        f"training set (split seed {s['split_seed']}), after the last epoch; a median pruner "
        "stops trials below the median of earlier ones. The test set is not used in the search.",
        "",
        "## Answer",
        "",
    ]
    best = best_feasible(study)
    if best is None:
        lines.append("No complete trial yet.")
    else:
        a = best.user_attrs
        described = ImageCandidate.from_dict(a["config"]).describe()
        baseline = " (the study's enqueued baseline: the search did not beat it)"
        lines.append(
            f"**Validation accuracy {best.value:.4f}**, trial {best.number}"
            f"{baseline if a.get('baseline') else ''} ({a['parameters']:,} parameters, "
            f"{a['seconds_per_epoch']:.1f} s per epoch on {a['device']}): {described}."
        )
        if export is not None:
            lines += [
                "",
                f"**Test accuracy {export['test_accuracy']:.4f}** on the {export['test_images']} "
                f"test images, evaluated once, after `study export` retrained this configuration "
                f"on all training images ({export['epochs']} epochs, {export['seconds']:.0f} s "
                f"on {export['device']}); weights `model.pt`, config `config.json`, metrics "
                "`metrics.json` in this directory.",
            ]
    lines += [
        "",
        "## Budget",
        "",
        f"- epochs {s['min_epochs']}..{s['max_epochs']} per trial, training seed {s['seed']}",
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
        lines.append(
            f"- {int(done['epochs_run'].sum())} epochs trained in all; wall time "
            f"{span.total_seconds() / 60:.0f} min from the first trial's start to the last "
            f"one's end, on {devices}"
        )
        top = done[done["state"] == "COMPLETE"].sort_values("value", ascending=False).head(8)
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
                    for c, b in zip(
                        top["config"], top.get("baseline", [None] * len(top)), strict=True
                    )
                ],
            }
        )
        lines += ["", "## Best trials", "", markdown_table(shown), ""]
    lines += ["", "## Figures", ""]
    lines += [f"![{title}]({name})" for name, title in IMAGE_FIGURES]
    if command:
        lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines) + "\n"


def write_report(
    study_name: str,
    storage: str,
    out_dir: Path | str | None = None,
    command: str | None = None,
) -> Path:
    """Write trials.csv, summary.md and figures for a stored study; return the directory."""
    study = load_study(study_name, open_storage(storage, heartbeat=False))
    out = Path(out_dir) if out_dir is not None else Path("results") / study_name
    out.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study)
    frame.to_csv(out / "trials.csv", index=False)
    settings = study.user_attrs.get(SETTINGS_ATTR, {})
    if settings.get("dataset") is not None:  # an image study
        image_figures(study, frame, out)
        metrics = out / "metrics.json"  # written by `study export` into the same directory
        export = json.loads(metrics.read_text()) if metrics.is_file() else None
        (out / "summary.md").write_text(image_summary(study, frame, settings, command, export))
        return out
    boolean_figures(frame, settings, out)
    # a certification written earlier into the same directory becomes part of the summary
    cert_path = out / "certification.md"
    certification = None
    if cert_path.is_file():
        certification = cert_path.read_text().split("\n", 1)[1]  # without its own title
    summary = boolean_summary(study, frame, settings, command, certification)
    (out / "summary.md").write_text(summary)
    return out
