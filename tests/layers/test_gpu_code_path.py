"""KNConv2d's GPU code path on a CPU: dense dropout masks (`dense_draws`) and avg_pool2d window kernels
(`pool_kernels`) instead of the CPU's sparse drops and prefix sums (issue 24, item 5).

References: the naive unfold KNConv2d of test_kernel_norm.py in float64 with the same keep mask, and
torch.autograd.gradcheck; the prefix-sum pooling (itself checked against the naive windows) for the pooling
kernels, including paddings beyond half the kernel (where avg_pool2d needs an explicit pad) and strides
that leave input rows outside every window.
"""

from __future__ import annotations

import pytest
import torch
from test_kernel_norm import naive_kn_conv

from kn_dist.layers import KNConv2d, dropout_keep_mask
from kn_dist.layers.conv_numerics import conv_numerics
from kn_dist.layers.dropout_draws import dense_draws, draw_dropped
from kn_dist.layers.kn_conv_function import KNConv2dFunction
from kn_dist.layers.window_sums import pool, pool_backward, pool_kernels

GEOMETRIES = [(3, 1, 1), (2, 2, 0), (3, 2, 2), (7, 1, 3), (2, 1, 1), (3, 3, 0), (1, 1, 0)]


@pytest.mark.parametrize("k,s,p", GEOMETRIES)
def test_pool_kernels_equal_the_prefix_sums(k, s, p):
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 2, 9, 8, generator=gen, dtype=torch.float64)
    ref = pool(t, (k, k), (s, s), (p, p))
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_back = pool_backward(g, (9, 8), (k, k), (s, s), (p, p))
    with pool_kernels():
        torch.testing.assert_close(pool(t, (k, k), (s, s), (p, p)), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pool_backward(g, (9, 8), (k, k), (s, s), (p, p)), ref_back, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("centre", [False, True])
@pytest.mark.parametrize("k,s,p", GEOMETRIES[:5])
def test_gpu_path_matches_the_naive_layer_in_float64(k, s, p, centre):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64) + 1).requires_grad_()
    torch.manual_seed(2)
    layer = KNConv2d(4, 6, k, s, p, groups=2, dropout_p=0.2).double().train()
    with dense_draws(), pool_kernels(), conv_numerics(centre=centre):
        torch.manual_seed(3)
        y = layer(x)
        torch.manual_seed(3)
        keep = dropout_keep_mask(x, 0.2)  # the same draw, as a mask
        assert not draw_dropped(x, 0.2).dtype == torch.int64  # dense, as on a GPU
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (x, layer.weight), grad)
    xx, w = x.detach().requires_grad_(), layer.weight.detach().requires_grad_()
    ref = naive_kn_conv(xx, w, layer.bias.detach(), k, s, p, 2, keep, 0.2)
    rx, rw = torch.autograd.grad(ref, (xx, w), grad)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, rx, rtol=1e-8, atol=1e-10 * rx.abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-10 * rw.abs().max().item())


def test_gpu_path_passes_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64) + 2).requires_grad_()
    w = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    dropped = torch.rand(x.shape, generator=gen) < 0.2

    def fn(xx, ww):
        with pool_kernels():
            return KNConv2dFunction.apply(xx, ww, None, (2, 2), (2, 2), 1, 1e-5, dropped, 1.25, None, True)

    assert torch.autograd.gradcheck(fn, (x, w), fast_mode=True)


def test_dense_draw_follows_a_channels_last_input():
    """The mask is drawn in the input's memory order and has its layout (issue 24: it was drawn NCHW)."""
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with dense_draws():
        torch.manual_seed(0)
        mask = draw_dropped(x, 0.3)
    torch.manual_seed(0)
    bits = torch.randint(0, 2**31, (4, 6, 6, 8), dtype=torch.int32)  # NHWC, the memory order
    assert mask.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(mask.permute(0, 2, 3, 1), bits < round(0.3 * 2**31))
    assert abs(mask.float().mean().item() - 0.3) < 0.03
