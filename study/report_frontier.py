"""The frontier report: the fewest certified neurons per epoch budget and depth.

Reads the answers (`study.answers.FrontierAnswer`) that `study frontier run` stored with its
cells and writes `summary.md`, `frontier.png` and the machine-readable `answers.json`. Only
reads the store.

Why one file over 600 lines: every section of the one frontier summary (answers, records, the
stricter rule, reliability, theory, probes, figures) is a function beside the others, all
reading the same typed answers; apart they would each re-read the store and re-derive them.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from study.answers import (
    CONFIRM_BLOCK,
    HELDOUT_BLOCK,
    HELDOUT_SEED,
    SCHEMA_VERSION,
    SELECTION_SEED,
    BlockRate,
    FrontierAnswer,
    NoAnswer,
    cell_studies,
    earlier_answer,
    exact_interval,
    first_seed,
    stored_answer,
    stored_no_answer,
)
from study.config import FrontierPlan
from study.probe import probe_for
from study.storage import open_storage
from study.success_curve import Curve, fitted_widths
from study.tables import figure, markdown_table, whole_numbers


def frontier_answers(storage_url: str) -> list[FrontierAnswer]:
    """Every answer stored in the store's frontier cells, by function seed, depth, budget.
    Only confirmed answers: a cell whose width has not passed its confirmation block yet (a run
    that stopped before) states nothing."""
    return _read(storage_url)[0]


def frontier_outcomes(storage_url: str) -> list[NoAnswer]:
    """The cells whose plan ran to its end without a width to state (research outcomes)."""
    return _read(storage_url)[2]


def _read(storage_url: str) -> tuple[list[FrontierAnswer], list[str], list[NoAnswer]]:
    """The answers, the cells answered by the earlier method (named, not read), and the cells
    whose plan stated no width."""
    storage = open_storage(storage_url, heartbeat=False)
    answers, earlier, unanswered = [], [], []
    for name in cell_studies(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        answer = stored_answer(study)
        if answer is not None:
            answers.append(answer)
        elif earlier_answer(study) is not None:
            earlier.append(name)
        elif (outcome := stored_no_answer(study)) is not None:
            unanswered.append(outcome)
    answers.sort(key=lambda a: (a.cell.function_seed, a.cell.depth, a.cell.budget))
    unanswered.sort(key=lambda a: (a.cell.function_seed, a.cell.depth, a.cell.budget))
    return answers, sorted(earlier), unanswered


def earlier_frontier_table(storage_url: str) -> pd.DataFrame:
    """The cells a store's earlier method answered (blocks of 24 seeds, no fitted curve), one
    row each as it stored its answer: the width, its held-out rate and recipe (empty when the
    store has none). `frontier_answers` reads only the current method's."""
    storage = open_storage(storage_url, heartbeat=False)
    rows = []
    for name in _read(storage_url)[1]:
        stored = earlier_answer(optuna.load_study(study_name=name, storage=storage))
        chosen = stored["chosen_on"]
        rows.append({
            "cell": name,
            "function seed": stored["function_seed"],
            "hidden layers": stored["depth"],
            "epoch budget": stored["budget_epochs"],
            "neurons": stored["neurons"],
            "profile": "-".join(map(str, stored["profile"])),
            "held-out seeds learned": f"{chosen['heldout_successes']}/{chosen['heldout_seeds']}",
            "recipe": ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in stored["recipe"].items()),
        })  # fmt: skip
    order = ["function seed", "hidden layers", "epoch budget"]
    return pd.DataFrame(rows).sort_values(order, ignore_index=True) if rows else pd.DataFrame()


def answers_document(answers: list[FrontierAnswer], records_dir: Path | None = None) -> dict:
    """answers.json: the schema version, one entry per answered cell (with its fitted widths
    at 50, 90 and 99%) and the smallest record network of each function and depth."""
    from study.records import smallest

    return {
        "schema_version": SCHEMA_VERSION,
        "answers": [{**a.to_dict(), "fitted_widths": fitted_widths(a.curve)} for a in answers],
        "records": [] if records_dir is None else [
            {key: r.get(key) for key in ("file", "method", "function_seed", "hidden_layer_profile",
                                         "neurons", "budget_epochs", "epochs_run", "final_loss",
                                         "init_seed")}
            for r in smallest(records_dir).values()
        ],
    }  # fmt: skip


