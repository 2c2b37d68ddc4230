"""The report of a Boolean width study: its answer, budget, smallest feasible trials, and the
figures neurons vs loss, success share vs width, best width over trials."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from study.certify import candidate_from_trial
from study.config import BOOLEAN_OPTIMIZER, BooleanSettings
from study.studies import StudyInfo, best_feasible, stored_attrs
from study.tables import (
    STATES,
    empty_note,
    engines,
    figure,
    figure_links,
    markdown_table,
    outside_legend,
    searched,
    whole_numbers,
)

# ----------------------------------------------------------------------------------------------
# Boolean studies


BOOLEAN_FIGURES = [
    ("neurons_vs_loss.png", "Hidden neurons vs best loss"),
    ("success_share_vs_width.png", "Success share vs width"),
    ("best_width_history.png", "Best feasible width over trials"),
]


def pareto_front(neurons: pd.Series, loss: pd.Series) -> pd.DataFrame:
    """The non-dominated (neurons, loss) points, by increasing neurons (decreasing loss)."""
    points = pd.DataFrame({"neurons": neurons, "median_best_loss": loss}).dropna()
    points = points.sort_values(["neurons", "median_best_loss"])
    best = points["median_best_loss"].cummin()
    keep = points["median_best_loss"] < best.shift(1, fill_value=np.inf)
    return points[keep.to_numpy()]


def boolean_figures(frame: pd.DataFrame, settings: BooleanSettings, out: Path) -> list[Path]:
    """Neurons vs best loss, success share vs width, best feasible width over trials."""
    done = frame[frame["state"].isin(["COMPLETE", "PRUNED"])].copy()
    if done.empty or "neurons" not in done:
        return []
    done["median_best_loss"] = done["median_best_loss"].astype(float)
    return [
        _neurons_vs_loss(done, settings.target_loss, out / "neurons_vs_loss.png"),
        _success_share(done, settings.required_rate, out / "success_share_vs_width.png"),
        _best_width_history(frame, out / "best_width_history.png"),
    ]


def _neurons_vs_loss(done: pd.DataFrame, target: float, path: Path) -> Path:
    with figure(path) as (fig, ax):
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
        whole_numbers(ax.xaxis)
        ax.set_xlabel("hidden neurons (sum of widths)")
        ax.set_ylabel("median best full-table loss (mean BCE)")
        ax.set_title("Hidden neurons vs best loss, one point per trial")
        fig.colorbar(scatter, ax=ax, label="success share of seeds")
        # below the axes: beside them stands the colour bar
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8,
                  frameon=False)  # fmt: skip
    return path


def _success_share(done: pd.DataFrame, required: float, path: Path) -> Path:
    with figure(path) as (_, ax):
        # jitter towards the inside, so that no point sits outside [0, 1]
        share = done["success_share"].astype(float).to_numpy()
        jitter = np.abs(np.random.default_rng(0).uniform(0.0, 0.025, len(done)))
        jittered = np.where(share >= 0.5, share - jitter, share + jitter)
        for state, color in (("COMPLETE", "tab:blue"), ("PRUNED", "tab:gray")):
            mask = (done["state"] == state).to_numpy()
            if mask.any():
                ax.scatter(
                    done["neurons"][mask], jittered[mask], color=color, s=30, label=state.lower()
                )
        ax.axhline(
            required, color="crimson", linestyle="--", label=f"required share {required:.0%}"
        )
        ax.set_xscale("log")
        whole_numbers(ax.xaxis)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("hidden neurons (sum of widths)")
        ax.set_ylabel("share of seeds that learned f")
        ax.set_title("Success share vs width")
        outside_legend(ax)
    return path


def _best_width_history(frame: pd.DataFrame, path: Path) -> Path:
    order = frame.sort_values("number")
    best, history = None, []
    for _, row in order.iterrows():
        if row["state"] == "COMPLETE" and bool(row.get("learns_f")):
            best = row["neurons"] if best is None else min(best, row["neurons"])
        history.append(best)
    with figure(path, figsize=(7, 4)) as (_, ax):
        ax.step(order["number"], [np.nan if b is None else b for b in history], where="post")
        feasible = order[
            (order["state"] == "COMPLETE") & order.get("learns_f", False).astype(bool)
        ]
        ax.scatter(
            feasible["number"],
            feasible["neurons"],
            s=14,
            color="tab:green",
            label="feasible trials",
        )
        whole_numbers(ax.xaxis)
        whole_numbers(ax.yaxis)
        ax.set_xlabel("trial number")
        ax.set_ylabel("hidden neurons")
        ax.set_title("Best feasible width so far")
        if feasible.empty:
            empty_note(ax, "no trial has learned f yet")
        else:
            outside_legend(ax)
    return path


def boolean_summary(
    study: optuna.Study,
    frame: pd.DataFrame,
    info: StudyInfo,
    command: str | None,
    certification: str | None = None,
    figures: list[Path] | None = None,
) -> str:
    """summary.md: the question, the answer, the budget, the smallest feasible trials, the
    certification and the figures (those written)."""
    s = info.settings
    assert isinstance(s, BooleanSettings)
    doc = info.space.replace("-", " ")
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"Question ({doc}): the least number of hidden ReLU neurons with which the network "
        f"learns a random Boolean function {{0,1}}^{s.input_bits} -> "
        f"{{0,1}}^{s.output_bits} (function seed {s.function_seed}) to a full-table "
        f"mean BCE of at most {s.target_loss:g} with every bit right, on at least "
        f"{s.required_rate:.0%} of {s.seeds} initialisation seeds.",
        "",
        "## Answer",
        "",
        *_answer(study, s),
        "",
        "## Budget",
        "",
        *_budget(study, frame, s),
        *_smallest_feasible(frame),
    ]
    if certification is not None:
        lines += ["", "## Certification", "", certification.strip(), ""]
    lines += ["", "## Figures", ""]
    lines += figure_links(BOOLEAN_FIGURES, figures)
    if command:
        lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines) + "\n"


def _answer(study: optuna.Study, s: BooleanSettings) -> list[str]:
    best = best_feasible(study)
    if best is None:
        return ["No feasible configuration found yet."]
    a = best.user_attrs
    recipe = candidate_from_trial(best)
    profile = "-".join(map(str, a["hidden_layer_profile"]))
    return [
        f"**{a['neurons']} hidden neurons** (profile [{profile}], {a['parameters']} "
        f"parameters), trial {best.number}: learning rate "
        f"{recipe.learning_rate:.3g}, batch {recipe.batch_size}, "
        f"budget {recipe.epochs} epochs; success share {a['success_share']:.0%}, "
        f"median best loss {a['median_best_loss']:.3g}.",
        "",
        "This is an upper bound found by the search under the budget below, on "
        f"{s.seeds} seeds; `study certify` retrains it, the next smaller configuration "
        "and the runners-up on fresh seeds (see Certification).",
    ]


def _budget(study: optuna.Study, frame: pd.DataFrame, s: BooleanSettings) -> list[str]:
    """What this study searched and trained, from its stored distributions and the recipes its
    trials stored (never from the built-in spaces' defaults: a space of one's own that fixes
    the batch or the depth is described as it ran)."""
    counts = {state: int((frame["state"] == state).sum()) if len(frame) else 0 for state in STATES}
    lines = [
        f"- {BOOLEAN_OPTIMIZER.capitalize()}, fp32, full truth table ({2**s.input_bits} rows), "
        f"stop at the target; searched: {searched(study) or 'nothing sampled yet'}",
    ]
    trained = _as_trained(study)
    if trained:
        lines.append(f"- as trained: {trained}")
    lines += [
        f"- {s.seeds} seeds per trial; early-stop rule: {'on' if s.prune else 'off'}; sampler "
        f"{stored_attrs(study).get('run', {}).get('sampler', 'tpe')}",
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
        lines.append(f"- trained by: {engines(frame)}")
    return lines


def _as_trained(study: optuna.Study) -> str:
    """Depths, batch sizes, epoch budgets and schedules of the trials that trained, each a
    fixed value or the values seen: "1 hidden layer; batch 16; 400 epochs; schedule constant"."""
    seen: dict[str, set] = {"depth": set(), "batch": set(), "epochs": set(), "schedule": set()}
    for trial in study.get_trials(deepcopy=False):
        if "hidden_layer_profile" not in trial.user_attrs:
            continue
        recipe = candidate_from_trial(trial)
        seen["depth"].add(len(recipe.hidden_layer_profile))
        seen["batch"].add(recipe.batch_size)
        seen["epochs"].add(recipe.epochs)
        seen["schedule"].add(recipe.lr_schedule)
    if not seen["depth"]:
        return ""

    def values(key: str) -> str:
        found = sorted(seen[key])
        if key != "schedule" and len(found) > 4:
            return f"{found[0]}..{found[-1]}"
        return "|".join(map(str, found))

    depth = values("depth")
    layers = "hidden layer" if seen["depth"] == {1} else "hidden layers"
    return (f"{depth} {layers}; batch {values('batch')}; {values('epochs')} epochs; "
            f"schedule {values('schedule')}")  # fmt: skip


def _smallest_feasible(frame: pd.DataFrame) -> list[str]:
    feasible = frame[(frame["state"] == "COMPLETE") & frame.get("learns_f", False).astype(bool)]
    if not len(feasible):
        return []
    top = feasible.sort_values(["neurons", "median_best_loss"]).head(8)
    cols = [c for c in top.columns if c.startswith("param_")]
    shown = top[["number", "neurons", "parameters", "success_share", "median_best_loss", *cols]]
    return ["", "## Smallest feasible trials", "", markdown_table(shown), ""]
