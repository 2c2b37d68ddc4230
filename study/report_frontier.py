"""The frontier report: the fewest certified neurons per epoch budget and depth.

Reads the answers that `study frontier run` stored with its cells (studies named
frontier-f<seed>-d<depth>-b<budget>) and writes `summary.md`, `frontier.png` and the
machine-readable `answers.json`. Only reads the store.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows; notebooks display the saved figures
import matplotlib.pyplot as plt
import optuna
import pandas as pd

from study.storage import open_storage, study_names
from study.tables import markdown_table, save_figure

CELL = re.compile(r"^frontier-f(\d+)-d(\d+)-b(\d+)$")
BITS = 2048
"""Random bits of f: 2^8 rows x 8 outputs."""


def frontier_answers(storage_url: str) -> list[dict]:
    """Every answer stored in the store's frontier cells, by function seed, depth, budget.
    Only confirmed answers: a cell whose chosen width has not been confirmed on a fresh block
    yet (a run that stopped between stages 3 and 4) states nothing."""
    storage = open_storage(storage_url, heartbeat=False)
    answers = []
    for name in study_names(storage):
        if CELL.match(name):
            answer = optuna.load_study(study_name=name, storage=storage).user_attrs.get("answer")
            if answer is not None and "chosen_on" in answer:  # confirmed on a fresh block
                answers.append(answer)
    return sorted(answers, key=lambda a: (a["function_seed"], a["depth"], a["budget_epochs"]))


def _rate(a: dict) -> str:
    low, high = a["interval_95"]
    return f"{a['heldout_successes']}/{a['heldout_seeds']} ({low:.2f}..{high:.2f})"


def _chosen(a: dict) -> str:
    chosen = a.get("chosen_on")
    return f"{chosen['heldout_successes']}/{chosen['heldout_seeds']}" if chosen else ""


def _next_smaller(a: dict) -> str:
    """The next smaller width's rate on the block where it failed (the choice block, or the
    fresh block it moved down to after passing on the choice block)."""
    smaller = a.get("next_smaller")
    if not smaller:
        return ""
    fresh = a.get("next_smaller_fresh_block")
    if fresh:
        return (
            f"{smaller['neurons']}: {fresh['heldout_successes']}/{fresh['heldout_seeds']} on a "
            f"fresh block ({smaller['heldout_successes']}/{smaller['heldout_seeds']} on the "
            "choice block)"
        )
    return f"{smaller['neurons']}: {_rate(smaller)}"


def _pooled(a: dict) -> str:
    pooled = a.get("all_heldout")
    return f"{pooled['heldout_successes']}/{pooled['heldout_seeds']}" if pooled else ""


def frontier_table(answers: list[dict], function_seed: int = 0) -> pd.DataFrame:
    """One row per budget and depth of one function: the answer and the next smaller width."""
    rows = []
    for a in answers:
        if a["function_seed"] != function_seed:
            continue
        rows.append(
            {
                "budget": a["budget_epochs"],
                "depth": a["depth"],
                "neurons": a["neurons"],
                "profile": "-".join(map(str, a["profile"])),
                "parameters": a["parameters"],
                "confirmed (95%)": _rate(a),
                "chosen on": _chosen(a),
                "all held-out": _pooled(a),
                "next smaller": _next_smaller(a),
                "bits/parameter": round(a.get("table_bits", BITS) / a["parameters"], 2),
                "recipe": f"lr {a['recipe']['learning_rate']:.3g}, batch "
                f"{a['recipe']['batch_size']}, {a['recipe']['lr_schedule']}",
            }
        )
    return pd.DataFrame(rows)


def headline_table(answers: list[dict], function_seed: int = 0) -> pd.DataFrame:
    """Per budget: w_1 (one hidden layer) and w_2 (the best of 2, 3 and 4 layers), each with
    its parameters and confirmed held-out rate; a depth not yet answered is named."""
    by_budget: dict[int, dict[int, dict]] = {}
    for a in answers:
        if a["function_seed"] == function_seed:
            by_budget.setdefault(a["budget_epochs"], {})[a["depth"]] = a

    def cell(a: dict | None) -> str:
        if a is None:
            return ""
        low, high = a["interval_95"]
        return (
            f"**{a['neurons']}** ({'-'.join(map(str, a['profile']))}; {a['parameters']} "
            f"parameters; {a['heldout_successes']}/{a['heldout_seeds']}, {low:.2f}..{high:.2f})"
        )

    rows = []
    for budget, cells in sorted(by_budget.items()):
        deep = [a for d, a in cells.items() if d > 1]
        best = min(deep, key=lambda a: (a["neurons"], a["parameters"])) if deep else None
        missing = [str(d) for d in (2, 3, 4) if d not in cells]
        rows.append(
            {
                "epoch budget": budget,
                "w_1 (1 layer)": cell(cells.get(1)),
                "w_2 (best of 2-4 layers)": cell(best),
                "depths searched": ", ".join(str(d) for d in sorted(cells))
                + (f" (not yet: {', '.join(missing)})" if missing else ""),
            }
        )
    return pd.DataFrame(rows)


def depth_conclusions(answers: list[dict], function_seed: int = 0) -> list[str]:
    """Per budget: does depth (the best of 2, 3, 4 layers) save neurons? parameters?"""
    lines = []
    by_budget: dict[int, dict[int, dict]] = {}
    for a in answers:
        if a["function_seed"] == function_seed:
            by_budget.setdefault(a["budget_epochs"], {})[a["depth"]] = a
    for budget, cells in sorted(by_budget.items()):
        deep = [a for d, a in cells.items() if d > 1]
        if 1 not in cells or not deep:
            continue
        one = cells[1]
        best = min(deep, key=lambda a: (a["neurons"], a["parameters"]))
        fewest_parameters = min(deep, key=lambda a: a["parameters"])
        saved = one["neurons"] - best["neurons"]
        lines.append(
            f"- {budget} epochs: one layer {one['neurons']} neurons ({one['parameters']} "
            f"parameters); best deep {best['neurons']} neurons in {best['depth']} layers "
            f"({best['parameters']} parameters): depth "
            + (f"saves {saved} neurons" if saved > 0 else f"saves no neurons ({-saved} more)")
            + "; "
            + (
                f"the fewest parameters are deep ({fewest_parameters['parameters']} in "
                f"{fewest_parameters['depth']} layers)"
                if fewest_parameters["parameters"] < one["parameters"]
                else "one layer needs the fewest parameters"
            )
        )
    return lines


def function_spread(answers: list[dict]) -> pd.DataFrame:
    """Where several functions were answered at one budget and depth: mean, min, max."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for a in answers:
        groups.setdefault((a["budget_epochs"], a["depth"]), []).append(a)
    rows = [
        {
            "budget": budget,
            "depth": depth,
            "functions": len(cell),
            "neurons mean": round(statistics.mean(a["neurons"] for a in cell), 1),
            "min": min(a["neurons"] for a in cell),
            "max": max(a["neurons"] for a in cell),
            "function seeds": ", ".join(str(a["function_seed"]) for a in cell),
        }
        for (budget, depth), cell in sorted(groups.items())
        if len(cell) > 1
    ]
    return pd.DataFrame(rows)


