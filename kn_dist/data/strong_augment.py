"""Strong augmentation of the published recipes: RandAugment or AutoAugment, colour jitter and random
erasing, drawn per (seed, epoch, sample index) and applied to the batch on the CPU or on the device.

Draws come from the sample's key of `kn_dist.data.augment` (the same SplitMix64 stream as translate /
flip / cutout, slots 0-4) at fixed slots of their own, so turning one augmentation on leaves every
other draw of the sample unchanged:

    8 + 2k, 9 + 2k   RandAugment op k (k < 4): the op, uniform among torchvision's 14; its sign
    16               AutoAugment sub-policy, uniform among the 25 of the CIFAR-10 policy
    17, 18 / 19, 20  AutoAugment: whether each of its two ops applies (u <= p); their signs
    24               colour jitter: the order of brightness, contrast, saturation (one of 6)
    25, 26, 27       colour jitter: brightness, contrast, saturation factors, uniform in [1 - j, 1 + j]
    32               random erasing: whether it erases (u < p)
    33 + 4a ... 36 + 4a   attempt a < 10: area share, log aspect ratio, top row, left column

(`below(key, slot, n)` for integers, `uniform(key, slot)` for [0, 1) floats; a sign is negative when
its draw is below 1/2, as a fair coin.) The semantics are torchvision's: RandAugment(num_ops,
magnitude, num_magnitude_bins) picks its ops uniformly with replacement and flips signed magnitudes
with probability 1/2; AutoAugment(CIFAR10) picks a sub-policy and applies each op with its
probability; ColorJitter(j, j, j) draws three factors and applies them in a random order;
RandomErasing(p, scale, ratio, value=0) tries 10 rectangles (area uniform in scale, log aspect
uniform in log ratio) and erases the first that fits, after normalisation (0 = the mean colour).

`StrongAugment` is the FFCV operation both paths end with: uint8 in, normalised float32 out. Its draws are
computed on the host from the batch's sample indices (numba); the pixels change in one numba kernel on the
CPU path (kn_dist.data.strong_cpu, (B, H, W, C) in) and in batched torch ops on the device on the GPU path
(kn_dist.data.randaugment, (B, C, H, W) in), never per image in Python. Both compute the same bytes
(tests/data/test_strong_cpu.py: numba against torch on the CPU; tests/data/test_strong_loader.py and
test_randaugment.py: torch on the CPU against torch on CUDA, on a GPU machine).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numba
import numpy as np
import torch
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation

from kn_dist.config import DataConfig
from kn_dist.data import randaugment as ra
from kn_dist.data import strong_cpu
from kn_dist.data.augment import _U64, below, sample_key, uniform

SLOT_RANDAUGMENT, SLOT_AUTOAUGMENT, SLOT_JITTER, SLOT_ERASE = 8, 16, 24, 32
MAX_RANDAUGMENT_OPS = 4
ERASE_ATTEMPTS = 10
# Colour jitter orders of (brightness, contrast, saturation): torchvision's randperm over its four
# functions, with hue off, leaves each of the 3! orders equally likely.
JITTER_ORDERS = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], dtype=np.int64)
JITTER_OPS = np.array([ra.OP_ID["Brightness"], ra.OP_ID["Contrast"], ra.OP_ID["Color"]], dtype=np.int64)
SIGNED = np.array([name in ra.SIGNED for name in ra.OPS])


def enabled(cfg: DataConfig) -> bool:
    """Whether the training pipeline needs `StrongAugment`."""
    return bool(cfg.randaugment_ops or cfg.autoaugment != "none" or cfg.color_jitter or cfg.random_erasing)


# ----------------------------------------------------------------------------- draws (host, numba)


@numba.njit(parallel=True, nogil=True, cache=True)
def randaugment_draws(indices, seed, epoch, num_ops, magnitude, signed):
    """(ops, magnitudes), each (N, num_ops): RandAugment's ops for `indices`; magnitude[op] at the chosen bin."""
    n = len(indices)
    ops = np.empty((n, num_ops), dtype=np.int64)
    mags = np.empty((n, num_ops), dtype=np.float64)
    for i in numba.prange(n):
        key = sample_key(seed, epoch, indices[i])
        for k in range(num_ops):
            op = below(key, SLOT_RANDAUGMENT + 2 * k, 14)
            m = magnitude[op]
            if signed[op] and uniform(key, SLOT_RANDAUGMENT + 2 * k + 1) < 0.5:
                m = -m
            ops[i, k], mags[i, k] = op, m
    return ops, mags