def reliability_table(answers: list[FrontierAnswer], function_seed: int = 0) -> pd.DataFrame:
    """Per cell: the fitted widths at 50, 90 and 99% with their 95% intervals (the same
    points fitted at each rate): what reliability costs in neurons."""
    rows = []
    for a in _of(answers, function_seed):
        row: dict = {"epoch budget": a.cell.budget, "depth": a.cell.depth}
        for rate, fitted in fitted_widths(a.curve).items():
            row[f"w at {rate}"] = "" if fitted is None else (
                f"{fitted['crossing']:.1f} ({_end(fitted['interval_95'][0])}.."
                f"{_end(fitted['interval_95'][1])})"
            )  # fmt: skip
        row["stated"] = a.neurons
        rows.append(row)
    return pd.DataFrame(rows)


def _rate(rate: BlockRate) -> str:
    low, high = rate.interval
    return f"{rate.successes}/{rate.seeds} ({low:.2f}..{high:.2f})"


def _evidence(a: FrontierAnswer) -> str:
    """What stated the width: method 3, every held-out seed it was trained on, pooled; method
    2, its confirmation block."""
    if a.plan.method < 3:
        return _rate(a.rate)
    pooled = a.all_heldout
    low, high = exact_interval(pooled.successes, pooled.seeds)
    return (
        f"{pooled.successes}/{pooled.seeds} ({low:.2f}..{high:.2f}; {len(pooled.blocks)} blocks)"
    )


def _end(value: float | None) -> str:
    return "open" if value is None else f"{value:.1f}"


def _fitted(curve: Curve) -> str:
    low, high = curve.interval
    return f"{curve.crossing:.1f} ({_end(low)}..{_end(high)})"


def _next_smaller(a: FrontierAnswer) -> str:
    """The next smaller width: its fitted rate, and its held-out seeds where it was trained."""
    if a.neurons <= 1:
        return ""
    text = f"{a.neurons - 1}: fitted {a.curve.at(a.neurons - 1):.0%}"
    smaller = a.next_smaller
    if smaller is not None:
        text += f", held-out {smaller.successes}/{smaller.seeds}"
    return text


def _failed(a: FrontierAnswer) -> str:
    return ", ".join(f"{w.neurons}: {w.rate.successes}/{w.rate.seeds}" for w in a.failed)


def _profile(a: FrontierAnswer) -> str:
    return "-".join(map(str, a.width.profile))


def _of(answers: list[FrontierAnswer], function_seed: int) -> list[FrontierAnswer]:
    return [a for a in answers if a.cell.function_seed == function_seed]


def frontier_table(answers: list[FrontierAnswer], function_seed: int = 0) -> pd.DataFrame:
    """One row per budget and depth of one function: the answer, its curve, its neighbours."""
    rows = [
        {
            "budget": a.cell.budget,
            "depth": a.cell.depth,
            "neurons": a.neurons,
            "profile": _profile(a),
            "parameters": a.parameters,
            "stated on (95%)": _evidence(a),
            "fitted 90% width (95%)": _fitted(a.curve),
            "fitted rate": f"{a.curve.at(a.neurons):.0%}",
            "next smaller": _next_smaller(a),
            "failed confirmations": _failed(a),
            "held-out seeds": a.curve.seeds,
            "bits/parameter": round(a.table_bits / a.parameters, 2),
            "recipe": a.recipe.describe(),
        }
        for a in sorted(_of(answers, function_seed), key=lambda a: (a.cell.depth, a.cell.budget))
    ]
    return pd.DataFrame(rows)


