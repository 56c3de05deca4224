"""The answer of a study per architecture, from each cell's test top-1 per study seed (no MLflow here).

For every KernelNorm cell next to the architecture's published norm: the per-seed differences (seed s
trained both with the same data order, kn_dist.study), their paired mean, 95 % t-interval, p-value and
TOST equivalence p-value within ±delta (kn_dist.stats), P(KN > published) with a bootstrap interval, and
with per-example test records the difference's interval including the test set's sampling error. The
verdict is exactly one of beats / loses to / equivalent / inconclusive, from p-values Holm-corrected
across the report's comparisons at the level of one look of the study's seed plan (alpha / looks: a
group-sequential design with Bonferroni spending, so adding seed rounds until decided keeps the
false-"beats" rate within alpha; tests/test_study_answer.py simulates it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import stdtrit

from kn_dist.stats import Paired, Verdict, holm, paired, probability_of_improvement, stratified_bootstrap, verdict


class SeedPolicy(BaseModel):
    """`study.seeds: {min, max, batch}`: seed rounds added until every verdict is decided.

    Looks come after min, min + batch, ... seeds and at max; each look judges at alpha / looks (Bonferroni
    spending over the planned looks), so stopping at the first decisive look keeps every verdict's error
    rate within alpha (kn_dist.study_answer)."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(3, ge=2)
    max: int = Field(10, ge=2)
    batch: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> SeedPolicy:
        if self.max < self.min:
            raise ValueError(f"seeds.max={self.max} is below seeds.min={self.min}")
        return self


def seed_looks(seeds: int | list[int] | SeedPolicy) -> list[int]:
    """The numbers of seeds at which the study judges its comparisons: one look for a fixed number."""
    if isinstance(seeds, SeedPolicy):
        return sorted({*range(seeds.min, seeds.max, seeds.batch), seeds.max})
    return [seeds if isinstance(seeds, int) else len(seeds)]


@dataclass(frozen=True)
class Comparison:
    """KernelNorm cell `kn` against the published norm `base` of `model`, paired by study seed."""

    model: str
    kn: str
    base: str
    seeds: list[int]
    kn_scores: list[float]  # test top-1 in %, one per seed (same order as seeds)
    base_scores: list[float]
    paired: Paired | None  # None below 2 pairs
    p_improvement: float  # P(KN > published)
    p_improvement_ci: tuple[float, float]
    alpha: float  # the level each adjusted p-value is compared with (one look)
    p_diff_adjusted: float = math.nan
    p_equivalent_adjusted: float = math.nan
    verdict: Verdict = "inconclusive"
    with_test_sampling: tuple[float, float] | None = None  # 95 % CI of the difference, examples resampled too

    def sentence(self) -> str:
        """The answer in words, with every figure it rests on."""
        n = len(self.seeds)
        if self.paired is None:
            return f"{self.model}: {self.kn} vs {self.base} is undecided: {n} paired seed(s), at least 2 needed."
        d = self.paired
        figures = (
            f"{self.kn} − {self.base} = {d.diff:+.2f} pt over {n} paired seeds, 95 % CI {d.ci_low:+.2f} to "
            f"{d.ci_high:+.2f}, Holm-adjusted p = {self.p_diff_adjusted:.3g}, TOST (±{d.delta:g} pt) "
            f"p = {self.p_equivalent_adjusted:.3g} against α = {self.alpha:.3g}; P({self.kn} > {self.base}) = "
            f"{self.p_improvement:.2f} [{self.p_improvement_ci[0]:.2f}, {self.p_improvement_ci[1]:.2f}]"
        )
        lead = {
            "beats": f"{self.kn} beats {self.base} on {self.model}",
            "loses to": f"{self.kn} loses to {self.base} on {self.model}",
            "equivalent": f"{self.kn} and {self.base} are equivalent on {self.model} within ±{d.delta:g} pt",
            "inconclusive": f"{self.model}: {self.kn} vs {self.base} is inconclusive",
        }[self.verdict]
        return f"{lead} ({figures})."


