"""The CPU path of the strong augmentation: the ops of kn_dist.data.randaugment, normalisation and random erasing
fused into one numba kernel over a uint8 (B, H, W, C) batch, parallel over images.

Torch ops in FFCV's loader thread would run beside the training thread's OpenMP team and numba's pool: on a
few cores their spinning threads starve each other (hundreds of images/s instead of tens of thousands), so
the CPU path stays in numba like the rest of the CPU pipeline (kn_dist.data.augment). It computes what the
torch ops compute, in the same precision and order (float32 blends truncated to uint8, float64 source
positions rounded half to even, integer histograms and blurs), from the same per-image parameters
(`prepare`), so the two paths give the same bytes; tests/data/test_strong_cpu.py checks numba against torch
for every op at every bin.
"""

from __future__ import annotations

import numba
import numpy as np

from kn_dist.data import randaugment as ra

_ID = ra.OP_ID
SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE = (
    _ID[n] for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
)
BRIGHTNESS, COLOR, CONTRAST, SHARPNESS = (_ID[n] for n in ("Brightness", "Color", "Contrast", "Sharpness"))
POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE, INVERT = (
    _ID[n] for n in ("Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
)


def prepare(ops: np.ndarray, mags: np.ndarray, h: int, w: int):
    """Per (image, op) parameters: (matrices (N, K, 6) float64, ratio and 1 - ratio (N, K) float32, integer
    parameter (N, K): Posterize's kept-bits mask, Solarize's threshold as the least integer it inverts)."""
    matrices = np.zeros((*ops.shape, 6))
    for name in ra.GEOMETRIC:
        chosen = ops == _ID[name]
        if chosen.any():
            matrices[chosen] = ra.affine_matrix(name, mags[chosen], h, w)
    ratio = 1.0 + mags  # the blend ratio of the colour ops, formed in float64 as torchvision's Python floats
    integer = np.zeros(ops.shape, dtype=np.int64)
    poster = ops == POSTERIZE
    integer[poster] = (0xFF << (8 - mags[poster].astype(np.int64))) & 0xFF
    solar = ops == SOLARIZE
    integer[solar] = np.clip(np.ceil(mags[solar]), 0, 256)
    return matrices, ratio.astype(np.float32), (1.0 - ratio).astype(np.float32), integer


@numba.njit(inline="always")
def _u8(v):
    """float32 -> uint8 as torch's clamp(0, 255).to(uint8): clamp, then truncate."""
    if v < np.float32(0.0):
        v = np.float32(0.0)
    elif v > np.float32(255.0):
        v = np.float32(255.0)
    return np.uint8(v)


@numba.njit(inline="always")
def _grey(p):
    return np.uint8(
        np.float32(0.2989) * np.float32(p[0])
        + np.float32(0.587) * np.float32(p[1])
        + np.float32(0.114) * np.float32(p[2])
    )


@numba.njit(nogil=True, cache=True)
def _warp(src, dst, m):
    h, w, c = src.shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    for y in range(h):
        yc = np.float64(y) - cy
        for x in range(w):
            xc = np.float64(x) - cx
            sx = np.int64(np.rint(m[0] * xc + m[1] * yc + m[2] + cx))
            sy = np.int64(np.rint(m[3] * xc + m[4] * yc + m[5] + cy))
            inside = 0 <= sx < w and 0 <= sy < h
            for k in range(c):
                dst[y, x, k] = src[sy, sx, k] if inside else 0


@numba.njit(nogil=True, cache=True)
def _blend_with(src, dst, other, r, q):
    """dst = r * src + q * other (other: a per-pixel grey level (H, W) or one value)."""
    h, w, c = src.shape
    for y in range(h):
        for x in range(w):
            o = other[y, x]
            for k in range(c):
                dst[y, x, k] = _u8(r * np.float32(src[y, x, k]) + q * o)


@numba.njit(nogil=True, cache=True)
def _colour(op, src, dst, r, q):
    h, w, c = src.shape
    if op == BRIGHTNESS:
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    dst[y, x, k] = _u8(r * np.float32(src[y, x, k]))
        return
    other = np.empty((h, w), dtype=np.float32)
    if op == COLOR or op == CONTRAST:
        total = 0
        for y in range(h):
            for x in range(w):
                g = _grey(src[y, x])
                other[y, x] = np.float32(g)
                total += np.int64(g)
        if op == CONTRAST:
            other[:, :] = np.float32(np.float64(total) / np.float64(h * w))
        _blend_with(src, dst, other, r, q)
        return
    # SHARPNESS: per channel, the blurred interior [[1,1,1],[1,5,1],[1,1,1]] / 13 rounded, the border kept
    if h <= 2 or w <= 2:
        dst[:] = src
        return
    for k in range(c):
        for y in range(h):
            for x in range(w):
                v = np.int64(src[y, x, k])
                if 0 < y < h - 1 and 0 < x < w - 1:
                    s = 4 * v
                    for dy in range(-1, 2):
                        for dx in range(-1, 2):
                            s += np.int64(src[y + dy, x + dx, k])
                    v = (2 * s + 13) // 26
                dst[y, x, k] = _u8(r * np.float32(src[y, x, k]) + q * np.float32(v))


@numba.njit(nogil=True, cache=True)
def _per_channel(op, src, dst, integer):
    h, w, c = src.shape
    for k in range(c):
        if op == POSTERIZE or op == SOLARIZE or op == INVERT:
            for y in range(h):
                for x in range(w):
                    v = src[y, x, k]
                    if op == POSTERIZE:
                        v = v & np.uint8(integer)
                    elif op == INVERT or np.int64(v) >= integer:
                        v = np.uint8(255) - v
                    dst[y, x, k] = v
        elif op == AUTOCONTRAST:
            low, high = src[0, 0, k], src[0, 0, k]
            for y in range(h):
                for x in range(w):
                    low, high = min(low, src[y, x, k]), max(high, src[y, x, k])
            lo, scale = np.float32(low), np.float32(1.0)
            if high == low:  # a constant channel is left as it is
                lo = np.float32(0.0)
            else:  # torch's 255 / t is reciprocal(t) * 255 (Tensor.__rtruediv__): two float32 roundings
                scale = (np.float32(1.0) / (np.float32(high) - lo)) * np.float32(255.0)
            for y in range(h):
                for x in range(w):
                    dst[y, x, k] = _u8((np.float32(src[y, x, k]) - lo) * scale)
        else:  # EQUALIZE, as PIL's ImageOps.equalize: a lookup table from the cumulative histogram
            hist = np.zeros(256, dtype=np.int64)
            top = 0
            for y in range(h):
                for x in range(w):
                    hist[src[y, x, k]] += 1
                    top = max(top, np.int64(src[y, x, k]))
            step = (h * w - hist[top]) // 255
            lut = np.arange(256, dtype=np.int64)
            if step > 0:
                running = 0
                lut[0] = 0
                for v in range(255):
                    running += hist[v]
                    lut[v + 1] = min((running + step // 2) // step, 255)
            for y in range(h):
                for x in range(w):
                    dst[y, x, k] = np.uint8(lut[src[y, x, k]])


@numba.njit(parallel=True, nogil=True, cache=True)
def augment_normalize(images, dst, ops, matrices, ratio, rest, integer, boxes, mean, std, nhwc):
    """Ops k = 0, 1, ... of each image, then (x - mean) / std in float32 and the erased box set to 0, into
    `dst` (N, C, H, W) or, with nhwc, (N, H, W, C)."""
    n, h, w, c = images.shape
    for i in numba.prange(n):
        a = images[i].copy()
        b = np.empty_like(a)
        for k in range(ops.shape[1]):
            op = ops[i, k]
            if op == 0:
                continue
            if op <= ROTATE:
                _warp(a, b, matrices[i, k])
            elif op <= SHARPNESS:
                _colour(op, a, b, ratio[i, k], rest[i, k])
            else:
                _per_channel(op, a, b, integer[i, k])
            a, b = b, a
        top, left, eh, ew = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        for k in range(c):
            for y in range(h):
                erased_row = top <= y < top + eh
                for x in range(w):
                    if erased_row and left <= x < left + ew:
                        v = np.float32(0.0)
                    else:
                        v = (np.float32(a[y, x, k]) - mean[k]) / std[k]
                    if nhwc:
                        dst[i, y, x, k] = v
                    else:
                        dst[i, k, y, x] = v
