"""The answer per architecture (kn_dist.study_answer): verdicts, Holm across comparisons, the interval with
the test set's sampling error, and the error rate of adding seed rounds until decided, by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from kn_dist.study_answer import SeedPolicy, compare, decided, seed_looks


def _pair(model: str, kn: list[float], base: list[float]):
    return (model, "kn", "bn", dict(enumerate(kn)), dict(enumerate(base)))


def test_verdicts_holm_and_pairing_by_seed():
    clear_win = _pair("a", [80.9, 81.2, 81.0, 81.4, 81.1], [80.0, 80.1, 80.2, 80.3, 80.0])
    same = _pair("b", [70.02, 69.98, 70.01, 70.0, 69.99], [70.0, 70.01, 69.99, 70.02, 69.98])
    noisy = _pair("c", [60.0, 62.0, 58.0], [61.0, 59.0, 62.0])
    out = {c.model: c for c in compare([clear_win, same, noisy], delta=0.5, alpha=0.05)}
    assert (out["a"].verdict, out["b"].verdict, out["c"].verdict) == ("beats", "equivalent", "inconclusive")
    # Holm over the three difference p-values: the smallest is multiplied by 3
    assert out["a"].p_diff_adjusted == pytest.approx(min(1.0, 3 * out["a"].paired.p_value))
    assert out["a"].p_improvement == 1.0 and "beats bn on a" in out["a"].sentence()
    assert "equivalent on b within ±0.5 pt" in out["b"].sentence()
    assert not decided(list(out.values())) and decided([out["a"], out["b"]])
    # only the seeds both cells have are paired
    partial = compare([("d", "kn", "bn", {0: 1.0, 1: 2.0, 2: 3.0}, {1: 1.5, 2: 2.0, 7: 9.0})], delta=0.5, alpha=0.05)[0]
    assert partial.seeds == [1, 2] and partial.kn_scores == [2.0, 3.0]


def test_the_interval_with_test_sampling_widens_the_seed_interval():
    rng = np.random.default_rng(0)
    examples = 2000
    truth = rng.random(examples) < 0.9
    kn = {s: (truth ^ (rng.random(examples) < 0.05)).astype(np.int8) for s in range(4)}
    bn = {s: (truth ^ (rng.random(examples) < 0.06)).astype(np.int8) for s in range(4)}
    scores = {name: {s: 100 * float(v[s].mean()) for s in v} for name, v in (("kn", kn), ("bn", bn))}
    (c,) = compare(
        [("m", "kn", "bn", scores["kn"], scores["bn"])],
        delta=0.5,
        alpha=0.05,
        predictions={("m", "kn"): kn, ("m", "bn"): bn},
    )
    low, high = c.with_test_sampling
    # the seeds-only interval widened by the test set's sampling variance of the mean per-example difference
    per_example = 100 * np.mean([kn[s].astype(float) - bn[s].astype(float) for s in range(4)], axis=0)
    se = np.sqrt(c.paired.sd**2 / 4 + per_example.var(ddof=1) / examples)
    assert (low, high) == pytest.approx(
        (c.paired.diff - sps.t.ppf(0.975, 3) * se, c.paired.diff + sps.t.ppf(0.975, 3) * se)
    )
    assert low < c.paired.ci_low and high > c.paired.ci_high


def test_seed_plan_looks():
    assert seed_looks(3) == [3] and seed_looks([0, 4, 9]) == [3]
    assert seed_looks(SeedPolicy(min=3, max=10, batch=2)) == [3, 5, 7, 9, 10]
    assert seed_looks(SeedPolicy(min=5, max=5, batch=1)) == [5]


def test_each_look_is_judged_at_alpha_over_the_planned_looks():
    pair = _pair("m", [80.9, 81.2, 81.0], [80.0, 80.1, 80.2])
    (one,) = compare([pair], delta=0.5, alpha=0.05)
    (of_ten,) = compare([pair], delta=0.5, alpha=0.05, looks=10)
    assert one.alpha == 0.05 and of_ten.alpha == pytest.approx(0.005)
    assert one.p_diff_adjusted == of_ten.p_diff_adjusted < 0.05  # p = 0.019: "beats" at one look only
    assert (one.verdict, of_ten.verdict) == ("beats", "inconclusive")


def _false_decisions(looks: list[int], level: float, sims: int, rng: np.random.Generator) -> float:
    """Share of simulated studies with no true difference that stop on a "beats"/"loses to" verdict, when
    every look tests at `level` and the study stops at its first decided look. scipy's paired t-test and
    one-sided tests (TOST) on all simulated studies at once: a reference independent of kn_dist.stats."""
    base = rng.normal(90.0, 0.5, size=(sims, looks[-1]))
    kn = base + rng.normal(0.0, 0.4, size=(sims, looks[-1]))
    delta = 0.1
    open_ = np.ones(sims, dtype=bool)
    false = np.zeros(sims, dtype=bool)
    for n in looks:
        d = kn[:, :n] - base[:, :n]
        p = sps.ttest_rel(kn[:, :n], base[:, :n], axis=1).pvalue
        tost = np.maximum(
            sps.ttest_1samp(d, -delta, axis=1, alternative="greater").pvalue,
            sps.ttest_1samp(d, delta, axis=1, alternative="less").pvalue,
        )
        differs, equal = p < level, tost < level
        false |= open_ & differs
        open_ &= ~(differs | equal)
    return float(false.mean())


def test_adding_seed_rounds_until_decided_keeps_false_beats_within_alpha():
    looks = seed_looks(SeedPolicy(min=3, max=12, batch=1))  # 10 looks
    rng = np.random.default_rng(0)
    sims = 20_000
    ours = _false_decisions(looks, 0.05 / len(looks), sims, rng)
    naive = _false_decisions(looks, 0.05, sims, rng)  # alpha at every look, uncorrected
    se = np.sqrt(0.05 * 0.95 / sims)
    assert ours <= 0.05, ours
    assert naive > 0.05 + 3 * se, naive  # what the correction prevents
