"""Sums and averages over the zero-padded windows of a KernelNorm layer, for 1-channel float64 maps.

KernelNorm's statistics (Nasirigerdeh et al., TMLR 2024) are averages over (C, kh, kw) windows of the
zero-padded input; KNConv2d forms them from per-pixel channel statistics (DESIGN.md §3), so what is left
per window is an average pooling of a few 1-channel maps, and its transpose in backward. Both are done
with a prefix sum and one difference per axis (`_window_sum`) on a CPU: ~3x faster there than F.avg_pool2d
for the small float64 maps here, and exact for windows of zeros. On a GPU, where each of those ~6 small
ops per direction is a kernel launch, torch's avg_pool2d and its backward are one launch each.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

_FORCE_KERNELS = [False]


def _pad_dim(t: Tensor, dim: int, before: int, after: int) -> Tensor:
    """Zero-pad (negative: crop) dimension `dim` (-1 or -2) of t."""
    return F.pad(t, (before, after) if dim == -1 else (0, 0, before, after))


def _window_sum(t: Tensor, dim: int, k: int, s: int, p: int) -> Tensor:
    """Sums over the zero-padded windows (kernel k, stride s, padding p) along `dim`, by a prefix sum.

    A cumulative sum and one difference per axis instead of F.avg_pool2d: ~3x faster on CPU for the
    small float64 maps here. Windows of zeros give exactly 0 (equal prefix sums), as dead ReLUs need.
    """
    if k == 1 and p == 0:
        return t if s == 1 else t[_every(dim, s)]
    c = _pad_dim(t, dim, p + 1, p).cumsum(dim)  # c[i] = sum of the padded entries before i
    n_out = (t.shape[dim] + 2 * p - k) // s + 1
    span = s * (n_out - 1) + 1
    return c.narrow(dim, k, span)[_every(dim, s)] - c.narrow(dim, 0, span)[_every(dim, s)]


def _every(dim: int, s: int) -> tuple:
    return (..., slice(None, None, s)) if dim == -1 else (..., slice(None, None, s), slice(None))


def _window_sum_transpose(g: Tensor, dim: int, n: int, k: int, s: int, p: int) -> Tensor:
    """Transpose of `_window_sum`: per input position, the sum of g over the windows that contain it."""
    if k == 1 and p == 0 and s == 1:
        return g
    if s > 1:  # put each window's value at its first padded position, zeros between
        shape = list(g.shape)
        shape[dim] = s * (g.shape[dim] - 1) + 1
        u = g.new_zeros(shape)
        u[_every(dim, s)] = g
        g = u
    # position q (padded coordinates) is in the windows starting at q - k + 1 .. q
    c = _pad_dim(g, dim, k, p + n - g.shape[dim]).cumsum(dim)
    return c.narrow(dim, p + k, n) - c.narrow(dim, p, n)


def pool(t: Tensor, kernel, stride, padding) -> Tensor:
    """Average pooling over zero-padded windows, padded zeros counted (count_include_pad)."""
    if uses_pool_kernels(t):
        t, pad = _padded(t, kernel, padding)
        return F.avg_pool2d(t, kernel, stride, pad, count_include_pad=True)
    out = _window_sum(_window_sum(t, -1, kernel[1], stride[1], padding[1]), -2, kernel[0], stride[0], padding[0])
    return out if kernel == (1, 1) else out.mul_(1.0 / (kernel[0] * kernel[1]))


def pool_backward(g: Tensor, size, kernel, stride, padding) -> Tensor:
    """Transpose of `pool`: per-window values -> per-pixel sums of value / (kh * kw), (N, K, H, W)."""
    if uses_pool_kernels(g):
        h, w = size
        if 2 * padding[0] <= kernel[0] and 2 * padding[1] <= kernel[1]:
            like = g.new_zeros(()).expand(*g.shape[:2], h, w)  # avg_pool2d_backward reads its sizes only
            return torch.ops.aten.avg_pool2d_backward(g, like, kernel, stride, padding, False, True, None)
        like = g.new_zeros(()).expand(*g.shape[:2], h + 2 * padding[0], w + 2 * padding[1])
        out = torch.ops.aten.avg_pool2d_backward(g, like, kernel, stride, (0, 0), False, True, None)
        return out[..., padding[0] : padding[0] + h, padding[1] : padding[1] + w]
    t = _window_sum_transpose(g, -2, size[0], kernel[0], stride[0], padding[0])
    t = _window_sum_transpose(t, -1, size[1], kernel[1], stride[1], padding[1])
    return t if kernel == (1, 1) else t.mul_(1.0 / (kernel[0] * kernel[1]))


def _padded(t: Tensor, kernel, padding) -> tuple[Tensor, tuple[int, int]]:
    """(t, padding) for F.avg_pool2d, which takes padding up to half the kernel; beyond, t zero-padded first."""
    if 2 * padding[0] <= kernel[0] and 2 * padding[1] <= kernel[1]:
        return t, tuple(padding)
    return F.pad(t, (padding[1], padding[1], padding[0], padding[0])), (0, 0)


@contextmanager
def pool_kernels() -> Iterator[None]:
    """Within, windows are pooled by torch's avg_pool2d kernels as on a GPU (one launch each way), not by the
    prefix sums that are ~3x faster on a CPU: the GPU's code path, checked on a CPU."""
    saved = _FORCE_KERNELS[0]
    _FORCE_KERNELS[0] = True
    try:
        yield
    finally:
        _FORCE_KERNELS[0] = saved


def uses_pool_kernels(t: Tensor) -> bool:
    """avg_pool2d kernels on GPUs (one launch instead of ~6 small ones) and within `pool_kernels()`."""
    return t.device.type != "cpu" or _FORCE_KERNELS[0]
