"""The frontier report: the fewest certified neurons per epoch budget and depth.

Reads the answers (`study.frontier.FrontierAnswer`) that `study frontier run` stored with its
cells and writes `summary.md`, `frontier.png` and the machine-readable `answers.json`. Only
reads the store.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import optuna
import pandas as pd

from study.frontier import BlockRate, FrontierAnswer, stored_answer
from study.storage import open_storage, study_names
from study.studies import FRONTIER_NAME
from study.tables import figure, markdown_table


def frontier_answers(storage_url: str) -> list[FrontierAnswer]:
    """Every answer stored in the store's frontier cells, by function seed, depth, budget.
    Only confirmed answers: a cell whose chosen width has not been confirmed on a fresh block
    yet (a run that stopped between stages 3 and 4) states nothing."""
    storage = open_storage(storage_url, heartbeat=False)
    answers = []
    for name in study_names(storage):
        match = FRONTIER_NAME.match(name)
        if match and not match.group(4):  # a cell, not its recipe search
            answer = stored_answer(optuna.load_study(study_name=name, storage=storage))
            if answer is not None:
                answers.append(answer)
    return sorted(answers, key=lambda a: (a.cell.function_seed, a.cell.depth, a.cell.budget))


def _rate(rate: BlockRate) -> str:
    low, high = rate.interval
    return f"{rate.successes}/{rate.seeds} ({low:.2f}..{high:.2f})"


def _next_smaller(a: FrontierAnswer) -> str:
    """The next smaller width's rate on the block where it failed (the choice block, or the
    fresh block it moved down to after passing on the choice block)."""
    smaller, fresh = a.choice.next_smaller, a.choice.next_smaller_fresh_block
    if smaller is None:
        return ""
    if fresh is not None:
        return (
            f"{smaller.neurons}: {fresh.successes}/{fresh.seeds} on a fresh block "
            f"({smaller.rate.successes}/{smaller.rate.seeds} on the choice block)"
        )
    return f"{smaller.neurons}: {_rate(smaller.rate)}"


def _profile(a: FrontierAnswer) -> str:
    return "-".join(map(str, a.width.profile))


def _of(answers: list[FrontierAnswer], function_seed: int) -> list[FrontierAnswer]:
    return [a for a in answers if a.cell.function_seed == function_seed]


def frontier_table(answers: list[FrontierAnswer], function_seed: int = 0) -> pd.DataFrame:
    """One row per budget and depth of one function: the answer and the next smaller width."""
    rows = [
        {
            "budget": a.cell.budget,
            "depth": a.cell.depth,
            "neurons": a.neurons,
            "profile": _profile(a),
            "parameters": a.parameters,
            "confirmed (95%)": _rate(a.rate),
            "chosen on": f"{a.choice.width.rate.successes}/{a.choice.width.rate.seeds}",
            "all held-out": f"{a.all_heldout.successes}/{a.all_heldout.seeds}",
            "next smaller": _next_smaller(a),
            "bits/parameter": round(a.table_bits / a.parameters, 2),
            "recipe": f"lr {a.recipe.learning_rate:.3g}, batch {a.recipe.batch_size}, "
            f"{a.recipe.lr_schedule}",
        }
        for a in _of(answers, function_seed)
    ]
    return pd.DataFrame(rows)


def _by_budget(answers: list[FrontierAnswer], function_seed: int) -> dict[int, dict]:
    """Budget -> depth -> answer, of one function."""
    by_budget: dict[int, dict[int, FrontierAnswer]] = {}
    for a in _of(answers, function_seed):
        by_budget.setdefault(a.cell.budget, {})[a.cell.depth] = a
    return dict(sorted(by_budget.items()))


def _best_deep(cells: dict[int, FrontierAnswer]) -> FrontierAnswer | None:
    deep = [a for depth, a in cells.items() if depth > 1]
    return min(deep, key=lambda a: (a.neurons, a.parameters)) if deep else None


def headline_table(answers: list[FrontierAnswer], function_seed: int = 0) -> pd.DataFrame:
    """Per budget: w_1 (one hidden layer) and w_2 (the best of 2, 3 and 4 layers), each with
    its parameters and confirmed held-out rate; a depth not yet answered is named."""

    def cell(a: FrontierAnswer | None) -> str:
        if a is None:
            return ""
        low, high = a.rate.interval
        return (
            f"**{a.neurons}** ({_profile(a)}; {a.parameters} parameters; "
            f"{a.rate.successes}/{a.rate.seeds}, {low:.2f}..{high:.2f})"
        )

    rows = []
    for budget, cells in _by_budget(answers, function_seed).items():
        missing = [str(d) for d in (2, 3, 4) if d not in cells]
        rows.append(
            {
                "epoch budget": budget,
                "w_1 (1 layer)": cell(cells.get(1)),
                "w_2 (best of 2-4 layers)": cell(_best_deep(cells)),
                "depths searched": ", ".join(str(d) for d in sorted(cells))
                + (f" (not yet: {', '.join(missing)})" if missing else ""),
            }
        )
    return pd.DataFrame(rows)


def depth_conclusions(answers: list[FrontierAnswer], function_seed: int = 0) -> list[str]:
    """Per budget: does depth (the best of 2, 3, 4 layers) save neurons? parameters?"""
    lines = []
    for budget, cells in _by_budget(answers, function_seed).items():
        best = _best_deep(cells)
        if 1 not in cells or best is None:
            continue
        one = cells[1]
        fewest = min((a for d, a in cells.items() if d > 1), key=lambda a: a.parameters)
        saved = one.neurons - best.neurons
        lines.append(
            f"- {budget} epochs: one layer {one.neurons} neurons ({one.parameters} "
            f"parameters); best deep {best.neurons} neurons in {best.cell.depth} layers "
            f"({best.parameters} parameters): depth "
            + (f"saves {saved} neurons" if saved > 0 else f"saves no neurons ({-saved} more)")
            + "; "
            + (
                f"the fewest parameters are deep ({fewest.parameters} in {fewest.cell.depth} "
                "layers)"
                if fewest.parameters < one.parameters
                else "one layer needs the fewest parameters"
            )
        )
    return lines


def function_spread(answers: list[FrontierAnswer]) -> pd.DataFrame:
    """Where several functions were answered at one budget and depth: mean, min, max."""
    groups: dict[tuple[int, int], list[FrontierAnswer]] = {}
    for a in answers:
        groups.setdefault((a.cell.budget, a.cell.depth), []).append(a)
    rows = [
        {
            "budget": budget,
            "depth": depth,
            "functions": len(cell),
            "neurons mean": round(statistics.mean(a.neurons for a in cell), 1),
            "min": min(a.neurons for a in cell),
            "max": max(a.neurons for a in cell),
            "function seeds": ", ".join(str(a.cell.function_seed) for a in cell),
        }
        for (budget, depth), cell in sorted(groups.items())
        if len(cell) > 1
    ]
    return pd.DataFrame(rows)


def theory(answers: list[FrontierAnswer]) -> list[str]:
    """The answers next to the capacity bound: a linear threshold unit stores about two random
    bits per weight (Cover, 1965), so f's random bits need about half as many parameters."""
    if not answers:
        return []
    most = max(answers, key=lambda a: a.table_bits / a.parameters)
    bits = most.table_bits
    # one hidden layer of w units has (n + 1) w + (w + 1) m parameters; n = m = 8 here
    bound_width = math.ceil((bits / 2 - 8) / 17)
    return [
        "## Next to theory",
        "",
        f"f is {bits} random bits. A linear threshold unit stores about two random bits per "
        f"weight (Cover, 1965), so a network needs on the order of {bits // 2} parameters to "
        f"hold f: with 17 w + 8 parameters, one hidden layer needs w >= ~{bound_width}. "
        "256 neurons always suffice (one ReLU unit per vertex of the cube). The most economical "
        f"answer here, {most.neurons} neurons in {most.cell.depth} layer(s) at "
        f"{most.cell.budget} epochs ({most.parameters} parameters), stores "
        f"{bits / most.parameters:.2f} bits per parameter; the bits/parameter column shows "
        "how close each budget comes to that capacity.",
        "",
    ]


def frontier_figure(
    answers: list[FrontierAnswer], out: Path, function_seed: int = 0
) -> Path | None:
    """Neurons and parameters against the budget, one line per depth."""
    table = frontier_table(answers, function_seed)
    if table.empty:
        return None
    bits = answers[0].table_bits
    path = out / "frontier.png"
    with figure(path, 1, 2, figsize=(11, 4.2)) as (_, (left, right)):
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
        right.axhline(bits / 2, color="crimson", linestyle="--", label="2 bits per parameter")
        right.set_title("Parameters of the same answers")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    return path


INTRODUCTION = (
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
    "10,000 j + i."
)


def write_frontier_report(
    storage_url: str, out: Path, answers_path: Path, command: str | None = None
) -> Path:
    """Write summary.md, frontier.png and answers.json; return the summary's path."""
    answers = frontier_answers(storage_url)
    out.mkdir(parents=True, exist_ok=True)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    answers_path.write_text(json.dumps([a.to_dict() for a in answers], indent=1) + "\n")
    seeds = sorted({a.cell.function_seed for a in answers})
    lines = ["# The budget frontier", "", INTRODUCTION, ""]
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
