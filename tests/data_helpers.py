"""Helpers for the data tests (pytest puts tests/ on sys.path): a fake process group, undoing the
normalisation, and a plain-Python reference of kn_dist.data.augment written from its docstring (not
from its code): SplitMix64 with Python integers masked to 64 bits; translate / flip / cutout with
np.pad and slicing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int):
    """A real (fake-backend) process group saying "rank r of w" in this one process: what FFCV's
    distributed sampler reads when the loader is built, without spawning processes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def to_uint8_hwc(batch: torch.Tensor, mean255, std255) -> np.ndarray:
    """Undo Normalize: (N, 3, H, W) float -> (N, H, W, 3) uint8 (exact when the pixels were exact)."""
    mean = torch.tensor(mean255).view(1, 3, 1, 1)
    std = torch.tensor(std255).view(1, 3, 1, 1)
    return (batch * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def sm64(z: int) -> int:
    z = (z + GOLDEN) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_params(seed: int, epoch: int, index: int, pad: int, flip: bool, cutout: int, h: int, w: int) -> tuple:
    key = sm64(sm64(sm64(seed & M64) ^ epoch) ^ index)

    def draw(slot: int) -> int:
        return sm64((key + slot * GOLDEN) & M64)

    def below(slot: int, n: int) -> int:
        return ((draw(slot) >> 32) * n) >> 32

    dy = below(0, 2 * pad + 1) - pad if pad else 0
    dx = below(1, 2 * pad + 1) - pad if pad else 0
    mirrored = bool(flip and draw(2) >> 63)
    cy = below(3, h - cutout + 1) if cutout else 0
    cx = below(4, w - cutout + 1) if cutout else 0
    return dy, dx, mirrored, cy, cx


def ref_augment(image: np.ndarray, params: tuple, pad: int, cutout: int, fill) -> np.ndarray:
    """Translate with zero fill (as RandomCrop(padding=pad)), then flip, then the cutout square."""
    dy, dx, mirrored, cy, cx = params
    h, w, _ = image.shape
    p = max(pad, 1)
    padded = np.pad(image, ((p, p), (p, p), (0, 0)))
    out = padded[p + dy : p + dy + h, p + dx : p + dx + w].copy()
    if mirrored:
        out = out[:, ::-1].copy()
    if cutout:
        out[cy : cy + cutout, cx : cx + cutout] = fill
    return out


# ----------------------------------------------------------------------------- strong augmentation draws
# Written from kn_dist.data.strong_augment's docstring: the slots, below() and uniform() of the sample key.


def ref_key(seed: int, epoch: int, index: int) -> int:
    return sm64(sm64(sm64(seed & M64) ^ epoch) ^ index)


def ref_below(key: int, slot: int, n: int) -> int:
    return ((sm64((key + slot * GOLDEN) & M64) >> 32) * n) >> 32


def ref_uniform(key: int, slot: int) -> float:
    return (sm64((key + slot * GOLDEN) & M64) >> 11) / 2.0**53


def ref_randaugment(key: int, num_ops: int, magnitude_of: list[float], signed: set[int]) -> list[tuple[int, float]]:
    out = []
    for k in range(num_ops):
        op = ref_below(key, 8 + 2 * k, 14)
        m = magnitude_of[op]
        if op in signed and ref_uniform(key, 9 + 2 * k) < 0.5:
            m = -m
        out.append((op, m))
    return out


def ref_autoaugment(key: int, policy: list, signed: set[int]) -> list[tuple[int, float]]:
    """policy: 25 sub-policies of two (op id, probability, magnitude)."""
    sub = policy[ref_below(key, 16, len(policy))]
    out = []
    for k, (op, p, m) in enumerate(sub):
        if ref_uniform(key, 17 + k) <= p:
            out.append((op, -m if op in signed and ref_uniform(key, 19 + k) < 0.5 else m))
        else:
            out.append((0, 0.0))
    return out


def ref_jitter(key: int, strength: float) -> list[tuple[str, float]]:
    orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    names = ("Brightness", "Contrast", "Color")
    return [(names[f], strength * (2 * ref_uniform(key, 25 + f) - 1)) for f in orders[ref_below(key, 24, 6)]]


def ref_erasing(key: int, p: float, scale, ratio, h: int, w: int) -> tuple[int, int, int, int]:
    import math

    if ref_uniform(key, 32) >= p:
        return 0, 0, 0, 0
    for a in range(10):
        slot = 33 + 4 * a
        area = h * w * (scale[0] + (scale[1] - scale[0]) * ref_uniform(key, slot))
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = math.exp(lo + (hi - lo) * ref_uniform(key, slot + 1))
        eh, ew = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if eh < h and ew < w:
            return ref_below(key, slot + 2, h - eh + 1), ref_below(key, slot + 3, w - ew + 1), eh, ew
    return 0, 0, 0, 0
