"""The exact bounds of the offline gate, on hand cases (the arithmetic is in each
function's docstring in orchestrator/evaluation/bounds.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.evaluation.bounds import class_bounds, clopper_pearson, overall, paired_change, three_way


def test_clopper_pearson_by_hand():
    assert clopper_pearson(0, 2, 0.25) == pytest.approx((0.0, 0.5))          # (1 - p)^2 = 0.25
    assert clopper_pearson(2, 2, 0.25) == pytest.approx((0.5, 1.0))          # p^2 = 0.25
    lo, hi = clopper_pearson(1, 2, 0.25)
    assert lo == pytest.approx(1 - math.sqrt(0.75)) and hi == pytest.approx(math.sqrt(0.75))
    assert clopper_pearson(0, 0, 0.05) == (0.0, 1.0)                          # no trials: no information
    assert clopper_pearson(0, 171, 0.05)[1] == pytest.approx(1 - 0.05 ** (1 / 171))


def test_clopper_pearson_refuses_nonsense():
    with pytest.raises(ValueError):
        clopper_pearson(3, 2, 0.05)
    with pytest.raises(ValueError):
        clopper_pearson(1, 2, 0.0)


def test_clopper_pearson_covers_at_its_level():
    """Each one-sided bound misses the true rate at most alpha of the time (exact, so at
    most; checked by simulation at p = 0.03, n = 200, alpha = 0.05)."""
    rng = np.random.default_rng(0)
    ks = rng.binomial(200, 0.03, size=4000)
    bounds = np.array([clopper_pearson(int(k), 200, 0.05) for k in ks])
    assert np.mean(bounds[:, 0] > 0.03) <= 0.05 and np.mean(bounds[:, 1] < 0.03) <= 0.05


def test_paired_change_by_hand():
    """b = 2, c = 0 of 10 at 0.25: pi in (0.5, 1), change (2/10)(2 pi - 1) in (0, 0.2);
    swapping b and c mirrors it; no discordant pair: (0, 0), conditional on m = 0."""
    assert paired_change(2, 0, 10, 0.25) == pytest.approx((0.0, 0.2))
    assert paired_change(0, 2, 10, 0.25) == pytest.approx((-0.2, 0.0))
    assert paired_change(0, 0, 10, 0.05) == (0.0, 0.0)
    # b = 1, c = 0 of 171 at 0.0125: pi in (0.0125, 1): change in (-0.0057, +0.0058)
    lo, hi = paired_change(1, 0, 171, 0.0125)
    assert lo == pytest.approx((2 * 0.0125 - 1) / 171) and hi == pytest.approx(1 / 171)
    with pytest.raises(ValueError):
        paired_change(6, 5, 10, 0.05)
    # a non-zero limit: Clopper-Pearson of b/n and c/n at alpha/2 each
    lo, hi = paired_change(0, 0, 10, 0.1, limit=0.05)
    assert hi == pytest.approx(1 - 0.05 ** 0.1) and lo == pytest.approx(-hi)


def test_paired_change_covers_the_change_at_a_non_zero_limit():
    """The case where mapping McNemar's bounds through the observed m/n fails: 539 pairs,
    6 % discordant, true change exactly at the limit 0.05 (p_b = 0.055, p_c = 0.005).
    A false pass (upper <= limit) must happen at most alpha = 1.25 % of the time; 2000
    seeded draws (the realised rate is about 0.3 %, binomial noise sd 0.25 points)."""
    rng = np.random.default_rng(11)
    draws = rng.multinomial(539, [0.055, 0.005, 0.94], size=2000)
    passes = [paired_change(int(b), int(c), 539, 0.0125, limit=0.05)[1] <= 0.05 for b, c, _ in draws]
    assert np.mean(passes) <= 0.0125


def test_class_bounds_by_hand():
    """(0, 2) flips of (2, 2) samples at 0.5 -> each class at 0.25: (0, 0.5) and (0.5, 1);
    a class with no sample is (0, 0) and does not count for Bonferroni."""
    lows, highs = class_bounds([0, 2], [2, 2], 0.5)
    assert lows == pytest.approx([0.0, 0.5]) and highs == pytest.approx([0.5, 1.0])
    lows, highs = class_bounds([0, 2, 0], [2, 2, 0], 0.5)
    assert lows == pytest.approx([0.0, 0.5, 0.0]) and highs == pytest.approx([0.5, 1.0, 0.0])


def test_three_way_and_overall():
    assert three_way(0.01, 0.03, 0.02) == "inconclusive"
    assert three_way(0.0, 0.02, 0.02) == "pass"          # inclusive
    assert three_way(0.021, 0.05, 0.02) == "fail"
    assert three_way(0.01, 0.2, 0.0, above=True) == "pass"
    assert three_way(-0.2, -0.01, 0.0, above=True) == "fail"
    assert three_way(0.0, 0.0, 0.0, above=True) == "inconclusive"
    assert overall(["pass", "inconclusive", "fail"]) == "fail"
    assert overall(["pass", "inconclusive"]) == "inconclusive"
    assert overall(["pass", "pass"]) == "pass" and overall([]) == "pass"
