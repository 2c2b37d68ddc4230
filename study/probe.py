"""Where a frontier cell's recipe search probes: a width near the cell's boundary, from the
answers already in the store or a table of measured boundaries. Pure arithmetic on answers
(no torch, no engine), so that the frontier report can show how near each probe was."""

from __future__ import annotations

import math
from collections.abc import Sequence

from study.answers import FrontierAnswer
from study.config import MAX_FRONTIER_NEURONS, FrontierCell

MAX_NEURONS = MAX_FRONTIER_NEURONS
BUDGET_SHRINK = 0.12
"""The boundary shrinks about as budget^-0.12 (the earlier method's one layer: 84, 66 and 61
neurons at 2,000, 8,000 and 16,000 epochs, exponents 0.17 and 0.11, flattening)."""
DEPTH_FACTOR = {1: 1.0, 2: 0.85, 3: 1.0, 4: 1.3}
"""Boundary of a depth relative to one layer, at equal budget (earlier method: at 2,000 and
16,000 epochs two layers needed 0.81 and 0.89 of one layer's neurons, three 0.98 and 1.07, four
1.24 and 1.34)."""


def probe_for(cell: FrontierCell, known: Sequence[FrontierAnswer] = ()) -> int:
    """A probe width near the cell's boundary, where the recipe decides success: from the
    answers `known` in the store, else from a one-layer table of 8-bit functions set a little
    below the boundaries measured (the recipe score still ranks recipes below the boundary, by
    how close they come to the target, while above it every recipe succeeds and only speed ranks
    them). With answers of the same function and depth (`boundary_at`): between two answered
    budgets, interpolated in log width over log budget; beyond them, continued at the slope of
    the two nearest, else at budget^-BUDGET_SHRINK. Otherwise the nearest answer (the same
    function first), scaled by budget^-BUDGET_SHRINK and `DEPTH_FACTOR`.

    On the committed store (each cell against the answers finished before its recipe search
    began; the frontier report's "How near the probes were") this rule probes 2.65 neurons from
    the fitted 90% crossing on average (at most 5.6), the budget^-0.12 scaling of the nearest
    answer alone 3.23 (at most 6.3): it over-shrank where the boundary flattens (one layer at
    32,000 epochs: 52 for a crossing of 57.9, now 55)."""
    estimate = boundary_at(cell, known)
    if estimate is None and known:

        def distance(a: FrontierAnswer) -> tuple:
            return (
                a.cell.function_seed != cell.function_seed,
                a.cell.depth != cell.depth,
                abs(math.log2(a.cell.budget / cell.budget)),
                abs(a.cell.depth - cell.depth),
            )

        near = min(known, key=distance)
        estimate = near.curve.crossing * (near.cell.budget / cell.budget) ** BUDGET_SHRINK
        estimate *= DEPTH_FACTOR[cell.depth] / DEPTH_FACTOR[near.cell.depth]
    if estimate is None:
        one_layer = {500: 100, 1000: 86, 2000: 72, 4000: 64}.get(
            cell.budget, 58 if cell.budget < 16000 else 55 * (16000 / cell.budget) ** BUDGET_SHRINK
        )
        estimate = one_layer * DEPTH_FACTOR[cell.depth]
    return max(1, min(MAX_NEURONS, round(estimate)))


def boundary_at(cell: FrontierCell, known: Sequence[FrontierAnswer]) -> float | None:
    """The fitted 90% crossing at the cell's budget as the answers of its function and depth
    place it (None: no such answer): log crossing is taken piecewise linear in log budget
    between answered budgets and continued beyond them at the slope of the two nearest (clipped
    to 0..BUDGET_SHRINK: a boundary does not grow with budget, and one answer gives no slope)."""
    points = sorted(
        (math.log(a.cell.budget), math.log(a.curve.crossing))
        for a in known
        if a.cell.function_seed == cell.function_seed and a.cell.depth == cell.depth
    )
    if not points:
        return None
    x = math.log(cell.budget)
    below = [p for p in points if p[0] <= x]
    above = [p for p in points if p[0] >= x]
    if below and above:
        (x0, y0), (x1, y1) = below[-1], above[0]
        return math.exp(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    side = below[::-1] if below else above
    (x0, y0), slope = side[0], BUDGET_SHRINK
    if len(side) > 1:
        slope = min(BUDGET_SHRINK, max(0.0, (y0 - side[1][1]) / (side[1][0] - x0)))
    return math.exp(y0 - slope * (x - x0))
