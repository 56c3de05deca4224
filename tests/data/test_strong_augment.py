"""kn_dist.data.strong_augment: the compiled draws against the plain-Python reference of its docstring
(tests/data_helpers.py), bit for bit; their distributions against the transforms they stand for (RandAugment's
uniform op choice and fair signs, AutoAugment's policy probabilities, ColorJitter's factors and orders,
torchvision RandomErasing.get_params's rectangles, two-sample KS); and the whole transform against torchvision
image by image (its ops, F.normalize, v2's erase). No FFCV loader here (tests/data/test_strong_loader.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F2
from data_helpers import M64, ref_autoaugment, ref_erasing, ref_jitter, ref_key, ref_randaugment
from scipy import stats
from torchvision.transforms import InterpolationMode, RandomErasing
from torchvision.transforms.autoaugment import _apply_op

from kn_dist.config import DataConfig
from kn_dist.data import randaugment as ra
from kn_dist.data.strong_augment import StrongAugment, erase, erasing_draws

SIGNED_IDS = {ra.OP_ID[n] for n in ra.SIGNED}
MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def _op(cfg: DataConfig, seed: int = 7) -> StrongAugment:
    return StrongAugment(seed, cfg, MEAN, STD)


@pytest.mark.parametrize("seed,epoch", [(0, 0), (12345, 3), (-1, 99)])
def test_draws_equal_the_python_reference(seed, epoch):
    h, w = 32, 24
    indices = np.arange(0, 2_000, 13, dtype=np.uint64)
    cfg = DataConfig(randaugment_ops=3, randaugment_magnitude=12, color_jitter=0.3, random_erasing=0.6)
    ops, mags, boxes = _op(cfg, seed).draws(indices, epoch, h, w)
    table = ra.magnitude_bins(31, h, w)
    magnitude_of = [table[name][12] for name in ra.OPS]
    aa_cfg = DataConfig(autoaugment="cifar10")
    aa_ops, aa_mags, _ = _op(aa_cfg, seed).draws(indices, epoch, h, w)
    table10 = ra.magnitude_bins(10, h, w)
    policy = [
        [(ra.OP_ID[o], p, 0.0 if b is None else table10[o][b]) for o, p, b in sub] for sub in ra.AUTOAUGMENT_CIFAR10
    ]
    for row, index in enumerate(indices):
        key = ref_key(seed, epoch, int(index))
        want = ref_randaugment(key, 3, magnitude_of, SIGNED_IDS)
        want += [(ra.OP_ID[name], m) for name, m in ref_jitter(key, 0.3)]
        assert list(zip(ops[row].tolist(), mags[row].tolist(), strict=True)) == want
        assert tuple(boxes[row]) == ref_erasing(key, 0.6, (0.02, 0.33), (0.3, 3.3), h, w)
        want_aa = ref_autoaugment(key, policy, SIGNED_IDS)
        assert list(zip(aa_ops[row].tolist(), aa_mags[row].tolist(), strict=True)) == want_aa


def test_draw_distributions_are_randaugments_autoaugments_and_colorjitters():
    n = 60_000
    idx = np.arange(n, dtype=np.uint64)
    ops, mags, _ = _op(DataConfig(randaugment_ops=2, color_jitter=0.2)).draws(idx, 5, 32, 32)
    for k in range(2):
        assert stats.chisquare(np.bincount(ops[:, k], minlength=14)).pvalue > 1e-4  # uniform over 14 ops
        signed = np.isin(ops[:, k], list(SIGNED_IDS))
        assert abs((mags[signed, k] < 0).mean() - 0.5) < 4 * np.sqrt(0.25 / signed.sum())  # fair signs
    joint = np.bincount(ops[:, 0] * 14 + ops[:, 1], minlength=196)
    assert stats.chisquare(joint).pvalue > 1e-4  # the two ops independent
    jitter_ops, factors = ops[:, 2:], mags[:, 2:]
    orders = np.unique(jitter_ops, axis=0, return_counts=True)[1]
    assert len(orders) == 6 and stats.chisquare(orders).pvalue > 1e-4  # 3! orders, equally likely
    for op in ("Brightness", "Contrast", "Color"):
        values = factors[jitter_ops == ra.OP_ID[op]]
        assert stats.kstest(values, stats.uniform(-0.2, 0.4).cdf).pvalue > 1e-4  # factor - 1 in [-j, j]

    aa_ops, _, _ = _op(DataConfig(autoaugment="cifar10")).draws(idx, 5, 32, 32)
    for k in (0, 1):  # op k of a uniformly drawn sub-policy, applied with its probability (else Identity, id 0)
        expected = np.zeros(len(ra.OPS))
        for sub in ra.AUTOAUGMENT_CIFAR10:
            name, p, _ = sub[k]
            expected[ra.OP_ID[name]] += p / 25
            expected[0] += (1 - p) / 25
        observed = np.bincount(aa_ops[:, k], minlength=len(ra.OPS))
        assert observed[expected == 0].sum() == 0
        assert stats.chisquare(observed[expected > 0], n * expected[expected > 0]).pvalue > 1e-4, k


@pytest.mark.parametrize("scale,ratio", [((0.02, 0.33), (0.3, 3.3)), ((0.02, 0.4), (0.3, 1 / 0.3))])
def test_erasing_rectangles_follow_torchvisions_random_erasing(scale, ratio):
    n, h, w = 6_000, 32, 32
    cfg = DataConfig(random_erasing=1.0, random_erasing_scale=scale, random_erasing_ratio=ratio)
    ours = _op(cfg).draws(np.arange(n, dtype=np.uint64), 0, h, w)[2]
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    theirs = []
    for _ in range(n):
        i, j, eh, ew, v = RandomErasing.get_params(img, scale=scale, ratio=ratio, value=[0])
        theirs.append((i, j, eh, ew) if v is not img else (0, 0, 0, 0))  # all 10 attempts failed: no erase
    theirs = np.array(theirs)
    assert abs((ours[:, 2] == 0).mean() - (theirs[:, 2] == 0).mean()) < 0.01
    for column in range(4):  # top, left, height, width
        assert stats.ks_2samp(ours[:, column], theirs[:, column]).pvalue > 1e-3, column
    assert ((ours[:, 0] + ours[:, 2] <= h) & (ours[:, 1] + ours[:, 3] <= w)).all()
    p = erasing_draws(np.arange(n, dtype=np.uint64), np.uint64(1), np.uint64(0), 0.25, np.array(scale),
                      np.log(np.array(ratio)), h, w)  # fmt: skip
    assert abs((p[:, 2] > 0).mean() - 0.25) < 0.02  # erases with probability p (every attempt here fits)


def test_switching_one_augmentation_leaves_the_others_draws():
    idx = np.arange(300, dtype=np.uint64)
    full = _op(DataConfig(randaugment_ops=2, color_jitter=0.1, random_erasing=0.5)).draws(idx, 2, 32, 32)
    alone = _op(DataConfig(randaugment_ops=2)).draws(idx, 2, 32, 32)
    erasing = _op(DataConfig(random_erasing=0.5)).draws(idx, 2, 32, 32)
    assert np.array_equal(full[0][:, :2], alone[0]) and np.array_equal(full[1][:, :2], alone[1])
    assert np.array_equal(full[2], erasing[2])
    other_epoch = _op(DataConfig(randaugment_ops=2)).draws(idx, 3, 32, 32)
    assert (other_epoch[0] == alone[0]).mean() < 0.2  # a fresh draw each epoch (1/14 equal by chance)


def test_transform_equals_torchvision_image_by_image():
    """RandAugment(2, 9) + ColorJitter + Normalize + RandomErasing as torchvision computes them, given the draws."""
    h, w = 32, 32
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (48, 3, h, w), generator=g, dtype=torch.uint8)
    indices = np.arange(1000, 1048, dtype=np.uint64)
    cfg = DataConfig(randaugment_ops=2, color_jitter=0.2, random_erasing=0.5)
    op = _op(cfg)
    out = op.transform(images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), indices, 4)  # channels_last view
    ops, mags, boxes = op.draws(indices, 4, h, w)
    mean, std = [m / 255 for m in MEAN], [s / 255 for s in STD]
    for i in range(len(images)):
        x = images[i]
        for o, m in zip(ops[i], mags[i], strict=True):
            x = _apply_op(x, ra.OPS[o], float(m), InterpolationMode.NEAREST, None)
        x = F2.normalize(F2.to_dtype(x, torch.float32, scale=True), mean, std)
        top, left, eh, ew = boxes[i].tolist()
        if eh:
            x = F2.erase(x, top, left, eh, ew, torch.zeros(3, 1, 1))
        torch.testing.assert_close(out[i], x, rtol=0, atol=2e-6)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert (boxes[:, 2] > 0).sum() > 10 and not np.all(ops == 0)


def test_erase_equals_torchvision_v2_erase():
    x = torch.randn(5, 3, 12, 10)
    boxes = np.array([[0, 0, 3, 4], [2, 5, 10, 5], [0, 0, 0, 0], [11, 9, 1, 1], [4, 1, 7, 8]])
    ours = erase(x, boxes)
    for i, (top, left, eh, ew) in enumerate(boxes.tolist()):
        want = F2.erase(x[i], top, left, eh, ew, torch.zeros(3, 1, 1)) if eh else x[i]
        assert torch.equal(ours[i], want)


def test_seed_wraps_to_64_bits():
    a = _op(DataConfig(randaugment_ops=2), seed=-1).draws(np.arange(50, dtype=np.uint64), 0, 32, 32)
    b = _op(DataConfig(randaugment_ops=2), seed=M64).draws(np.arange(50, dtype=np.uint64), 0, 32, 32)
    assert np.array_equal(a[0], b[0])


@pytest.mark.parametrize(
    "override,message",
    [
        (["data.randaugment_ops=2", "data.autoaugment=cifar10"], "data.randaugment_ops and data.autoaugment"),
        (["data.randaugment_magnitude=11", "data.randaugment_bins=11"], "data.randaugment_magnitude 11 must be below"),
        (["data.random_erasing_scale=[0.4, 0.1]"], r"data.random_erasing_scale \[0.4, 0.1\]"),
        (["data.random_erasing_ratio=[0, 2]"], r"data.random_erasing_ratio \[0.0, 2.0\]"),
        (["data.color_jitter=0.7"], "'data.color_jitter'"),
        (["optim.ema_decay=1"], "'optim.ema_decay'"),
    ],
)
def test_bad_augmentation_settings_are_one_sentence_naming_the_keys(override, message):
    from kn_dist import config
    from kn_dist.errors import UserError

    with pytest.raises(UserError, match=message):
        config.load(None, override)