@numba.njit(parallel=True, nogil=True, cache=True)
def autoaugment_draws(indices, seed, epoch, policy_ops, policy_prob, policy_mag, signed):
    """(ops, magnitudes), each (N, 2): the drawn sub-policy's ops, Identity (0) where an op does not apply."""
    n = len(indices)
    ops = np.zeros((n, 2), dtype=np.int64)
    mags = np.zeros((n, 2), dtype=np.float64)
    for i in numba.prange(n):
        key = sample_key(seed, epoch, indices[i])
        sub = below(key, SLOT_AUTOAUGMENT, len(policy_ops))
        for k in range(2):
            if uniform(key, SLOT_AUTOAUGMENT + 1 + k) <= policy_prob[sub, k]:
                op = policy_ops[sub, k]
                m = policy_mag[sub, k]
                if signed[op] and uniform(key, SLOT_AUTOAUGMENT + 3 + k) < 0.5:
                    m = -m
                ops[i, k], mags[i, k] = op, m
    return ops, mags


@numba.njit(parallel=True, nogil=True, cache=True)
def jitter_draws(indices, seed, epoch, strength, orders, jitter_ops):
    """(ops, magnitudes), each (N, 3): brightness / contrast / saturation in the drawn order, factor - 1."""
    n = len(indices)
    ops = np.empty((n, 3), dtype=np.int64)
    mags = np.empty((n, 3), dtype=np.float64)
    for i in numba.prange(n):
        key = sample_key(seed, epoch, indices[i])
        order = orders[below(key, SLOT_JITTER, 6)]
        for k in range(3):
            f = order[k]
            ops[i, k] = jitter_ops[f]
            mags[i, k] = strength * (2.0 * uniform(key, SLOT_JITTER + 1 + f) - 1.0)
    return ops, mags


@numba.njit(parallel=True, nogil=True, cache=True)
def erasing_draws(indices, seed, epoch, p, scale, log_ratio, h, w):
    """(N, 4) int64 rows [top, left, height, width] of the erased rectangle; height 0: nothing erased."""
    n = len(indices)
    out = np.zeros((n, 4), dtype=np.int64)
    for i in numba.prange(n):
        key = sample_key(seed, epoch, indices[i])
        if uniform(key, SLOT_ERASE) >= p:
            continue
        for a in range(ERASE_ATTEMPTS):
            slot = SLOT_ERASE + 1 + 4 * a
            area = h * w * (scale[0] + (scale[1] - scale[0]) * uniform(key, slot))
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(key, slot + 1))
            eh = np.int64(np.rint(math.sqrt(area * aspect)))  # Python's round(): half to even
            ew = np.int64(np.rint(math.sqrt(area / aspect)))
            if eh < h and ew < w:
                out[i, 0] = below(key, slot + 2, h - eh + 1)
                out[i, 1] = below(key, slot + 3, w - ew + 1)
                out[i, 2], out[i, 3] = eh, ew
                break
    return out


# ----------------------------------------------------------------------------- the FFCV operation


