"""Training augmentations that are a function of (seed, epoch, sample index), on the CPU and GPU paths.

Random translate (= RandomCrop with zero padding), horizontal flip and cutout draw from a
counter-based stream instead of an RNG with hidden state: a sample's key is

    key = splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ index)

(`seed` the run's seed as uint64, `epoch` FFCV's 0-based epoch counter `Loader.next_epoch`,
`index` the sample's position in the .beton file) and its j-th draw is the j-th output of a
SplitMix64 generator started at `key`, i.e. `splitmix64(key + j * 0x9E3779B97F4A7C15)` (Steele,
Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014; the constants are
Vigna's reference splitmix64.c). An integer in [0, n) is `((draw >> 32) * n) >> 32` (Lemire's
multiply-shift; bias < n / 2^32). Draws: 0 dy, 1 dx (translate, each uniform in [-pad, pad]),
2 flip (top bit), 3 cutout row, 4 cutout column (the square lies fully inside the image, as
ffcv's Cutout). Slots are fixed, so turning one augmentation on does not change the others; slots 8
and up belong to RandAugment & co. (`kn_dist.data.strong_augment`), whose floats in [0, 1) are a
draw's top 53 bits times 2^-53 (`uniform`).

So two runs with one seed see identical batches, whatever the world size, batch size, thread
count or device, and a loader whose `next_epoch` is set to e (as the worker does on resume)
yields exactly what an uninterrupted loader yields at epoch e: no RNG state to checkpoint.

`SeededAugment` is the one FFCV operation both paths use, between the decoder and `ToTensor`:
CPU: uint8 (B, H, W, C) -> augmented, normalised float32 (B, C, H, W) (or (B, H, W, C) for
channels_last) in one pass; GPU: uint8 -> augmented uint8, shipped to the device and normalised
there. It runs in FFCV's Python stage (it must read the epoch at run time: numba freezes globals
at compile time) and calls kernels compiled once per process. `SeededLoader` tells it the epoch.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_U64 = (1 << 64) - 1
DRAW_DY, DRAW_DX, DRAW_FLIP, DRAW_CUT_Y, DRAW_CUT_X = range(5)


@numba.njit(inline="always")
def splitmix64(z):
    """One SplitMix64 step on uint64 `z` (increment, then Stafford's mix13 finaliser)."""
    z = z + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def below(key, slot, n):
    """Draw `slot` of the sample with `key`, as an integer in [0, n)."""
    u = splitmix64(key + np.uint64(slot) * GOLDEN)
    return np.int64(((u >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@numba.njit(inline="always")
def sample_key(seed, epoch, index):
    """The key of sample `index` at `epoch`: every draw of that sample is a slot of it (module doc)."""
    return splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ np.uint64(index))


@numba.njit(inline="always")
def uniform(key, slot):
    """Draw `slot` of the sample with `key`, as a float64 in [0, 1) (its top 53 bits)."""
    return np.float64(splitmix64(key + np.uint64(slot) * GOLDEN) >> np.uint64(11)) * 2.0**-53


@numba.njit(inline="always")
def _params(seed, epoch, index, pad, flip, cutout, h, w):
    """(dy, dx, mirrored, cut_y, cut_x) of one sample; cut_* are 0 when cutout is off (an empty square)."""
    key = sample_key(seed, epoch, index)
    dy = below(key, DRAW_DY, 2 * pad + 1) - pad if pad > 0 else 0
    dx = below(key, DRAW_DX, 2 * pad + 1) - pad if pad > 0 else 0
    mirrored = flip and (splitmix64(key + np.uint64(DRAW_FLIP) * GOLDEN) >> np.uint64(63)) == np.uint64(1)
    cy = below(key, DRAW_CUT_Y, h - cutout + 1) if cutout > 0 else 0
    cx = below(key, DRAW_CUT_X, w - cutout + 1) if cutout > 0 else 0
    return dy, dx, mirrored, cy, cx


@numba.njit(parallel=True, nogil=True, cache=True)
def augment_params(indices, seed, epoch, pad, flip, cutout, h, w):
    """(N, 5) int64 rows [dy, dx, mirrored, cut_y, cut_x]: the draws `SeededAugment` makes for `indices`."""
    out = np.empty((len(indices), 5), dtype=np.int64)
    for i in numba.prange(len(indices)):
        dy, dx, mirrored, cy, cx = _params(seed, epoch, indices[i], pad, flip, cutout, h, w)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3], out[i, 4] = dy, dx, 1 if mirrored else 0, cy, cx
    return out


@numba.njit(parallel=True, nogil=True, cache=True)
def _augment_normalize(images, dst, indices, seed, epoch, pad, flip, cutout, shift, scale, fill, nhwc):
    # Per image: translate by (dy, dx) with zero fill, flip, cut out a square filled with `fill`
    # (in that order, as ffcv's RandomTranslate, RandomHorizontalFlip, Cutout), then (x - shift) * scale.
    # Fused: every FFCV op is its own parallel region, and on a busy CPU separate ops plus torch's
    # permute-copy and normalisation cost more than the decode itself (~3k vs ~100k images/s here).
    n, h, w, c = images.shape
    for i in numba.prange(n):
        dy, dx, mirrored, cy, cx = _params(seed, epoch, indices[i], pad, flip, cutout, h, w)
        for k in range(c):  # channel-outer loops: NCHW output rows are written contiguously
            g = scale[k]
            outside = -shift[k] * g  # zero fill, normalised
            cut_value = (fill[k] - shift[k]) * g
            for y in range(h):
                sy = y + dy
                row_in = 0 <= sy < h
                row_cut = cy <= y < cy + cutout
                for x in range(w):
                    sx = (w - 1 - x if mirrored else x) + dx
                    if row_cut and cx <= x < cx + cutout:
                        v = cut_value
                    elif row_in and 0 <= sx < w:
                        v = (np.float32(images[i, sy, sx, k]) - shift[k]) * g
                    else:
                        v = outside
                    if nhwc:
                        dst[i, y, x, k] = v
                    else:
                        dst[i, k, y, x] = v


@numba.njit(parallel=True, nogil=True, cache=True)
def _augment_uint8(images, dst, indices, seed, epoch, pad, flip, cutout, fill):
    # The same draws and geometry as _augment_normalize, uint8 in and out (the GPU path normalises on the device).
    n, h, w, c = images.shape
    for i in numba.prange(n):
        dy, dx, mirrored, cy, cx = _params(seed, epoch, indices[i], pad, flip, cutout, h, w)
        for y in range(h):
            sy = y + dy
            row_in = 0 <= sy < h
            row_cut = cy <= y < cy + cutout
            for x in range(w):
                sx = (w - 1 - x if mirrored else x) + dx
                inside = row_in and 0 <= sx < w
                for k in range(c):
                    if row_cut and cx <= x < cx + cutout:
                        dst[i, y, x, k] = fill[k]
                    elif inside:
                        dst[i, y, x, k] = images[i, sy, sx, k]
                    else:
                        dst[i, y, x, k] = 0


class SeededAugment(Operation):
    """FFCV operation: seeded translate / flip / cutout of a uint8 (B, H, W, C) batch (see the module doc).

    `normalize=(mean, std)` (0..255 scale): output normalised float32, NCHW or, with channels_last,
    NHWC (which ToTorchImage views as NCHW); `normalize=None`: output uint8 NHWC. `cutout_fill` is
    in 0..255. `epoch` is set by `SeededLoader` before each epoch.
    """

    reads_epoch = True

    def __init__(
        self,
        seed: int,
        *,
        pad: int = 0,
        flip: bool = False,
        cutout: int = 0,
        cutout_fill: tuple[float, ...] = (0.0, 0.0, 0.0),
        normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.seed = np.uint64(seed & _U64)  # any Python int; negative seeds wrap as two's complement
        self.pad, self.flip, self.cutout = int(pad), bool(flip), int(cutout)
        self.cutout_fill, self.normalize, self.channels_last = cutout_fill, normalize, channels_last
        self.epoch = 0

    def generate_code(self):
        op = self
        fill = np.asarray(self.cutout_fill, dtype=np.float32)
        if self.normalize is None:
            fill_u8 = np.asarray(np.round(fill), dtype=np.uint8)

            def augment(images, dst, indices):
                out = dst[: images.shape[0]]
                idx = np.asarray(indices, dtype=np.uint64)
                _augment_uint8(images, out, idx, op.seed, np.uint64(op.epoch), op.pad, op.flip, op.cutout, fill_u8)
                return out

        else:
            shift = np.asarray(self.normalize[0], dtype=np.float32)
            scale = (1.0 / np.asarray(self.normalize[1], dtype=np.float64)).astype(np.float32)

            def augment(images, dst, indices):
                out = dst[: images.shape[0]]
                idx = np.asarray(indices, dtype=np.uint64)
                epoch = np.uint64(op.epoch)
                args = (op.pad, op.flip, op.cutout, shift, scale, fill, op.channels_last)
                _augment_normalize(images, out, idx, op.seed, epoch, *args)
                return out

        augment.with_indices = True  # FFCV then passes the batch's sample indices as a third argument
        return augment

    def declare_state_and_memory(self, previous_state):
        h, w, c = previous_state.shape
        if self.normalize is None:
            shape, dtype = (h, w, c), np.dtype("u1")
        else:
            shape, dtype = ((h, w, c) if self.channels_last else (c, h, w)), np.dtype("<f4")
        # jit_mode=False: run in FFCV's Python stage, where `self.epoch` is read at call time.
        return replace(previous_state, shape=shape, dtype=dtype, jit_mode=False), AllocationQuery(shape, dtype)


class SeededLoader(Loader):
    """ffcv Loader that tells its seeded operations (`reads_epoch`: SeededAugment, StrongAugment) the epoch
    each iteration draws for."""

    def __init__(self, *args, pipelines: dict | None = None, **kwargs):
        pipelines = pipelines or {}
        self.augment_ops = [op for ops in pipelines.values() for op in ops or () if getattr(op, "reads_epoch", False)]
        super().__init__(*args, pipelines=pipelines, **kwargs)

    def __iter__(self):
        for op in self.augment_ops:  # before the epoch's thread starts; the traversal order reads next_epoch too
            op.epoch = self.next_epoch
        return super().__iter__()


class RepeatedPasses:
    """`passes` passes over a train loader per epoch, each with its own order and augmentation draws.

    The repeated augmentation of Lee et al.'s ViT-for-small-datasets recipe: their RASampler with
    `len_factor` = 3 makes one "epoch" three shuffled passes over the data (aanna0701/SPT_LSA_ViT main.py,
    `--ra 3`). Pass p of epoch e is FFCV epoch passes * e + p, so `next_epoch = e` (what the worker sets
    on resume) continues exactly where an uninterrupted run would be.
    """

    def __init__(self, loader: Loader, passes: int):
        self.loader, self.passes = loader, passes

    def __iter__(self):
        for _ in range(self.passes):
            yield from self.loader

    def __len__(self) -> int:
        return self.passes * len(self.loader)

    @property
    def next_epoch(self) -> int:
        return self.loader.next_epoch // self.passes

    @next_epoch.setter
    def next_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch * self.passes

    def __getattr__(self, name: str):  # batch_size, indices, ... of the wrapped loader
        if name == "loader":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
