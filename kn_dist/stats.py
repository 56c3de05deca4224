"""The statistics of a study's answer: per-cell intervals, the paired comparison and its verdict, and the
aggregates of `kn-dist summary`.

- A cell's test top-1 over seeds: mean, sample sd and the 95 % t-interval of the mean intersected with
  [0, 100] % (flagged when cut). The intersection keeps the t-interval's coverage (the true mean lies in
  [0, 100]); at the 3-5 seeds a study runs, percentile and BCa bootstrap intervals cover far less than 95 %
  (tests/test_stats.py measures it), so they are not used per cell.
- KernelNorm vs the published norm, paired by study seed (seed s gives both the same data order): the
  per-seed differences d; mean, 95 % paired t-interval, two-sided p for d = 0, and the TOST p for
  equivalence within ±delta (Schuirmann 1987: the larger of the two one-sided p-values). Differences
  with zero spread give p = 1: never significant. Holm's step-down correction (Holm 1979) across a
  report's comparisons, for each family (difference, equivalence) apart.
- The verdict: "beats" / "loses to" when the Holm-adjusted p of the difference is below alpha, else
  "equivalent" when the adjusted TOST p is, else "inconclusive".
- P(KN > published): the probability of improvement of rliable (Agarwal et al. 2021), P(X > Y) + P(X = Y)/2
  over all pairs of runs (the normalised Mann-Whitney U), with a percentile bootstrap interval.
- Aggregates across studies: the interquartile mean (IQM, scipy.stats.trim_mean 0.25) and a stratified
  bootstrap: runs resampled within each study, as rliable does.
- Expected best validation score after n trials (Dodge et al. 2019, "Show your work"): with N scores sorted
  v(1) <= ... <= v(N), E[max of n draws with replacement] = sum_i v(i) ((i/N)^n - ((i-1)/N)^n).
Student's t quantiles and CDF come from scipy.special; tests/test_stats.py checks every figure against
scipy.stats (and statsmodels where it has the procedure).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import stdtr, stdtrit

Verdict = Literal["beats", "loses to", "equivalent", "inconclusive"]


@dataclass(frozen=True)
class Summary:
    """Mean, sample sd and 95 % CI of the mean of `n` values (sd and CI are nan for one value); `clipped`
    says the t-interval was cut to the bounds."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    clipped: bool = False


def summarize(values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> Summary:
    """Summary of `values` (at least one); the t-interval intersected with `bounds` when given."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is None:
        return Summary(n, mean, sd, low, high)
    cut_low, cut_high = max(low, float(bounds[0])), min(high, float(bounds[1]))
    return Summary(n, mean, sd, cut_low, cut_high, clipped=(cut_low, cut_high) != (low, high))


@dataclass(frozen=True)
class Paired:
    """a − b paired by seed: mean difference, its sd and 95 % t-interval, p for 0 and TOST p for ±delta."""

    n: int
    diff: float
    sd: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, H0: mean difference 0
    p_equivalent: float  # TOST, H0: |mean difference| >= delta
    delta: float


def paired(a: Sequence[float], b: Sequence[float], delta: float, confidence: float = 0.95) -> Paired:
    """The paired comparison of a and b (same length, at least 2, a[i] and b[i] from the same seed)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs, got {len(a)} and {len(b)} values")
    d = [x - y for x, y in zip(a, b, strict=True)]
    s = summarize(d, confidence)
    if s.sd == 0.0 or not math.isfinite(s.sd):  # no spread: nothing can be tested against it
        return Paired(s.n, s.mean, 0.0, s.mean, s.mean, 1.0, 1.0, delta)
    se, df = s.sd / math.sqrt(s.n), s.n - 1
    p = 2.0 * float(stdtr(df, -abs(s.mean) / se))
    p_above = float(stdtr(df, -(s.mean + delta) / se))  # H0: diff <= -delta
    p_below = float(stdtr(df, (s.mean - delta) / se))  # H0: diff >= +delta
    return Paired(s.n, s.mean, s.sd, s.ci_low, s.ci_high, p, max(p_above, p_below), delta)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(diff: float, p_diff: float, p_equivalent: float, alpha: float) -> Verdict:
    """Exactly one verdict from (Holm-adjusted) p-values at level alpha."""
    if p_diff < alpha:
        return "beats" if diff > 0 else "loses to"
    if p_equivalent < alpha:
        return "equivalent"
    return "inconclusive"


def probability_of_improvement(a: Sequence[float], b: Sequence[float]) -> float:
    """P(X > Y) + P(X = Y) / 2 for X drawn from a, Y from b (all pairs)."""
    x, y = np.asarray(a, dtype=float)[:, None], np.asarray(b, dtype=float)[None, :]
    return float(np.mean((x > y) + 0.5 * (x == y)))


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50 % (scipy.stats.trim_mean with 0.25 cut each side)."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(values, dtype=float), 0.25))


def stratified_bootstrap(
    strata: Sequence[Sequence[Sequence[float]]],
    statistic: Callable[[list[list[np.ndarray]]], float],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of `statistic` when each stratum's runs are resampled with replacement.

    `strata[k]` holds the arrays of stratum k that are resampled together by run index (e.g. a study's
    KernelNorm and baseline scores, index = seed); `statistic` gets the resampled strata in the same form.
    """
    rng = np.random.default_rng(seed)
    arrays = [[np.asarray(a, dtype=float) for a in stratum] for stratum in strata]
    values = []
    for _ in range(resamples):
        sample = []
        for stratum in arrays:
            n = len(stratum[0])
            pick = rng.integers(0, n, size=n)
            sample.append([a[pick] for a in stratum])
        values.append(statistic(sample))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def expected_max(scores: Sequence[float], n: int) -> float:
    """Expected best of n trials drawn with replacement from `scores` (Dodge et al. 2019)."""
    v = np.sort(np.asarray(scores, dtype=float))
    big_n = len(v)
    i = np.arange(1, big_n + 1)
    return float(np.sum(v * ((i / big_n) ** n - ((i - 1) / big_n) ** n)))


def binomial_se(accuracy: float, examples: int) -> float:
    """The test-set sampling error of one accuracy measured on `examples` examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / examples)
