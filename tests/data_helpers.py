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
