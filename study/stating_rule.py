"""When a width may be stated as learning f on 90% of seeds: the rule, and what it risks.

A confirmation block of 96 seeds that passes 87/96 states a width whose true rate may well be
85%: the project's recheck of its stated widths on fresh seeds found about 85%. The rule here
pools every held-out seed a width was trained on (a failed block is data, never discarded) and
states the width only when

- at least `min_seeds` seeds from at least `min_blocks` blocks were trained at it,
- the pooled estimate is at least `min_estimate` (0.90), and
- the exact one-sided 95% lower bound of the pooled rate (Clopper-Pearson) is at least
  `min_lower` (0.85).

`chance` is the exact probability that the rule states a width of a given true rate from
`seeds` seeds; `simulate` draws the same by Monte Carlo (the report shows both): at 192 seeds a
width whose true rate is 85% is stated 2.5% of the time, one at 95% 99.8%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def lower_bound(successes: int, seeds: int, confidence: float = 0.95) -> float:
    """The exact one-sided lower confidence bound of a binomial rate (0 at 0 successes)."""
    from scipy.stats import beta

    if successes <= 0:
        return 0.0
    return float(beta.ppf(1 - confidence, successes, seeds - successes + 1))


@dataclass(frozen=True)
class StatingRule:
    """The evidence a stated width needs (defaults: the project's rule)."""

    min_seeds: int = 192
    min_blocks: int = 2
    min_estimate: float = 0.90
    min_lower: float = 0.85
    confidence: float = 0.95

    @classmethod
    def of(cls, plan) -> StatingRule:
        """The rule of a frontier plan (`FrontierPlan`: its required rate, stated seeds and
        margin)."""
        return cls(
            min_seeds=plan.stated_seeds,
            min_estimate=plan.required_rate,
            min_lower=plan.required_rate - plan.stated_margin,
        )

    def holds(self, successes: int, seeds: int, blocks: int) -> bool:
        return (
            seeds >= self.min_seeds
            and blocks >= self.min_blocks
            and successes >= self.min_estimate * seeds - 1e-9
            and lower_bound(successes, seeds, self.confidence) >= self.min_lower
        )

    def verdict(self, successes: int, seeds: int, blocks: int) -> str:
        """One phrase: holds, what it still needs, or that it fails on what it has."""
        if self.holds(successes, seeds, blocks):
            return "holds"
        if seeds >= self.min_seeds and blocks >= self.min_blocks:
            return "fails on its seeds"
        wanting = []
        if seeds < self.min_seeds:
            wanting.append(f"{self.min_seeds - seeds} more seeds")
        if blocks < self.min_blocks:
            wanting.append(f"{self.min_blocks - blocks} more block(s)")
        best = (successes + max(0, self.min_seeds - seeds)) / max(seeds, self.min_seeds)
        if best < self.min_estimate - 1e-9:
            return f"fails: below {self.min_estimate:.0%} even if every further seed learned f"
        return "needs " + " and ".join(wanting)

    def least_successes(self, seeds: int) -> int | None:
        """The fewest successes out of `seeds` the rule states a width on (None: none)."""
        return next((k for k in range(seeds + 1) if self.holds(k, seeds, self.min_blocks)), None)

    def chance(self, rate: float, seeds: int) -> float:
        """The exact probability that a width of true `rate`, trained on `seeds` seeds, is
        stated."""
        from scipy.stats import binom

        least = self.least_successes(seeds)
        return 0.0 if least is None else float(binom.sf(least - 1, seeds, rate))

    def simulate(self, rate: float, seeds: int, draws: int = 100_000, seed: int = 0) -> float:
        """The same by Monte Carlo: the share of `draws` simulated widths the rule states."""
        successes = np.random.default_rng(seed).binomial(seeds, rate, size=draws)
        least = self.least_successes(seeds)
        return 0.0 if least is None else float(np.mean(successes >= least))