def recipe_table(answers: list[FrontierAnswer], function_seed: int = 0) -> pd.DataFrame:
    """Per cell: the chosen recipe next to the search's second and third best, each with its
    score (decades above the target, less a bonus for reaching it early; lower is better) and
    the selection seeds that reached the target at the probe width."""

    def shown(a: FrontierAnswer, rank: int) -> str:
        if rank >= len(a.recipes):
            return ""
        r = a.recipes[rank]
        return f"{r.recipe.describe()}; score {r.score:.3f}; {r.successes}/{r.seeds}"

    rows = [
        {
            "budget": a.cell.budget,
            "depth": a.cell.depth,
            "probe width": a.recipes[0].probe_neurons if a.recipes else "",
            "chosen (best)": shown(a, 0),
            "second": shown(a, 1),
            "third": shown(a, 2),
        }
        for a in sorted(_of(answers, function_seed), key=lambda a: (a.cell.depth, a.cell.budget))
    ]
    return pd.DataFrame(rows)


def _by_budget(answers: list[FrontierAnswer], function_seed: int) -> dict[int, dict]:
    """Budget -> depth -> answer, of one function."""
    by_budget: dict[int, dict[int, FrontierAnswer]] = {}
    for a in _of(answers, function_seed):
        by_budget.setdefault(a.cell.budget, {})[a.cell.depth] = a
    return dict(sorted(by_budget.items()))


def probe_table(storage_url: str, answers: list[FrontierAnswer]) -> pd.DataFrame:
    """How near each recipe search probed to the boundary the cell then found, in the order the
    searches began: the probe width used, the one this version's `probe_for` gives from the
    answers finished before that search began (a plan's own probe width stays), and the cell's
    fitted 90% crossing."""
    storage = open_storage(storage_url, heartbeat=False)

    def trials(name: str) -> list:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)

    finished, began = {}, {}
    for a in answers:
        done = [t.datetime_complete for t in trials(a.cell.name) if t.datetime_complete]
        start = [t.datetime_start for t in trials(a.cell.recipe_name) if t.datetime_start]
        if done and start:
            finished[a.cell.name], began[a.cell.name] = max(done), min(start)
    rows = []
    ordered = [a for a in answers if a.cell.name in began]
    ordered.sort(key=lambda a: began[a.cell.name])
    for a in ordered:
        start = began[a.cell.name]
        known = [b for b in answers if b.cell.name in finished and finished[b.cell.name] < start]
        rows.append(
            {
                "cell": a.cell.name,
                "answers known": len(known),
                "probe used": a.recipes[0].probe_neurons if a.recipes else None,
                "probe now": a.plan.probe_neurons or probe_for(a.cell, known),
                "fitted 90% crossing": round(a.curve.crossing, 1),
            }
        )
    return pd.DataFrame(rows)


def probe_lines(table: pd.DataFrame) -> list[str]:
    """The report's section on the probes (nothing before a cell searched with answers known)."""
    known = table[table["answers known"] > 0] if not table.empty else table
    if known.empty or known["probe used"].isna().any():
        return []

    def off(column: str) -> str:
        error = (known[column] - known["fitted 90% crossing"]).abs()
        return f"{error.mean():.2f} neurons on average (at most {error.max():.1f})"

    return [
        "## How near the probes were",
        "",
        "A recipe search ranks its recipes at one probe width, which should sit near the boundary "
        "the cell then finds. Of the searches that began with answers in the store, the probes "
        f"used were {off('probe used')} from the cell's fitted 90% crossing; this version's rule "
        f"(`probe_for`), given the answers finished before each search began, gives "
        f"{off('probe now')} (the crossings held as they came out: a probe that differs would "
        "have searched, and perhaps chosen, differently).",
        "",
        markdown_table(table),
        "",
    ]


def _best_deep(cells: dict[int, FrontierAnswer]) -> FrontierAnswer | None:
    deep = [a for depth, a in cells.items() if depth > 1]
    return min(deep, key=lambda a: (a.neurons, a.parameters)) if deep else None


def _stated(a: FrontierAnswer | None) -> str:
    if a is None:
        return ""
    return (
        f"**{a.neurons}** ({_profile(a)}; {a.parameters} parameters; "
        f"{'stated on' if a.plan.method >= 3 else 'confirmed'} {_evidence(a)}; "
        f"fitted {_fitted(a.curve)})"
    )


