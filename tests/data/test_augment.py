"""kn_dist.data.augment against a plain-Python reference of the documented stream and numpy geometry.

The reference (tests/data_helpers.py) is written from the module docstring (SplitMix64 with Python integers, masked
to 64 bits; translate / flip / cutout with np.pad and slicing), checked against Vigna's published
splitmix64 outputs, and compared with the compiled kernels bit for bit. The distribution checks use
scipy's chi-square test. No FFCV loader is built here (tests/test_data.py does that).
"""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import GOLDEN, M64, ref_augment, ref_params, sm64
from scipy import stats

from kn_dist.data.augment import _augment_normalize, _augment_uint8, augment_params


def test_splitmix64_matches_the_published_reference_outputs():
    # splitmix64.c (Vigna) seeded with 0: the first outputs are 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4
    assert sm64(0) == 0xE220A8397B1DCDAF and sm64(GOLDEN) == 0x6E789E6AA1B965F4


def test_compiled_draws_equal_the_python_reference():
    indices = np.arange(0, 3_000, 7, dtype=np.uint64)
    for seed, epoch in ((0, 0), (12345, 3), (-1, 99)):
        got = augment_params(indices, np.uint64(seed & M64), np.uint64(epoch), 4, True, 9, 32, 24)
        want = [ref_params(seed, epoch, int(i), 4, True, 9, 32, 24) for i in indices]
        assert np.array_equal(got, np.array(want, dtype=np.int64)), (seed, epoch)


def test_draw_distribution_translate_flip_cutout():
    n, pad, cutout, h, w = 60_000, 4, 8, 32, 32
    p = augment_params(np.arange(n, dtype=np.uint64), np.uint64(5), np.uint64(2), pad, True, cutout, h, w)
    for column, k in ((0, 2 * pad + 1), (1, 2 * pad + 1), (3, h - cutout + 1), (4, w - cutout + 1)):
        offset = pad if column < 2 else 0
        values = p[:, column] + offset
        assert values.min() == 0 and values.max() == k - 1  # translate in [-pad, pad], square inside
        assert stats.chisquare(np.bincount(values, minlength=k)).pvalue > 1e-4  # uniform
    assert abs(p[:, 2].mean() - 0.5) < 4 * np.sqrt(0.25 / n)  # flip with probability 1/2
    joint = np.bincount((p[:, 0] + pad) * 9 + (p[:, 1] + pad), minlength=81)
    assert stats.chisquare(joint).pvalue > 1e-4  # dy and dx independent
    other = augment_params(np.arange(n, dtype=np.uint64), np.uint64(5), np.uint64(3), pad, True, cutout, h, w)
    assert abs((other[:, 0] == p[:, 0]).mean() - 1 / 9) < 0.01  # another epoch: fresh, independent draws


def test_slots_are_fixed_so_switching_one_augmentation_keeps_the_others():
    idx = np.arange(500, dtype=np.uint64)
    full = augment_params(idx, np.uint64(1), np.uint64(0), 4, True, 8, 32, 32)
    translate_only = augment_params(idx, np.uint64(1), np.uint64(0), 4, False, 0, 32, 32)
    assert np.array_equal(full[:, :2], translate_only[:, :2]) and not translate_only[:, 2:].any()


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, size=(48, 12, 10, 3), dtype=np.uint8)
    return images, np.random.default_rng(1).choice(10_000, size=48, replace=False).astype(np.uint64)


def test_uint8_kernel_equals_numpy_reference(batch):
    images, indices = batch
    pad, cutout, fill = 3, 4, np.array([10, 20, 30], dtype=np.uint8)
    dst = np.empty_like(images)
    _augment_uint8(images, dst, indices, np.uint64(42), np.uint64(7), pad, True, cutout, fill)
    for out, image, index in zip(dst, images, indices, strict=True):
        params = ref_params(42, 7, int(index), pad, True, cutout, 12, 10)
        assert np.array_equal(out, ref_augment(image, params, pad, cutout, fill))


@pytest.mark.parametrize("nhwc", [False, True])
def test_normalising_kernel_equals_numpy_reference(batch, nhwc):
    images, indices = batch
    pad, cutout = 2, 5
    mean, std = np.array([120.0, 115.0, 100.0]), np.array([60.0, 61.0, 66.0])
    fill = np.round(mean).astype(np.float32)
    shift, scale = mean.astype(np.float32), (1.0 / std).astype(np.float32)
    dst = np.empty((48, 12, 10, 3) if nhwc else (48, 3, 12, 10), dtype=np.float32)
    _augment_normalize(images, dst, indices, np.uint64(3), np.uint64(1), pad, True, cutout, shift, scale, fill, nhwc)
    got = dst if nhwc else dst.transpose(0, 2, 3, 1)
    for out, image, index in zip(got, images, indices, strict=True):
        params = ref_params(3, 1, int(index), pad, True, cutout, 12, 10)
        want = (ref_augment(image, params, pad, cutout, fill.astype(np.uint8)).astype(np.float32) - shift) * scale
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_no_augmentation_is_plain_normalisation(batch):
    images, indices = batch
    shift, scale = np.full(3, 128.0, np.float32), np.full(3, 1 / 64, np.float32)
    dst = np.empty((48, 3, 12, 10), dtype=np.float32)
    _augment_normalize(images, dst, indices, np.uint64(0), np.uint64(0), 0, False, 0, shift, scale, shift, False)
    np.testing.assert_array_equal(dst, ((images.astype(np.float32) - 128.0) / 64.0).transpose(0, 3, 1, 2))