def erase(x: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """Set the rectangle [top, top + height) x [left, left + width) of image i to 0 (boxes: (N, 4))."""
    n, _, h, w = x.shape
    b = torch.as_tensor(boxes, device=x.device).view(n, 4, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= b[:, 0]) & (rows < b[:, 0] + b[:, 2]) & (cols >= b[:, 1]) & (cols < b[:, 1] + b[:, 3])
    return x.masked_fill(inside.unsqueeze(1), 0.0)


class StrongAugment(Operation):
    """FFCV operation: RandAugment / AutoAugment, colour jitter, normalisation, random erasing (module doc).

    CPU path (`on_device=False`): uint8 (B, H, W, C) numpy in, float32 (x - mean) / std (0..255 scale) out,
    (B, C, H, W) or, with channels_last, (B, H, W, C) (which ToTorchImage views as NCHW). GPU path: uint8
    (B, C, H, W) torch tensor on the device in (any memory format), float32 out there, channels_last if
    asked. `epoch` is set by `SeededLoader`.
    """

    reads_epoch = True

    def __init__(
        self,
        seed: int,
        cfg: DataConfig,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        channels_last: bool = False,
        on_device: bool = False,
    ):
        super().__init__()
        self.seed = np.uint64(seed & _U64)
        self.cfg, self.mean, self.std, self.channels_last = cfg, mean, std, channels_last
        self.on_device = on_device
        self.epoch = 0
        self._tables: dict[tuple[int, int], tuple] = {}
        self._moments: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(RandAugment magnitude per op, AutoAugment ops / probabilities / magnitudes) at this image size."""
        if (h, w) not in self._tables:
            bins = ra.magnitude_bins(self.cfg.randaugment_bins, h, w)
            at = np.array([bins[name][self.cfg.randaugment_magnitude] for name in ra.OPS])
            aa_bins = ra.magnitude_bins(ra.AUTOAUGMENT_BINS, h, w)
            policy = ra.AUTOAUGMENT_CIFAR10
            ops = np.array([[ra.OP_ID[o] for o, _, _ in sub] for sub in policy], dtype=np.int64)
            prob = np.array([[p for _, p, _ in sub] for sub in policy])
            mag = np.array([[0.0 if b is None else aa_bins[o][b] for o, _, b in sub] for sub in policy])
            self._tables[(h, w)] = (at, ops, prob, mag)
        return self._tables[(h, w)]

    def draws(self, indices: np.ndarray, epoch: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ops (N, K), magnitudes (N, K), erase boxes (N, 4)) of these samples at `epoch`."""
        cfg, seed, e = self.cfg, self.seed, np.uint64(epoch)
        idx = np.asarray(indices, dtype=np.uint64)
        at, aa_ops, aa_prob, aa_mag = self._table(h, w)
        parts = []
        if cfg.randaugment_ops:
            parts.append(randaugment_draws(idx, seed, e, cfg.randaugment_ops, at, SIGNED))
        if cfg.autoaugment == "cifar10":
            parts.append(autoaugment_draws(idx, seed, e, aa_ops, aa_prob, aa_mag, SIGNED))
        if cfg.color_jitter:
            parts.append(jitter_draws(idx, seed, e, float(cfg.color_jitter), JITTER_ORDERS, JITTER_OPS))
        ops = np.concatenate([p[0] for p in parts], 1) if parts else np.zeros((len(idx), 0), dtype=np.int64)
        mags = np.concatenate([p[1] for p in parts], 1) if parts else np.zeros((len(idx), 0))
        boxes = np.zeros((len(idx), 4), dtype=np.int64)
        if cfg.random_erasing:
            scale = np.asarray(cfg.random_erasing_scale, dtype=np.float64)
            log_ratio = np.log(np.asarray(cfg.random_erasing_ratio, dtype=np.float64))
            boxes = erasing_draws(idx, seed, e, float(cfg.random_erasing), scale, log_ratio, h, w)
        return ops, mags, boxes

    def transform_numpy(self, images: np.ndarray, dst: np.ndarray, indices: np.ndarray, epoch: int) -> np.ndarray:
        """The CPU path: uint8 (B, H, W, C) `images` of samples `indices` augmented and normalised into `dst`."""
        n, h, w, _ = images.shape
        ops, mags, boxes = self.draws(indices, epoch, h, w)
        mean, std = np.asarray(self.mean, dtype=np.float32), np.asarray(self.std, dtype=np.float32)
        out = dst[:n]
        strong_cpu.augment_normalize(images, out, ops, *strong_cpu.prepare(ops, mags, h, w), boxes, mean, std,
                                     self.channels_last)  # fmt: skip
        return out

    def transform(self, images: torch.Tensor, indices: np.ndarray, epoch: int) -> torch.Tensor:
        """The GPU path (any device): uint8 (B, C, H, W) `images` of samples `indices` augmented and normalised."""
        h, w = images.shape[-2:]
        ops, mags, boxes = self.draws(indices, epoch, h, w)
        x = ra.apply_ops(images, ops, mags)
        if images.device not in self._moments:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            self._moments[images.device] = (mean, std)
        mean, std = self._moments[images.device]
        x = (x.float() - mean) / std  # as the GPU path's Normalize
        if self.cfg.random_erasing:
            x = erase(x, boxes)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def generate_code(self):
        op = self

        def strong(images, dst, indices):
            if op.on_device:
                return op.transform(images, indices, op.epoch)
            return op.transform_numpy(images, dst, indices, op.epoch)

        strong.with_indices = True  # FFCV passes the batch's sample indices as a third argument
        return strong

    def declare_state_and_memory(self, previous_state):
        # Python stage: the epoch is read at call time. GPU path: fresh tensors on the device, no FFCV buffer.
        if self.on_device:
            return replace(previous_state, dtype=torch.float32, jit_mode=False), None
        h, w, c = previous_state.shape
        shape = (h, w, c) if self.channels_last else (c, h, w)
        dtype = np.dtype("<f4")
        return replace(previous_state, shape=shape, dtype=dtype, jit_mode=False), AllocationQuery(shape, dtype)


def pipeline_tail(
    cfg: DataConfig,
    seed: int,
    augment: dict,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    channels_last: bool,
) -> list:
    """The image operations after the decoder when `enabled(cfg)`: translate / flip / cutout in uint8
    (`augment`: SeededAugment's keywords), then `StrongAugment` on the host (CPU path) or on the device."""
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    from kn_dist.data.augment import SeededAugment

    ops: list = [SeededAugment(seed, **augment)]
    strong = StrongAugment(seed, cfg, mean, std, channels_last=channels_last, on_device=device.type == "cuda")
    if device.type != "cuda":
        ops += [strong, ToTensor()]
        return ops + ([ToTorchImage(channels_last=True)] if channels_last else [])  # NHWC -> NCHW view
    return ops + [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True), strong]
