"""A cell's success rate as a function of width: a logistic curve fitted to held-out seeds.

Every held-out evaluation of a frontier cell trains one width on a block of seeds and counts
how many learn f. Success is close to monotone in width, so the rate is modelled as

    p(w) = 1 / (1 + exp(-(L + s (w - c))))      L = logit(rate), s > 0,

whose parameters are the width `c` where the curve crosses `rate` (the quantity a cell states)
and the slope `s`. Both are fitted by maximum likelihood to every seed of every evaluation
(binomial counts per width); the 95% interval of `c` is the profile-likelihood interval: the
widths whose best curve through them is not rejected by a likelihood-ratio test at 5%
(2 x log-likelihood drop <= 3.84, the chi-squared quantile of one degree of freedom). Each
seed's outcome counts as independent; seeds shared by several widths of one block make the
interval slightly optimistic, which the confirmation block (fresh seeds, one width) guards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize, minimize_scalar

CHI2_95 = 3.841458820694124
"""The 95% quantile of chi-squared with one degree of freedom."""
MAX_LOG_SLOPE = 6.0
"""Slopes are bounded to e^6 per neuron: a step inside one neuron is as good as a cliff."""
SEARCH = 512.0
"""How far (neurons) past the data an interval end is looked for before it is called open."""


@dataclass(frozen=True)
class Point:
    """Successes out of seeds at one width (one evaluation, or several pooled)."""

    neurons: int
    successes: int
    seeds: int


@dataclass(frozen=True)
class Curve:
    """A fitted success curve: where it crosses `rate`, its slope, and the interval."""

    rate: float
    crossing: float
    """The width (fractional) where the fitted rate equals `rate`."""
    slope: float
    """Logits per neuron."""
    interval: tuple[float | None, float | None]
    """95% profile-likelihood interval of `crossing` (None: open on that side)."""
    points: tuple[Point, ...]

    def at(self, neurons: float) -> float:
        """The fitted rate at a width."""
        z = _logit(self.rate) + self.slope * (neurons - self.crossing)
        return 1.0 / (1.0 + math.exp(-z))

    def smallest(self) -> int:
        """The smallest whole width whose fitted rate is at least `rate`."""
        width = math.ceil(self.crossing - 1e-9)
        return max(1, width)

    @property
    def seeds(self) -> int:
        return sum(p.seeds for p in self.points)

    def to_dict(self) -> dict:
        return {
            "rate": self.rate,
            "crossing": self.crossing,
            "slope": self.slope,
            "interval_95": list(self.interval),
            "points": [[p.neurons, p.successes, p.seeds] for p in self.points],
        }

    @classmethod
    def from_dict(cls, values: dict) -> Curve:
        low, high = values["interval_95"]
        return cls(
            values["rate"],
            values["crossing"],
            values["slope"],
            (low, high),
            tuple(Point(*p) for p in values["points"]),
        )


class NoCrossing(ValueError):
    """The points do not place a crossing: every width passes, every width fails, or the rate
    does not rise with width."""

    def __init__(self, message: str, direction: int) -> None:
        super().__init__(message)
        self.direction = direction
        """+1: look at wider networks, -1: at narrower ones, 0: the data say nothing."""


def pool(points: Iterable[Point]) -> tuple[Point, ...]:
    """One point per width (counts added), by width."""
    by_width: dict[int, list[int]] = {}
    for p in points:
        k, n = by_width.setdefault(p.neurons, [0, 0])
        by_width[p.neurons] = [k + p.successes, n + p.seeds]
    return tuple(Point(w, k, n) for w, (k, n) in sorted(by_width.items()))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _loglik(points: Sequence[Point], crossing: float, log_slope: float, rate: float) -> float:
    w = np.array([p.neurons for p in points], dtype=float)
    k = np.array([p.successes for p in points], dtype=float)
    n = np.array([p.seeds for p in points], dtype=float)
    z = _logit(rate) + math.exp(log_slope) * (w - crossing)
    # log sigmoid(z) and log(1 - sigmoid(z)), stably
    return float(np.sum(-k * np.logaddexp(0.0, -z) - (n - k) * np.logaddexp(0.0, z)))


def _profile(points: Sequence[Point], crossing: float, rate: float) -> float:
    """The best log-likelihood of a curve through `crossing`."""
    found = minimize_scalar(
        lambda s: -_loglik(points, crossing, s, rate),
        bounds=(-12.0, MAX_LOG_SLOPE),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return -float(found.fun)


def fit(points: Iterable[Point], rate: float = 0.9) -> Curve:
    """The maximum-likelihood curve through `points` and the profile interval of its crossing;
    raises `NoCrossing` when the points cannot place one."""
    data = pool(points)
    if not data:
        raise NoCrossing("no held-out evaluations to fit", 0)
    widths = [p.neurons for p in data]
    if all(p.successes == p.seeds for p in data):
        raise NoCrossing("every width learns f on every seed", -1)
    if all(p.successes == 0 for p in data):
        raise NoCrossing("no width learns f on any seed", +1)
    share = [p.successes / p.seeds for p in data]
    # where the rate rises past `rate` if anywhere, as a start
    start_c = next((w for w, s in zip(widths, share, strict=True) if s >= rate), widths[-1])
    best = None
    for c0 in {start_c, float(np.mean(widths))}:
        for s0 in (-2.0, 0.0):
            found = minimize(
                lambda x: -_loglik(data, x[0], x[1], rate),
                np.array([float(c0), s0]),
                method="L-BFGS-B",
                bounds=[(min(widths) - SEARCH, max(widths) + SEARCH), (-12.0, MAX_LOG_SLOPE)],
            )
            if best is None or found.fun < best.fun:
                best = found
    assert best is not None
    crossing, log_slope = float(best.x[0]), float(best.x[1])
    top = -float(best.fun)
    # a slope at its lower bound is a flat curve: the rate does not rise with width
    if log_slope <= -11.5:
        raise NoCrossing("the success rate does not rise with width here", 0)

    def excess(c: float) -> float:
        return 2.0 * (top - _profile(data, c, rate)) - CHI2_95

    def end(direction: int) -> float | None:
        step, c = 0.25, crossing
        while abs(c - crossing) < SEARCH and c + direction * step > 0:
            nxt = c + direction * step
            if excess(nxt) > 0:
                return float(brentq(excess, c, nxt, xtol=1e-3) if direction > 0
                             else brentq(excess, nxt, c, xtol=1e-3))  # fmt: skip
            c, step = nxt, step * 1.5
        return None

    low, high = end(-1), end(+1)
    return Curve(  # rounded once, so that a curve read back from JSON is the same curve
        rate,
        round(crossing, 3),
        round(math.exp(log_slope), 6),
        (None if low is None else round(low, 3), None if high is None else round(high, 3)),
        data,
    )


RELIABILITY = (0.5, 0.9, 0.99)
"""The rates at which a cell's fitted widths are reported: the price of reliability."""


def fitted_widths(curve: Curve, rates: Sequence[float] = RELIABILITY) -> dict[str, Any]:
    """The widths where `curve`'s points cross each of `rates`, with their 95% intervals
    (`fit` at each rate, on the same points): {"50%": {"crossing": c, "interval_95": [low,
    high]}, ...}, None where the points place no crossing."""
    widths: dict[str, Any] = {}
    for rate in rates:
        try:
            fitted = curve if rate == curve.rate else fit(curve.points, rate)
        except NoCrossing:
            widths[f"{rate:.0%}"] = None
            continue
        widths[f"{rate:.0%}"] = {"crossing": fitted.crossing, "interval_95": list(fitted.interval)}
    return widths
