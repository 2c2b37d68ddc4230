"""Reports from a stored study: a pandas table of trials, a summary and matplotlib figures.

This module only reads a storage. `write_report` puts `trials.csv`, `summary.md` and PNG
figures under `results/<study>/`.
"""

from __future__ import annotations

import json
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
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hidden neurons (sum of widths)")
    ax.set_ylabel("median best full-table loss (mean BCE)")
    ax.set_title("Hidden neurons vs best loss, one point per trial")
    fig.colorbar(scatter, ax=ax, label="success share of seeds")
    ax.legend(loc="upper right")
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
    boolean_figures(frame, settings, out)
    # a certification written earlier into the same directory becomes part of the summary
    cert_path = out / "certification.md"
    certification = None
    if cert_path.is_file():
        certification = cert_path.read_text().split("\n", 1)[1]  # without its own title
    summary = boolean_summary(study, frame, settings, command, certification)
    (out / "summary.md").write_text(summary)
    return out
