"""The fitted success curve: maximum likelihood and the profile-likelihood interval of the 90%
crossing, on counts drawn from known curves; the cases where no crossing can be placed."""

import math

import numpy as np
import pytest

from study.success_curve import CHI2_95, Curve, NoCrossing, Point, fit, pool


def drawn(crossing, slope, widths, seeds, rng, rate=0.9):
    logit = math.log(rate / (1 - rate))
    return [
        Point(w, int(rng.binomial(seeds, 1 / (1 + math.exp(-(logit + slope * (w - crossing)))))),
              seeds)
        for w in widths
    ]  # fmt: skip


def test_the_crossing_of_a_known_curve_is_found_and_covered():
    """Counts drawn from a curve crossing 90% at 57.3: the fit lands near it and its 95%
    interval covers it in about 95% of 60 draws (at least 50; a binomial 95% has 57 +- 3.4)."""
    rng = np.random.default_rng(0)
    covered, errors = 0, []
    for _ in range(60):
        curve = fit(
            drawn(57.3, 0.45, [51, 54, 57, 60, 63], 24, rng) + drawn(57.3, 0.45, [57], 96, rng)
        )
        low, high = curve.interval
        assert low is not None and high is not None and low < curve.crossing < high
        covered += low <= 57.3 <= high
        errors.append(curve.crossing - 57.3)
    assert covered >= 50
    assert abs(float(np.median(errors))) < 0.7


def test_the_interval_is_where_the_likelihood_drops_by_the_chi_squared_quantile():
    from study.success_curve import _profile

    points = [Point(50, 3, 24), Point(54, 12, 24), Point(58, 20, 24), Point(62, 24, 24)]
    curve = fit(points)
    top = _profile(points, curve.crossing, 0.9)
    for end in curve.interval:
        assert 2 * (top - _profile(points, end, 0.9)) == pytest.approx(CHI2_95, abs=0.02)
    assert curve.at(curve.crossing) == pytest.approx(0.9)
    assert curve.smallest() == math.ceil(curve.crossing)
    assert curve.at(curve.smallest()) >= 0.9 > curve.at(curve.smallest() - 1)


def test_points_of_one_width_pool_and_a_curve_reads_back():
    points = [Point(5, 3, 10), Point(4, 1, 10), Point(5, 9, 10)]
    assert pool(points) == (Point(4, 1, 10), Point(5, 12, 20))
    curve = fit([Point(3, 0, 20), Point(4, 6, 20), Point(5, 15, 20), Point(6, 20, 20)])
    assert Curve.from_dict(curve.to_dict()) == curve


@pytest.mark.parametrize(
    ("points", "direction"),
    [
        ([Point(10, 20, 20), Point(12, 20, 20)], -1),  # every width passes: look narrower
        ([Point(10, 0, 20), Point(12, 0, 20)], +1),  # none does: look wider
        ([], 0),
    ],
)
def test_no_crossing_says_where_to_look(points, direction):
    with pytest.raises(NoCrossing) as missing:
        fit(points)
    assert missing.value.direction == direction


def test_a_crossing_outside_the_data_has_an_open_interval():
    """Widths that all pass but one seed: the data place no lower end."""
    curve = fit([Point(57, 23, 24), Point(60, 24, 24), Point(63, 24, 24)])
    assert curve.interval[0] is None
