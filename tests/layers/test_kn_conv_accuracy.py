"""fp32 accuracy of KNConv2d's input gradient where windows have (almost) no variance (issue 13, item 6).

Error measure: max |grad_x(fp32) - grad_x(fp64 reference)| / max |grad_x(fp64 reference)|, where the
reference is the official method written here (unfold every unit, var_mean, autograd) run in float64.
The same official method run in float32 gives the error an unfold-based layer has; a window whose
variance is far below eps has rstd ~ eps^-1/2, so any rounding in its statistics is amplified.
Dead ReLU patches and padded borders must be <= 1e-5 (their statistics are exact in our form);
near-constant inputs and large offsets must be within a small factor of the official error, since
both layers then subtract mu * sum(W) from a large fp32 conv output.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kn_dist.layers import kn_conv2d
from kn_dist.layers.dropout_draws import draw_dropped, dropped_mask
from kn_dist.layers.kn_conv_function import KNConv2dFunction

EPS = 1e-5


def official_kn_conv(x: Tensor, w: Tensor, b: Tensor, k: int, p: int, keep: Tensor | None, q: float) -> Tensor:
    """The official code's computation: pad, conv, dropout on the padded input, var_mean per unfolded unit."""
    xp = F.pad(x, (p, p, p, p))
    out = F.conv2d(xp, w)
    d = xp if keep is None else xp * F.pad(keep.to(x.dtype), (p, p, p, p)) / (1.0 - q)
    units = d.unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
    var, mean = torch.var_mean(units, dim=(1, 4, 5), correction=0)
    sum_w = w.sum(dim=(1, 2, 3))[None, :, None, None]
    return (out - mean[:, None] * sum_w) / torch.sqrt(var[:, None] + EPS) + b[None, :, None, None]


def _grad_x(fn, x: Tensor, dtype: torch.dtype, grad_out: Tensor) -> Tensor:
    xx = x.detach().to(dtype).requires_grad_()
    (g,) = torch.autograd.grad(fn(xx), xx, grad_out.to(dtype))
    return g.double()


def _errors(x: Tensor, c_out: int, k: int, p: int, q: float = 0.0) -> tuple[float, float]:
    """(our fp32 error, the official method's fp32 error), both against the float64 official method."""
    gen = torch.Generator().manual_seed(0)
    c = x.shape[1]
    w = torch.randn(c_out, c, k, k, generator=gen) / (c * k * k) ** 0.5
    b = torch.randn(c_out, generator=gen)
    keep = None if q == 0 else torch.rand(x.shape, generator=gen) > q
    size = x.shape[2] + 2 * p - k + 1
    grad_out = torch.randn(x.shape[0], c_out, size, size, generator=gen)

    def ours(xx):
        return kn_conv2d(xx, w.to(xx.dtype), b.to(xx.dtype), 1, p, 1, q, keep is not None, EPS, keep_mask=keep)

    def official(xx):
        return official_kn_conv(xx, w.to(xx.dtype), b.to(xx.dtype), k, p, keep, q)

    ref = _grad_x(official, x, torch.float64, grad_out)
    scale = ref.abs().max()
    err = [((_grad_x(f, x, torch.float32, grad_out) - ref).abs().max() / scale).item() for f in (ours, official)]
    return err[0], err[1]


def _dead_patch(c: int, size: int = 16, where=(4, 10), seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(8, c, size, size, generator=gen)) + 0.5  # 8 samples: 8 different means
    lo, hi = where
    x[:, :, lo:hi, lo:hi] = 0.0  # every channel dead, as ReLUs leave it
    return x


@pytest.mark.parametrize(
    "c,c_out,k,p,where,q",
    [
        (64, 64, 2, 1, (4, 10), 0.0),  # issue 13's case: 64 ch, k2 p1, a 6x6 dead patch
        (3, 8, 3, 1, (4, 10), 0.0),  # issue 13's second case: 3 ch k3 p1
        (64, 16, 3, 1, (4, 10), 0.0),
        (16, 16, 3, 1, (0, 6), 0.0),  # dead corner: windows over the padded border and the patch
        (16, 16, 3, 2, (0, 6), 0.0),  # padding beyond k // 2
        (16, 16, 3, 1, (4, 10), 0.1),  # with a dropout mask on the statistics
    ],
)
def test_dead_patches_and_borders_are_accurate_in_fp32(c, c_out, k, p, where, q):
    ours, official = _errors(_dead_patch(c, where=where), c_out, k, p, q)
    assert ours <= 1e-5, (ours, official)


@pytest.mark.parametrize(
    "name,offset,spread",
    [("near-constant", 5.0, 1e-3), ("noisy constant", 3.0, 1e-4), ("large offset", 1000.0, 1.0)],
)
def test_low_relative_variance_is_as_accurate_as_the_official_method(name, offset, spread):
    gen = torch.Generator().manual_seed(2)
    x = offset + spread * torch.randn(2, 16, 12, 12, generator=gen)
    ours, official = _errors(x, 16, 3, 1)
    assert ours <= max(1e-5, 3.0 * official), (name, ours, official)


@pytest.mark.parametrize("name", ["large offset", "near-constant", "dead units"])
def test_sparse_drop_path_in_fp32_matches_the_dense_mask_in_fp64(name):
    """CPU training draws drops as flat indices and corrects the statistics sparsely; in fp32 that must
    agree with the same drop given as a mask, in fp64 (the form checked against the naive reference)."""
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(4, 16, 12, 12, generator=gen)
    x = {"large offset": 1000.0 + noise, "near-constant": 5.0 + 1e-3 * noise, "dead units": noise.relu()}[name]
    w, b = torch.randn(8, 16, 3, 3, generator=gen) / 12.0, torch.randn(8, generator=gen)
    grad_out = torch.randn(4, 8, 12, 12, generator=gen)
    dropped = draw_dropped(x, 0.1, torch.Generator().manual_seed(1))
    assert dropped.dtype == torch.int64  # the sparse form

    def run(drop, dtype):
        xx = x.to(dtype).requires_grad_()
        y = KNConv2dFunction.apply(xx, w.to(dtype), b.to(dtype), (1, 1), (1, 1), 1, EPS, drop, 1.0 / 0.9)
        (g,) = torch.autograd.grad(y, xx, grad_out.to(dtype))
        return y.detach().double(), g.double()

    (y32, g32), (y64, g64) = run(dropped, torch.float32), run(dropped_mask(x, dropped), torch.float64)
    assert ((y32 - y64).abs().max() / y64.abs().max()).item() <= 1e-5
    assert ((g32 - g64).abs().max() / g64.abs().max()).item() <= 1e-5