def headline_table(answers: list[FrontierAnswer], function_seed: int = 0) -> pd.DataFrame:
    """Per budget: w_1 (one hidden layer) and w_2 (the best of 2, 3 and 4 layers), each with
    its parameters, confirmed rate and fitted crossing; a depth not yet answered is named."""
    rows = []
    for budget, cells in _by_budget(answers, function_seed).items():
        missing = [str(d) for d in (2, 3, 4) if d not in cells]
        rows.append(
            {
                "epoch budget": budget,
                "w_1 (1 layer)": _stated(cells.get(1)),
                "w_2 (best of 2-4 layers)": _stated(_best_deep(cells)),
                "depths answered": ", ".join(str(d) for d in sorted(cells))
                + (f" (not: {', '.join(missing)})" if missing else ""),
            }
        )
    return pd.DataFrame(rows)


def headline(answers: list[FrontierAnswer], function_seed: int = 0) -> list[str]:
    """One line each for w_1 and w_2 (the best of 2-4 layers), at the largest budget where
    that depth is answered (what `make study` prints)."""
    by_budget = _by_budget(answers, function_seed)
    lines = []
    for name, pick in (("w_1", lambda cells: cells.get(1)), ("w_2", _best_deep)):
        found = [(budget, pick(cells)) for budget, cells in by_budget.items() if pick(cells)]
        if not found:
            continue
        budget, a = found[-1]
        lines.append(
            f"{name} = {a.neurons} ({_profile(a)}, {a.parameters} parameters) at {budget} epochs: "
            f"{a.pooled_words()}, fitted 90% crossing {_fitted(a.curve)}"
        )
    return lines


def records_lines(answers: list[FrontierAnswer], directory: Path) -> list[str]:
    """The smallest record network of each function and depth (`study.records`) beside the
    width stated at 90% at the record's budget: the exercise's literal answer next to the
    reliable one."""
    from study.records import smallest

    found = smallest(directory)
    if not found:
        return []
    stated = {(a.cell.function_seed, a.cell.depth, a.cell.budget): a for a in answers}
    rows = []
    for (seed, depth, method), r in found.items():
        a = stated.get((seed, depth, r["budget_epochs"]))
        rows.append({
            "function seed": seed,
            "depth": depth,
            "method": method,
            "record": f"**{r['neurons']}** ({'-'.join(map(str, r['hidden_layer_profile']))})",
            "budget": r["budget_epochs"],
            "epoch reached": r["epochs_run"],
            "full-table loss": f"{r['final_loss']:.6f}",
            "stated at 90% (same budget)": "" if a is None else f"{a.neurons} ({_profile(a)})",
            "file": f"`{Path(r['file']).name}`",
        })  # fmt: skip
    return [
        "## Records: the least width found that learns f",
        "",
        "The exercise asks for the least width that *can* learn f. A record is a network that "
        "did, kept with its weights: `study verify FILE` rebuilds f from its seed, recomputes "
        "the loss and the bits without the store and exits 0 only when the loss is at most "
        "0.001 and every bit is right. Two methods, each its own row: *plain training from "
        "scratch* (`study records run`: seeds tried at each width below the stated one, "
        "downward, with the cell's best recipes and budget; the epoch reached is that run's) "
        "and *prune and fine-tune* (`study records prune`: from the plain record, the weakest "
        "neuron removed and the rest fine-tuned with full-table Adam, one neuron at a time). A "
        "record is an existence claim; the stated width beside it is the one that learns f on "
        "90% of seeds trained from scratch.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        f"(files in `{directory}`)",
        "",
    ]


