"""The study's statistics against scipy.stats, statsmodels, Monte Carlo and hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from kn_dist.stats import (
    binomial_se,
    expected_max,
    holm,
    iqm,
    paired,
    probability_of_improvement,
    stratified_bootstrap,
    summarize,
    verdict,
)


def test_summary_interval_matches_scipy_and_stays_in_bounds():
    values = [79.1, 78.5, 80.2, 79.5, 78.8]
    s = summarize(values, bounds=(0, 100))
    assert s.mean == pytest.approx(np.mean(values)) and s.sd == pytest.approx(np.std(values, ddof=1))
    low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high), rel=1e-12) and not s.clipped
    # The demo's skewed kn sample: the raw t-interval runs past 100 %; ours stops there and says so.
    sample = [82.8, 95.6, 96.9]
    low, high = sps.t.interval(0.95, 2, loc=np.mean(sample), scale=sps.sem(sample))
    skewed = summarize(sample, bounds=(0, 100))
    assert high > 100 and skewed.ci_high == 100.0 and skewed.clipped and skewed.ci_low == pytest.approx(low)
    one = summarize([50.0])
    assert one.mean == 50.0 and math.isnan(one.sd) and math.isnan(one.ci_low)


def test_at_three_seeds_the_t_interval_covers_and_the_bootstrap_does_not():
    """Why cells get a (clipped) t-interval, not a bootstrap: coverage of the true mean at n = 3."""
    rng = np.random.default_rng(0)
    t_hits = boot_hits = 0
    sims = 300
    for _ in range(sims):
        x = rng.normal(95.0, 1.0, size=3)
        s = summarize(x.tolist(), bounds=(0, 100))
        t_hits += s.ci_low <= 95.0 <= s.ci_high
        ci = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=999, random_state=rng).confidence_interval
        boot_hits += ci.low <= 95.0 <= ci.high
    assert t_hits / sims > 0.91 and boot_hits / sims < 0.85, (t_hits / sims, boot_hits / sims)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_comparison_matches_scipy_and_statsmodels(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(78.5, 0.6, size=5)
    kn = base + rng.normal(0.3, 0.4, size=5)
    ours = paired(kn.tolist(), base.tolist(), delta=0.5)
    ref = sps.ttest_rel(kn, base)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    p_tost, _, _ = ttost_paired(kn, base, -0.5, 0.5)
    assert ours.p_equivalent == pytest.approx(p_tost, rel=1e-9)


def test_zero_spread_is_never_significant():
    p = paired([80.0, 81.0, 82.0], [79.0, 80.0, 81.0], delta=0.5)  # every difference exactly +1
    assert p.diff == 1.0 and p.p_value == 1.0 and p.p_equivalent == 1.0
    assert verdict(p.diff, p.p_value, p.p_equivalent, 0.05) == "inconclusive"
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired([80.0], [79.0], delta=0.5)


def test_holm_matches_statsmodels():
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist(), rel=1e-12)


def test_verdicts():
    assert verdict(+0.8, 0.01, 0.9, 0.05) == "beats"
    assert verdict(-0.8, 0.01, 0.9, 0.05) == "loses to"
    assert verdict(+0.1, 0.6, 0.01, 0.05) == "equivalent"
    assert verdict(+0.1, 0.6, 0.2, 0.05) == "inconclusive"


def test_probability_of_improvement_is_the_normalised_mann_whitney_u():
    a, b = [80.1, 80.5, 79.9, 80.5], [80.0, 80.5, 79.0]
    u = sps.mannwhitneyu(a, b, alternative="two-sided").statistic
    assert probability_of_improvement(a, b) == pytest.approx(u / (len(a) * len(b)))


def test_iqm_is_the_mean_of_the_middle_half():
    values = [9.0, 1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 100.0]  # sorted 1 2 3 5 7 8 9 100: middle four 3 5 7 8
    assert iqm(values) == pytest.approx((3 + 5 + 7 + 8) / 4)


def test_stratified_bootstrap_resamples_within_strata():
    # Two strata with no spread: every resample's mean difference is the same, so is the interval.
    strata = [[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [[3.0, 3.0], [1.0, 1.0]]]
    low, high = stratified_bootstrap(strata, lambda s: float(np.mean([np.mean(x - y) for x, y in s])))
    assert low == high == pytest.approx(1.5)
    # One stratum with spread: the percentile interval of the mean, as scipy's percentile bootstrap gives it.
    x = np.array([1.0, 2.0, 4.0, 8.0, 9.0])
    low, high = stratified_bootstrap([[x]], lambda s: float(np.mean(s[0][0])), resamples=4000)
    ref = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=4000, random_state=1).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.35) and high == pytest.approx(ref.high, abs=0.35)


def test_expected_max_matches_monte_carlo():
    scores = [0.61, 0.70, 0.72, 0.80, 0.83, 0.90]
    rng = np.random.default_rng(0)
    for n in (1, 3, 6):
        draws = rng.choice(scores, size=(100_000, n)).max(axis=1)
        assert expected_max(scores, n) == pytest.approx(draws.mean(), abs=2e-3)
    assert expected_max(scores, 1) == pytest.approx(np.mean(scores))


def test_binomial_se():
    assert binomial_se(0.9, 10_000) == pytest.approx(0.003)
