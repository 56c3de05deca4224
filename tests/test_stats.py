"""The study's statistics against scipy.stats and a hand-computed example."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from kn_dist.stats import summarize, welch


def test_hand_computed_welch_example():
    # a = 1..4: mean 2.5, s² = 5/3; b = 2, 4, 6, 8: mean 5, s² = 20/3.
    # se² = (5/3)/4 + (20/3)/4 = 25/12; df = (25/12)² / ((5/12)²/3 + (20/12)²/3) = 625 / 141.666... = 4.41176
    d = welch([1, 2, 3, 4], [2, 4, 6, 8])
    assert d.diff == pytest.approx(-2.5)
    assert d.df == pytest.approx(625 / (425 / 3), rel=1e-12)
    half = (d.ci_high - d.ci_low) / 2
    # t(0.975, df) from a t table, interpolated in 1/df between df 4 (2.776) and 5 (2.571): 2.680
    assert half / math.sqrt(25 / 12) == pytest.approx(2.680, abs=5e-3)
    assert not d.detected and 0.1 < d.p_value < 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(78.5, 0.4, size=5).tolist(), rng.normal(79.2, 0.7, size=3).tolist()
    ours = welch(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.df == pytest.approx(ref.df, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert ours.detected == (ref.pvalue < 0.05)


def test_summary_interval_matches_scipy():
    values = [0.791, 0.785, 0.802, 0.795, 0.788]
    s = summarize(values)
    assert s.mean == pytest.approx(np.mean(values)) and s.sd == pytest.approx(np.std(values, ddof=1))
    low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high), rel=1e-12)
    one = summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.sd) and math.isnan(one.ci_low)


def test_welch_refuses_single_seeds():
    with pytest.raises(ValueError, match="at least 2 values"):
        welch([0.5], [0.4, 0.6])
