"""kn_dist.data.strong_cpu (the CPU path's numba kernel) against kn_dist.data.randaugment's torch ops (the GPU
path's, checked against torchvision in test_randaugment.py): every op at every bin and sign, and whole
augment + normalise + erase batches, byte for byte and float for float."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn_dist.config import DataConfig
from kn_dist.data import randaugment as ra
from kn_dist.data import strong_cpu
from kn_dist.data.strong_augment import StrongAugment

MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8: noise over random sub-ranges of 0..255, smooth fields and a constant channel."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 120, size=(n // 2, 1, 1, 3))
    noise = (low + rng.integers(0, 136, size=(n // 2, h, w, 3)) * rng.random((n // 2, 1, 1, 3))).astype(np.uint8)
    ys, xs = np.mgrid[0:h, 0:w]
    smooth = np.stack([(ys * a + xs * b + c) % 200 + 20 for a, b, c in rng.integers(1, 9, size=(n - n // 2, 3))])
    smooth = np.repeat(smooth[..., None], 3, axis=3).astype(np.uint8)
    smooth[0, :, :, 1] = 77
    return np.concatenate([noise, smooth])


def _numba_ops(images: np.ndarray, ops: np.ndarray, mags: np.ndarray) -> np.ndarray:
    """The kernel's uint8 result, read back through an identity normalisation (mean 0, std 1)."""
    n, h, w, c = images.shape
    dst = np.empty((n, h, w, c), dtype=np.float32)
    params = strong_cpu.prepare(ops, mags, h, w)
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    strong_cpu.augment_normalize(images, dst, ops, *params, np.zeros((n, 4), np.int64), zeros, ones, True)
    return dst.astype(np.uint8)


@pytest.mark.parametrize("h,w", [(32, 32), (20, 28)])
def test_every_op_at_every_bin_equals_the_torch_path(h, w):
    images = _images(12, h, w)
    table = ra.magnitude_bins(31, h, w)
    for name in ra.OPS:
        signs = (1.0, -1.0) if name in ra.SIGNED else (1.0,)
        for magnitude in {float(b) * s for b in table[name] for s in signs}:
            ops = np.full((len(images), 1), ra.OP_ID[name])
            mags = np.full((len(images), 1), magnitude)
            want = ra.apply_ops(torch.from_numpy(images).permute(0, 3, 1, 2), ops, mags).permute(0, 2, 3, 1)
            np.testing.assert_array_equal(_numba_ops(images, ops, mags), want.numpy(), err_msg=f"{name} {magnitude}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_whole_batches_equal_the_torch_path(channels_last):
    cfg = DataConfig(randaugment_ops=3, randaugment_magnitude=17, color_jitter=0.4, random_erasing=0.7)
    op = StrongAugment(5, cfg, MEAN, STD, channels_last=channels_last)
    images = _images(64, 32, 32, seed=1)
    indices = np.arange(500, 564, dtype=np.uint64)
    for epoch in (0, 7):
        dst = np.empty((64, 32, 32, 3) if channels_last else (64, 3, 32, 32), dtype=np.float32)
        ours = op.transform_numpy(images, dst, indices, epoch)
        want = op.transform(torch.from_numpy(images).permute(0, 3, 1, 2), indices, epoch)
        if channels_last:
            want = want.permute(0, 2, 3, 1)
        np.testing.assert_array_equal(ours, want.numpy())
    aa = StrongAugment(5, DataConfig(autoaugment="cifar10", random_erasing=0.3), MEAN, STD)
    dst = np.empty((64, 3, 32, 32), dtype=np.float32)
    want = aa.transform(torch.from_numpy(images).permute(0, 3, 1, 2), indices, 2).numpy()
    np.testing.assert_array_equal(aa.transform_numpy(images, dst, indices, 2), want)