def theory(answers: list[dict]) -> list[str]:
    """The answers next to the capacity bound: a linear threshold unit stores about two random
    bits per weight (Cover, 1965), so f's random bits need about half as many parameters."""
    if not answers:
        return []
    most = max(answers, key=lambda a: a.get("table_bits", BITS) / a["parameters"])
    bits = most.get("table_bits", BITS)
    # one hidden layer of w units has (n + 1) w + (w + 1) m parameters; n = m = 8 here
    bound_width = math.ceil((bits / 2 - 8) / 17)
    return [
        "## Next to theory",
        "",
        f"f is {bits} random bits. A linear threshold unit stores about two random bits per "
        f"weight (Cover, 1965), so a network needs on the order of {bits // 2} parameters to "
        f"hold f: with 17 w + 8 parameters, one hidden layer needs w >= ~{bound_width}. "
        "256 neurons always suffice (one ReLU unit per vertex of the cube). The most economical "
        f"answer here, {most['neurons']} neurons in {most['depth']} layer(s) at "
        f"{most['budget_epochs']} epochs ({most['parameters']} parameters), stores "
        f"{bits / most['parameters']:.2f} bits per parameter; the bits/parameter column shows "
        "how close each budget comes to that capacity.",
        "",
    ]


def frontier_figure(answers: list[dict], out: Path, function_seed: int = 0) -> Path | None:
    """Neurons and parameters against the budget, one line per depth."""
    table = frontier_table(answers, function_seed)
    if table.empty:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for depth, rows in table.groupby("depth"):
        rows = rows.sort_values("budget")
        label = "1 hidden layer" if depth == 1 else f"{depth} hidden layers"
        left.plot(rows["budget"], rows["neurons"], marker="o", label=label)
        right.plot(rows["budget"], rows["parameters"], marker="o", label=label)
    budgets = sorted(table["budget"].unique())
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("epoch budget")
        ax.grid(alpha=0.3)
    left.set_ylabel("fewest hidden neurons (held-out >= 90%)")
    left.set_title(f"Minimal certified width, function seed {function_seed}")
    right.set_ylabel("trainable parameters")
    right.axhline(BITS / 2, color="crimson", linestyle="--", label="2 bits per parameter")
    right.set_title("Parameters of the same answers")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return save_figure(fig, out / "frontier.png")