def _paired_scores(kn: dict[int, float], base: dict[int, float]) -> tuple[list[int], list[float], list[float]]:
    seeds = sorted(set(kn) & set(base))
    return seeds, [kn[s] for s in seeds], [base[s] for s in seeds]


def compare(
    pairs: list[tuple[str, str, str, dict[int, float], dict[int, float]]],
    *,
    delta: float,
    alpha: float,
    looks: int = 1,
    predictions: dict[tuple[str, str], dict[int, np.ndarray]] | None = None,
    resamples: int = 1000,
) -> list[Comparison]:
    """Comparisons of (model, kn norm, base norm, kn scores by seed, base scores by seed), with verdicts.

    Holm's correction runs over the comparisons that have at least 2 pairs; each is judged at alpha / looks.
    `predictions[(model, norm)][seed]` (1 where the final got a test example right) adds the interval with
    the test set's sampling error. `resamples`: bootstrap draws of each interval.
    """
    level = alpha / looks
    out = []
    for model, kn, base, kn_scores, base_scores in pairs:
        seeds, a, b = _paired_scores(kn_scores, base_scores)
        p = paired(a, b, delta) if len(seeds) >= 2 else None
        strata = [[a, b]] if seeds else [[[0.0], [0.0]]]
        pi_ci = stratified_bootstrap(
            strata, lambda s: probability_of_improvement(s[0][0], s[0][1]), resamples=resamples
        )
        examples = None
        if predictions and p is not None:
            by_norm = (predictions.get((model, kn), {}), predictions.get((model, base), {}))
            examples = _with_test_sampling(*by_norm, seeds, p)
        pi = probability_of_improvement(a, b) if seeds else 0.5
        out.append(Comparison(model, kn, base, seeds, a, b, p, pi, pi_ci, level, with_test_sampling=examples))
    tested = [i for i, c in enumerate(out) if c.paired is not None]
    adjusted_diff = holm([out[i].paired.p_value for i in tested])
    adjusted_equiv = holm([out[i].paired.p_equivalent for i in tested])
    for i, p_diff, p_equiv in zip(tested, adjusted_diff, adjusted_equiv, strict=True):
        c = out[i]
        judged = verdict(c.paired.diff, p_diff, p_equiv, level)
        out[i] = replace(c, p_diff_adjusted=p_diff, p_equivalent_adjusted=p_equiv, verdict=judged)
    return out


def _with_test_sampling(
    kn: dict[int, np.ndarray], base: dict[int, np.ndarray], seeds: list[int], d: Paired
) -> tuple[float, float] | None:
    """95 % interval of the mean paired difference (pt) with the test set's sampling error added.

    The paired t-interval over seeds holds the training noise; the test set is one sample of the data
    distribution, shared by every final. Its sampling variance of the mean difference is var_e(D_e) / n_e,
    with D_e the per-example difference (1 right, 0 wrong) averaged over seeds. The two add up:
    se = sqrt(sd_d^2 / n + var_e(D_e) / n_e), and the interval keeps the t quantile with n - 1 df, so it
    is never narrower than the seeds-only interval.
    """
    if not all(s in kn and s in base for s in seeds):
        return None
    if len({len(kn[s]) for s in seeds} | {len(base[s]) for s in seeds}) != 1:
        return None  # not the same test examples
    per_example = 100.0 * np.mean([kn[s].astype(np.float64) - base[s].astype(np.float64) for s in seeds], axis=0)
    test_var = float(np.var(per_example, ddof=1)) / len(per_example)
    n = len(seeds)
    se = math.sqrt(d.sd**2 / n + test_var)
    half = float(stdtrit(n - 1, 0.975)) * se
    return d.diff - half, d.diff + half


def decided(comparisons: list[Comparison]) -> bool:
    """Every comparison has a verdict other than inconclusive."""
    return all(c.verdict != "inconclusive" for c in comparisons)
