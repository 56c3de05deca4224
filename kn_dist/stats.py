"""The statistics of a study's answer: mean, sample sd and t-interval over seeds, and Welch's test.

Formulas (any statistics text, e.g. Welch 1947, "The generalization of Student's problem"):
- mean ± sd with the sample sd (n - 1); 95 % CI of the mean: mean ± t(0.975, n - 1) · sd / √n.
- difference of two means a − b: standard error se = √(sa²/na + sb²/nb); Welch–Satterthwaite degrees of
  freedom df = se⁴ / ((sa²/na)² / (na − 1) + (sb²/nb)² / (nb − 1)); CI = diff ± t(0.975, df) · se;
  two-sided p = 2 · (1 − T_df(|diff| / se)).
Student's t quantiles and CDF come from scipy.special (stdtrit, stdtr); tests/test_stats.py checks the
results against scipy.stats and a hand-computed example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.special import stdtr, stdtrit


@dataclass(frozen=True)
class Summary:
    """Mean, sample sd and 95 % CI of the mean of `n` values (sd and CI are nan for one value)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Difference:
    """a − b with its Welch 95 % CI, degrees of freedom and two-sided p-value."""

    diff: float
    ci_low: float
    ci_high: float
    df: float
    p_value: float
    n_a: int
    n_b: int

    @property
    def detected(self) -> bool:
        """The 95 % CI excludes 0 (equivalently p < 0.05)."""
        return self.ci_low > 0 or self.ci_high < 0


def summarize(values: list[float], confidence: float = 0.95) -> Summary:
    """Summary of `values` (at least one)."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def welch(a: list[float], b: list[float], confidence: float = 0.95) -> Difference:
    """Welch's unequal-variance comparison of mean(a) − mean(b); needs at least two values on each side."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least 2 values per group, got {len(a)} and {len(b)}")
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.sd**2 / sa.n, sb.sd**2 / sb.n
    diff = sa.mean - sb.mean
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical constant groups: no spread to test against
        p = 1.0 if diff == 0 else 0.0
        return Difference(diff, diff, diff, math.inf, p, sa.n, sb.n)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    half = float(stdtrit(df, 0.5 + confidence / 2)) * se
    p = 2.0 * (1.0 - float(stdtr(df, abs(diff) / se)))
    return Difference(diff, diff - half, diff + half, df, p, sa.n, sb.n)