def write_frontier_report(
    storage_url: str, out: Path, answers_path: Path, command: str | None = None
) -> Path:
    """Write summary.md, frontier.png and answers.json; return the summary's path."""
    answers = frontier_answers(storage_url)
    out.mkdir(parents=True, exist_ok=True)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    answers_path.write_text(json.dumps(answers, indent=1) + "\n")
    seeds = sorted({a["function_seed"] for a in answers})
    lines = [
        "# The budget frontier",
        "",
        "The fewest hidden ReLU neurons with which a network learns the random Boolean function "
        "{0,1}^8 -> {0,1}^8 to a full-table mean BCE of at most 0.001 with every bit right, on "
        "at least 90% of held-out initialisation seeds, for each epoch budget and depth. "
        "Recipe (Adam's learning rate, batch size, schedule) searched by Optuna per cell; width "
        "by a k-ary search on selection seeds; the width chosen on a block of held-out seeds "
        "(it passes there, the next smaller width fails there: *chosen on*, *next smaller*); "
        "the stated rate and its exact 95% interval (*confirmed*) on a further fresh block that "
        "played no part in any choice (`study.frontier`); *all held-out*: every held-out seed "
        "the width was trained on, blocks of both kinds pooled (for information: it includes "
        "the block that chose it). Seeds: selection 2,000,000 + i, "
        "held-out choice blocks 3,000,000 + 10,000 j + i, confirmation blocks 4,000,000 + "
        "10,000 j + i.",
        "",
    ]
    if 0 in seeds:
        headline = markdown_table(headline_table(answers))
        lines += ["## The answers (function seed 0)", "", headline, ""]
    for seed in seeds:
        table = frontier_table(answers, seed)
        lines += [f"## Function seed {seed}", "", markdown_table(table), ""]
        conclusions = depth_conclusions(answers, seed)
        if conclusions:
            lines += ["Does depth save neurons? parameters?", "", *conclusions, ""]
    lines += theory(answers)
    spread = function_spread(answers)
    if not spread.empty:
        lines += ["## Other random functions", "", markdown_table(spread), ""]
    if frontier_figure(answers, out, seeds[0] if seeds else 0) is not None:
        lines += ["![The frontier](frontier.png)", ""]
    if command:
        lines += [f"Produced by: `{command}`"]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