def rule_lines(answers: list[FrontierAnswer]) -> list[str]:
    """Every stated width under the stricter rule (`study.stating_rule`): its pooled rate over
    every held-out seed it was trained on, the one-sided lower bound, and what it still needs;
    with the rule's chance of stating a width whose true rate is 85, 90 and 95%."""
    from study.stating_rule import StatingRule, lower_bound

    rules = {StatingRule.of(a.plan) for a in answers if a.plan.method >= 3}
    rule = rules.pop() if len(rules) == 1 else StatingRule()  # the plans' own, where one
    rows = []
    for a in answers:
        pooled = a.all_heldout
        mine = StatingRule.of(a.plan) if a.plan.method >= 3 else rule
        rows.append({
            "cell": a.cell.name,
            "stated": a.neurons,
            "pooled": f"{pooled.successes}/{pooled.seeds} ({pooled.successes / pooled.seeds:.3f})",
            "blocks": len(pooled.blocks),
            "one-sided 95% lower": f"{lower_bound(pooled.successes, pooled.seeds):.3f}",
            "under the rule": mine.verdict(pooled.successes, pooled.seeds, len(pooled.blocks)),
        })  # fmt: skip
    seeds = rule.min_seeds
    chances = ", ".join(
        f"{rate:.0%}: {rule.chance(rate, seeds):.1%} exact, {rule.simulate(rate, seeds):.1%} in "
        "100,000 simulated widths"
        for rate in (0.85, 0.90, 0.95)
    )
    return [
        "## The stated widths under the stating rule",
        "",
        f"A width is stated under this rule only when every held-out seed it was trained on "
        f"(curve and confirmation blocks pooled, failed blocks included) numbers at least "
        f"{rule.min_seeds} from at least {rule.min_blocks} blocks, the pooled estimate is at "
        f"least {rule.min_estimate:.0%} and its exact one-sided 95% lower bound at least "
        f"{rule.min_lower:.0%}. The chance that it states a width of a given true rate from "
        f"{seeds} seeds (at least {rule.least_successes(seeds)} must learn f): {chances}. "
        + (
            "The answers of method 2 above were stated by one confirmation block each; this "
            "table shows what each has by the rule and what it still needs (method 3 states by "
            "it)."
            if any(a.plan.method < 3 for a in answers)
            else "Every answer above was stated by it (method 3)."
        ),
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ]


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
    """Where several functions were answered at one budget and depth: mean, min, max of the
    stated width and of the fitted 90% crossing."""
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
            "fitted 90% mean": round(statistics.mean(a.curve.crossing for a in cell), 1),
            "fitted min": round(min(a.curve.crossing for a in cell), 1),
            "fitted max": round(max(a.curve.crossing for a in cell), 1),
            "function seeds": ", ".join(str(a.cell.function_seed) for a in cell),
        }
        for (budget, depth), cell in sorted(groups.items())
        if len(cell) > 1
    ]
    return pd.DataFrame(rows)


def sufficient_widths(rows: int, outputs: int) -> dict[int, int]:
    """Hidden neurons known to suffice for fitting `rows` points exactly, by depth: `rows` in
    one hidden layer (one unit per point), 2 sqrt((outputs + 2) rows) in two (Huang, 2003)."""
    return {1: rows, 2: round(2 * math.sqrt((outputs + 2) * rows))}


