"""kn_dist.mix against torchvision's v2.MixUp / v2.CutMix (the same pairing, box and label mixing, given the same
Beta variate and box centre), scipy's Beta distribution (the per-batch lam) and the documented SplitMix64 stream
(tests/data_helpers.py's reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import sm64
from scipy import stats
from scipy.special import betaincinv
from torchvision.transforms import v2

from kn_dist.config import OptimConfig
from kn_dist.mix import MIX_STREAM, Mix, cutmix_box, draw, mix_images, mix_targets

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


class _Fixed:
    """A distribution whose sample() is the given value: how the tests hand torchvision our Beta variate."""

    def __init__(self, value: float):
        self.value = value

    def sample(self, shape=()):
        return torch.tensor(self.value, dtype=torch.float64)  # float64: lam reaches torchvision unrounded


def _batch(n: int = 8, c: int = 3, h: int = 12, w: int = 10, classes: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, h, w, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("lam", [0.0, 0.27, 0.5, 0.93])
def test_mixup_equals_torchvision_v2_mixup(lam):
    images, labels = _batch()
    mixup = v2.MixUp(alpha=0.8, num_classes=5)
    mixup._dist = _Fixed(lam)
    want_images, want_labels = mixup(images, labels)
    mix = Mix("mixup", lam, beta=lam)
    assert torch.equal(mix_images(images, mix), want_images)
    assert torch.equal(mix_targets(labels, mix, 5), want_labels)


@pytest.mark.parametrize("lam,seed", [(0.1, 0), (0.5, 1), (0.77, 2), (0.999, 3), (0.0, 4)])
def test_cutmix_equals_torchvision_v2_cutmix(lam, seed):
    images, labels = _batch()
    h, w = images.shape[-2:]
    cutmix = v2.CutMix(alpha=1.0, num_classes=5)
    cutmix._dist = _Fixed(lam)
    torch.manual_seed(seed)
    want_images, want_labels = cutmix(images, labels)
    torch.manual_seed(seed)  # the centre torchvision drew: randint(W), then randint(H)
    r_x, r_y = int(torch.randint(w, size=(1,))), int(torch.randint(h, size=(1,)))
    box, kept = cutmix_box(lam, r_x, r_y, h, w)
    mix = Mix("cutmix", kept, box, beta=lam, centre=(r_x, r_y))
    assert torch.equal(mix_images(images, mix), want_images)
    assert torch.equal(mix_targets(labels, mix, 5), want_labels)


def _key(seed: int, epoch: int, batch: int, rank: int) -> int:
    return sm64(sm64(sm64(sm64((seed ^ MIX_STREAM) & M64) ^ epoch) ^ batch) ^ rank)


def _u(key: int, slot: int) -> float:
    return (sm64((key + slot * GOLDEN) & M64) >> 11) / 2.0**53


def test_draws_follow_the_documented_stream():
    cfg = OptimConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.9, mix_switch_prob=0.5)
    for batch in range(40):
        key = _key(11, 2, batch, 1)
        mix = draw(cfg, 11, 2, batch, 1, 32, 24)
        if _u(key, 0) >= 0.9:
            assert mix.kind == "none"
            continue
        cutmix = _u(key, 1) < 0.5
        alpha = 1.0 if cutmix else 0.8
        assert mix.kind == ("cutmix" if cutmix else "mixup")
        assert mix.beta == pytest.approx(betaincinv(alpha, alpha, _u(key, 2)), rel=1e-12)
        if cutmix:
            assert mix.centre == (int(_u(key, 3) * 24), int(_u(key, 4) * 32))
    assert draw(cfg, 11, 2, 5, 1, 32, 24) == draw(cfg, 11, 2, 5, 1, 32, 24)  # a pure function


def test_mixing_distribution_switch_and_probability():
    cfg = OptimConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.8, mix_switch_prob=0.3)
    mixes = [draw(cfg, 0, epoch, batch, 0, 32, 32) for epoch in range(20) for batch in range(300)]
    n = len(mixes)
    mixed = [m for m in mixes if m.kind != "none"]
    assert abs(len(mixed) / n - 0.8) < 4 * np.sqrt(0.16 / n)
    cut = [m for m in mixed if m.kind == "cutmix"]
    assert abs(len(cut) / len(mixed) - 0.3) < 4 * np.sqrt(0.21 / len(mixed))
    mixup_lams = [m.beta for m in mixed if m.kind == "mixup"]
    assert stats.kstest(mixup_lams, stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    assert stats.kstest([m.beta for m in cut], stats.beta(1.0, 1.0).cdf).pvalue > 1e-3
    centres = np.array([m.centre for m in cut])
    assert stats.chisquare(np.bincount(centres[:, 0], minlength=32)).pvalue > 1e-4  # uniform over columns
    for m in cut:  # lam is the share of the image each keeps
        x1, y1, x2, y2 = m.box
        assert m.lam == pytest.approx(1 - (x2 - x1) * (y2 - y1) / 32**2)


def test_ranks_and_batches_draw_independently_and_one_alpha_means_that_one():
    cfg = OptimConfig(mixup_alpha=1.0)
    lams = np.array([[draw(cfg, 3, 0, b, r, 8, 8).beta for r in range(2)] for b in range(2000)])
    assert abs(stats.pearsonr(lams[:, 0], lams[:, 1])[0]) < 0.1
    assert {draw(cfg, 3, 0, b, 0, 8, 8).kind for b in range(50)} == {"mixup"}
    assert {draw(OptimConfig(cutmix_alpha=1.0), 3, 0, b, 0, 8, 8).kind for b in range(50)} == {"cutmix"}
    assert draw(OptimConfig(), 3, 0, 0, 0, 8, 8).kind == "none"
