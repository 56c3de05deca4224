"""The dropout draws of KernelNorm's statistics, and KNConv2d on its sparse (flat-index) path.

On CPU with p <= 0.25 KNConv2d draws the dropped elements as flat indices (geometric gaps) and
corrects statistics and gradients sparsely. These tests check the draw against the Bernoulli law
(rates, independence of neighbours, the rarely taken "draw more" branch) and the layer on that path
against the naive unfold reference of test_kernel_norm.py, fed the mask the same seed gives.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kn_dist.layers import KNConv2d, dropout_keep_mask, kn_conv2d
from kn_dist.layers.dropout_draws import _dropped_indices, draw_dropped, uses_sparse_draw

EPS = 1e-5


def _naive_kn_conv(x, weight, bias, k, s, p, groups, keep, q):
    """Unfold every (C, k, k) unit, dropout-scaled statistics, normalise the clean unit, apply the filters."""
    xp = F.pad(x, (p, p, p, p))
    d = xp * F.pad(keep.to(x.dtype), (p, p, p, p)) / (1.0 - q)
    units, dropped = F.unfold(xp, k, stride=s), F.unfold(d, k, stride=s)  # (N, C*k*k, L)
    mean, var = dropped.mean(1, keepdim=True), dropped.var(1, unbiased=False, keepdim=True)
    units = (units - mean) / torch.sqrt(var + EPS)
    n, c = x.shape[:2]
    o = weight.shape[0]
    units = units.view(n, groups, c // groups * k * k, -1)
    w = weight.reshape(groups, o // groups, -1)
    y = torch.einsum("gok,ngkl->ngol", w, units).reshape(n, o, -1) + bias[None, :, None]
    side = (x.shape[2] + 2 * p - k) // s + 1
    return y.view(n, o, side, side)


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_sparse_draw_has_bernoulli_rate_and_independent_neighbours(p):
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    dropped = _dropped_indices(n, p, gen, torch.device("cpu"))
    assert torch.all(dropped[1:] > dropped[:-1]) and dropped[0] >= 0 and dropped[-1] < n
    mask = torch.zeros(n, dtype=torch.float64)
    mask[dropped] = 1.0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.mean().item() - p) < 5 * sigma
    # P(both of two neighbours dropped) = p^2 for independent draws
    pairs = (mask[1:] * mask[:-1]).mean().item()
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)


def test_sparse_draw_keeps_drawing_when_the_first_batch_falls_short():
    """A batch of 3 gaps cannot cover 10_000 elements: the loop must go on, with the same law."""
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([_dropped_indices(10_000, 0.1, gen, torch.device("cpu"), batch=3).numel() for _ in range(50)])
    assert abs(counts.double().mean().item() - 1000) < 5 * math.sqrt(10_000 * 0.1 * 0.9 / 50)


def test_sparse_path_is_used_on_cpu_for_small_p_only():
    x = torch.empty(2, 3, 4, 4)
    assert uses_sparse_draw(x, 0.05) and uses_sparse_draw(x, 0.25)
    assert not uses_sparse_draw(x, 0.5) and not uses_sparse_draw(x, 0.0)
    assert draw_dropped(x, 0.5).dtype == torch.bool and draw_dropped(x, 0.1).dtype == torch.int64


@pytest.mark.parametrize(
    "k,s,p,groups", [(3, 1, 1, 1), (2, 2, 0, 1), (3, 2, 2, 1), (1, 1, 0, 1), (5, 1, 2, 4), (2, 1, 1, 4)]
)
def test_sparse_path_forward_and_gradients_match_reference(k, s, p, groups):
    torch.manual_seed(2)
    q = 0.2
    layer = KNConv2d(4, 8 if groups == 1 else 4, k, s, p, groups=groups, dropout_p=q).double().train()
    x = (torch.randn(3, 4, 9, 9, dtype=torch.float64) * 2 + 1).requires_grad_()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    keep = dropout_keep_mask(x, q)  # the same draw, as a mask
    assert 0 < (~keep).sum() < keep.numel()
    ref = _naive_kn_conv(x, layer.weight, layer.bias, k, s, p, groups, keep, q)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad_out)
    theirs = torch.autograd.grad(ref, (x, layer.weight, layer.bias), grad_out)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_sparse_and_dense_paths_agree_in_float32():
    """The same draw through the index path (drawn inside) and the mask path (keep_mask given)."""
    torch.manual_seed(4)
    x = torch.relu(torch.randn(4, 16, 12, 12)).requires_grad_()
    w, b = torch.randn(16, 16, 3, 3) * 0.1, torch.randn(16)
    torch.manual_seed(5)
    y_sparse = kn_conv2d(x, w, b, 1, 1, 1, 0.05, True)
    (g_sparse,) = torch.autograd.grad(y_sparse.square().sum(), x)
    torch.manual_seed(5)
    keep = dropout_keep_mask(x, 0.05)
    y_dense = kn_conv2d(x, w, b, 1, 1, 1, 0.05, True, keep_mask=keep)
    (g_dense,) = torch.autograd.grad(y_dense.square().sum(), x)
    torch.testing.assert_close(y_sparse, y_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_sparse, g_dense, atol=1e-4, rtol=1e-4)