def theory(answers: list[FrontierAnswer]) -> list[str]:
    """The answers next to capacity results: bits per parameter (a linear threshold unit
    stores about two random bits per weight; Cover, 1965), and the widths known to suffice."""
    if not answers:
        return []
    first = answers[0]
    s = first.settings
    rows, bits = 2**s.input_bits, first.table_bits
    enough = sufficient_widths(rows, s.output_bits)
    # one hidden layer of w units has (n + 1) w + (w + 1) m parameters
    per_unit = s.input_bits + 1 + s.output_bits
    bound_width = math.ceil((bits / 2 - s.output_bits) / per_unit)
    most = max(answers, key=lambda a: a.table_bits / a.parameters)
    lines = [
        "## Next to theory",
        "",
        f"f is {bits} random bits ({rows} rows of {s.output_bits} bits). A linear threshold "
        "unit stores about two random bits per weight (Cover, 1965), so a network needs on "
        f"the order of {bits // 2} parameters to hold f: with {per_unit} w + {s.output_bits} "
        f"parameters, one hidden layer needs w >= ~{bound_width}. What is known to suffice for "
        f"fitting {rows} points exactly: {enough[1]} neurons in one hidden layer (one per "
        f"point), and about 2 sqrt((m + 2) N) = {enough[2]} neurons in two hidden layers "
        f"(Huang, 2003; m = {s.output_bits} outputs, N = {rows} points). Trained networks "
        "(per function seed, depth and budget; the smallest stated width of each depth):",
        "",
    ]
    table = []
    for depth in sorted({a.cell.depth for a in answers}):
        mine = [a for a in answers if a.cell.depth == depth]
        best = min(mine, key=lambda a: (a.neurons, a.parameters))
        table.append(
            {
                "depth": depth,
                "known to suffice": enough.get(depth, ""),
                "capacity estimate (~2 bits/parameter)": bound_width if depth == 1 else "",
                "smallest stated": best.neurons,
                "at": f"{best.cell.budget} epochs, function seed {best.cell.function_seed}",
                "parameters": best.parameters,
                "bits/parameter": round(best.table_bits / best.parameters, 2),
                "of what suffices": f"{best.neurons / enough[depth]:.0%}"
                if depth in enough
                else "",
            }
        )
    lines += [
        markdown_table(pd.DataFrame(table)),
        "",
        f"The most economical answer, {most.neurons} neurons in {most.cell.depth} layer(s) at "
        f"{most.cell.budget} epochs ({most.parameters} parameters), stores "
        f"{bits / most.parameters:.2f} bits per parameter, "
        + (
            "more than the two bits per weight of a single threshold unit: counting parameters "
            "is an estimate, not a bound, for a network that needs only every output's sign "
            "right with a margin. "
            if bits / most.parameters > 2
            else f"{bits / most.parameters / 2:.0%} of the two bits per weight of a single "
            "threshold unit. "
        )
        + "Against what provably suffices, trained networks need "
        + " and ".join(
            f"{row['of what suffices']} of it with {row['depth']} hidden layer(s)"
            for row in table
            if row["of what suffices"]
        )
        + ": the constructions are far from tight, while the counting estimate is close.",
        "",
    ]
    return lines


def frontier_figure(
    answers: list[FrontierAnswer], out: Path, function_seed: int = 0
) -> Path | None:
    """Neurons and parameters against the budget, one line per depth, with the fitted 90%
    crossing and its interval."""
    mine = _of(answers, function_seed)
    if not mine:
        return None
    bits = mine[0].table_bits
    path = out / "frontier.png"
    with figure(path, 1, 2, figsize=(11, 4.2)) as (_, (left, right)):
        for depth in sorted({a.cell.depth for a in mine}):
            rows = sorted((a for a in mine if a.cell.depth == depth), key=lambda a: a.cell.budget)
            budgets = [a.cell.budget for a in rows]
            label = "1 hidden layer" if depth == 1 else f"{depth} hidden layers"
            line = left.plot(budgets, [a.neurons for a in rows], marker="o", label=label)[0]
            low = [a.curve.interval[0] or a.curve.crossing for a in rows]
            high = [a.curve.interval[1] or a.curve.crossing for a in rows]
            left.fill_between(budgets, low, high, color=line.get_color(), alpha=0.15, lw=0)
            right.plot(budgets, [a.parameters for a in rows], marker="o", label=label)
        budgets = sorted({a.cell.budget for a in mine})
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel("epoch budget")
            ax.grid(alpha=0.3)
        whole_numbers(left.yaxis)
        left.set_ylabel("stated width (confirmed >= 90%)")
        left.set_title(f"Minimal width, function seed {function_seed} (band: fitted 95%)")
        right.set_ylabel("trainable parameters")
        right.axhline(bits / 2, color="crimson", linestyle="--", label="2 bits per parameter")
        right.set_title("Parameters of the same answers")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    return path


