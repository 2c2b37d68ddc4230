"""The stricter stating rule: its operating characteristic and its verdicts."""

from __future__ import annotations

import pytest
from scipy.stats import beta

from study.stating_rule import StatingRule, lower_bound


def test_the_rule_rarely_states_an_85_percent_width_and_nearly_always_a_95_percent_one():
    rule = StatingRule()
    for seeds in (192, 216, 288, 480):
        assert rule.chance(0.85, seeds) < 0.05, seeds
        assert rule.chance(0.95, seeds) > 0.80, seeds
    # Monte Carlo agrees with the exact figure
    for rate in (0.85, 0.9, 0.95):
        assert rule.simulate(rate, 192, draws=50_000) == pytest.approx(
            rule.chance(rate, 192), abs=0.01
        )


def test_lower_bound_is_clopper_pearsons_one_sided():
    assert lower_bound(173, 192) == pytest.approx(beta.ppf(0.05, 173, 20))
    assert lower_bound(0, 50) == 0.0
    assert lower_bound(50, 50) == pytest.approx(0.05 ** (1 / 50))


@pytest.mark.parametrize(
    "successes, seeds, blocks, verdict",
    [
        (173, 192, 2, "holds"),
        (172, 192, 2, "fails on its seeds"),
        (173, 192, 1, "needs 1 more block(s)"),
        (109, 120, 2, "needs 72 more seeds"),
        (87, 96, 1, "needs 96 more seeds and 1 more block(s)"),
        (60, 120, 2, "fails: below 90% even if every further seed learned f"),
    ],
)
def test_verdicts(successes, seeds, blocks, verdict):
    rule = StatingRule()
    assert rule.verdict(successes, seeds, blocks) == verdict
    assert rule.holds(successes, seeds, blocks) == (verdict == "holds")
    assert rule.least_successes(192) == 173