def curves_figure(answers: list[FrontierAnswer], out: Path, function_seed: int = 0) -> Path | None:
    """Per cell: the observed success rate of every held-out width (exact 95% intervals), the
    fitted curve, the required rate and the stated width."""
    mine = sorted(_of(answers, function_seed), key=lambda a: (a.cell.depth, a.cell.budget))
    if not mine:
        return None
    depths = sorted({a.cell.depth for a in mine})
    budgets = sorted({a.cell.budget for a in mine})
    path = out / "success_curves.png"
    size = (3.3 * len(budgets) + 0.5, 2.8 * len(depths) + 0.6)
    with figure(path, len(depths), len(budgets), figsize=size, squeeze=False) as (fig, axes):
        for ax in axes.flat:
            ax.set_visible(False)
        for a in mine:
            ax = axes[depths.index(a.cell.depth)][budgets.index(a.cell.budget)]
            ax.set_visible(True)
            widths = [p.neurons for p in a.curve.points]
            rates = [p.successes / p.seeds for p in a.curve.points]
            intervals = [exact_interval(p.successes, p.seeds) for p in a.curve.points]
            errors = [
                [r - low for r, (low, _) in zip(rates, intervals, strict=True)],
                [high - r for r, (_, high) in zip(rates, intervals, strict=True)],
            ]
            ax.errorbar(widths, rates, yerr=errors, fmt="o", ms=3, capsize=2, label="held-out")
            grid = np.linspace(min(widths) - 2, max(widths) + 2, 200)
            ax.plot(grid, [a.curve.at(w) for w in grid], color="black", lw=1, label="fitted")
            ax.axhline(a.plan.required_rate, color="crimson", ls="--", lw=0.8)
            low, high = a.curve.interval
            ax.axvspan(low if low is not None else grid[0], high if high is not None else grid[-1],
                       color="crimson", alpha=0.1, lw=0)  # fmt: skip
            ax.axvline(a.neurons, color="tab:green", lw=1, label=f"stated {a.neurons}")
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"depth {a.cell.depth}, {a.cell.budget:,} epochs", fontsize=9)
            ax.set_xlabel("hidden neurons", fontsize=8)
            whole_numbers(ax.xaxis)
            ax.set_ylabel("share of seeds that learn f", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="lower right")
        fig.suptitle(
            f"Success curves, function seed {function_seed}: held-out rates (exact 95%), the "
            "fitted logistic,\n90% (dashed) and the 95% interval of its crossing (band)",
            fontsize=9,
        )
    return path


def introduction(answers: list[FrontierAnswer]) -> str:
    """What the report's cells are and how they were answered, from the answers' own plans
    (the default plan's numbers only where the cells ran it)."""
    plans = {a.plan for a in answers}

    def each(field: str) -> str:
        values = sorted({getattr(p, field) for p in plans}) or [getattr(FrontierPlan(), field)]
        return " or ".join(f"{v:,}" for v in values)

    def needed() -> str:
        pairs = sorted({(p.required(p.confirmation_seeds), p.confirmation_seeds) for p in plans})
        plan = FrontierPlan()
        pairs = pairs or [(plan.required(plan.confirmation_seeds), plan.confirmation_seeds)]
        return " or ".join(f"{k} of {n}" for k, n in pairs)

    rate = " or ".join(f"{r:.0%}" for r in sorted({p.required_rate for p in plans} or {0.9}))
    methods = sorted({p.method for p in plans} or {FrontierPlan().method})
    margins = {(p.required_rate, p.stated_margin) for p in plans} or {(0.9, 0.05)}
    lower = " or ".join(f"{r - g:.0%}" for r, g in sorted(margins))
    stage_4 = {
        2: f"Method 2: one block of {each('confirmation_seeds')} seeds, which must pass "
        f"({needed()}) for the width to be stated (*confirmed*, with its exact 95% interval); "
        "a width that fails joins the fit and the next is confirmed on a fresh block. Seeds, "
        f"shared by every cell: selection {SELECTION_SEED:,} + i, curve blocks "
        f"{HELDOUT_SEED:,} + {HELDOUT_BLOCK:,} j + i, confirmation blocks "
        f"{first_seed(CONFIRM_BLOCK):,} + {HELDOUT_BLOCK:,} j + i.",
        3: f"Method 3: blocks of {each('confirmation_seeds')} seeds until every held-out seed "
        "the width was trained on (curve and confirmation blocks, failed ones included) numbers "
        f"at least {each('stated_seeds')} from two blocks or more; it is stated if the pooled "
        f"rate is at least {rate} and its exact one-sided 95% lower bound at least {lower} "
        "(`study.stating_rule`), refused otherwise (the next width is then confirmed on fresh "
        "blocks). Every stage of a cell draws its own seeds (2^59 + crc32(cell name) 2^22 + "
        "stage 2^19 + block 2^14 + i; `answers.stage_seeds`): no two cells, stages or blocks "
        "share one.",
    }
    n, m = (answers[0].settings.input_bits, answers[0].settings.output_bits) if answers else (8, 8)
    return (
        "The fewest hidden ReLU neurons with which a network learns the random Boolean function "
        f"{{0,1}}^{n} -> {{0,1}}^{m} to a full-table mean BCE of at most 0.001 with every bit "
        f"right, on at least {rate} of held-out initialisation seeds, for each epoch budget and "
        f"depth (`study.frontier`, method {' or '.join(map(str, methods))}). Per cell: "
        "Optuna's TPE, seeded from the cell, "
        "searches the recipe (Adam's learning rate, batch size, schedule with warm-up and floor; "
        f"{each('recipe_trials')} trials, the neighbouring cells' best recipes first) at a width "
        "near the cell's boundary; a k-ary search on selection seeds finds where the boundary "
        f"lies; five widths around it are trained on {each('heldout_seeds')} held-out seeds each "
        "and a logistic curve in width is fitted to every held-out seed (*fitted width*: where "
        "it crosses the required rate, with its profile-likelihood 95% interval); the smallest "
        "whole width whose fitted rate is at least the required rate is confirmed on fresh "
        f"seeds. {' '.join(stage_4[m] for m in methods)} answers.json carries every answer's "
        "curve, recipe ranking, seeds, plan, code commit, torch version, device and command."
    )


def write_frontier_report(
    storage_url: str,
    out: Path,
    answers_path: Path,
    command: str | None = None,
    records_dir: Path | None = None,
) -> Path:
    """Write summary.md, frontier.png, success_curves.png and answers.json; return the
    summary's path."""
    answers, earlier, unanswered = _read(storage_url)
    out.mkdir(parents=True, exist_ok=True)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    document = answers_document(answers, records_dir)
    answers_path.write_text(json.dumps(document, indent=1) + "\n")
    seeds = sorted({a.cell.function_seed for a in answers})
    lines = ["# The budget frontier", "", introduction(answers), ""]
    if 0 in seeds:
        lines += ["## The answers (function seed 0)", "", *headline(answers), ""]
        lines += [markdown_table(headline_table(answers)), ""]
    if records_dir is not None:
        lines += records_lines(answers, records_dir)
    for seed in seeds:
        table = frontier_table(answers, seed)
        lines += [f"## Function seed {seed}", "", markdown_table(table), ""]
        conclusions = depth_conclusions(answers, seed)
        if conclusions:
            lines += ["Does depth save neurons? parameters?", "", *conclusions, ""]
        lines += [
            "How the chosen recipe compares with the search's second and third best (score: "
            "decades the probe width's seeds ended above the target, less a bonus for reaching "
            "it early; lower is better; then the selection seeds that reached it):",
            "",
            markdown_table(recipe_table(answers, seed)),
            "",
            "The price of reliability: the widths where the fitted success curve crosses 50%, "
            "90% and 99% (95% intervals; the same held-out seeds fitted at each rate):",
            "",
            markdown_table(reliability_table(answers, seed)),
            "",
        ]
    lines += rule_lines(answers) if answers else []
    lines += theory(answers)
    lines += probe_lines(probe_table(storage_url, answers))
    spread = function_spread(answers)
    if not spread.empty:
        lines += ["## Other random functions", "", markdown_table(spread), ""]
    if frontier_figure(answers, out, seeds[0] if seeds else 0) is not None:
        lines += ["![The frontier](frontier.png)", ""]
    if curves_figure(answers, out, seeds[0] if seeds else 0) is not None:
        lines += ["![Success curves](success_curves.png)", ""]
    if unanswered:
        lines += [
            "## Cells without an answer",
            "",
            "Their plan ran to its end and states no width (every evaluation stays stored; "
            "another plan, more seeds or a larger budget, may answer them):",
            "",
            *(f"- {a.cell.name}: {a.reason}" for a in unanswered),
            "",
        ]
    if earlier:
        lines += [
            f"Not shown: {len(earlier)} cell(s) of this store answered by the earlier method "
            "(blocks of 24 seeds, no fitted curve); their answers stay stored with them.",
            "",
        ]
    if command:
        lines += [f"Produced by: `{command}`"]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
