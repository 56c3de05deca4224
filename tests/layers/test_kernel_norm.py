"""KernelNorm2d / KNConv2d against a naive reference written here (issue 2, "Evidence required").

The reference follows the paper literally: unfold every (C, kh, kw) unit of the zero-padded input,
take the mean and biased variance of the dropped-out unit, normalise the clean unit, then either
tile the units (KernelNorm2d) or multiply them with the filters (KNConv2d). It is computed in
float64, so the float32 layer is compared with the exact answer, not with itself.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kn_dist.layers import KernelNorm2d, KNConv2d, dropout_keep_mask, kernel_norm_stats, kn_conv2d

EPS = 1e-5


def naive_units(x: Tensor, k: int, s: int, p: int, keep: Tensor | None, q: float):
    """Normalised units (N, C*k*k, L) of x (N, C, H, W), float64, and the output grid (H', W')."""
    x = x.double()
    xp = F.pad(x, (p, p, p, p))
    d = xp if keep is None else xp * F.pad(keep.double(), (p, p, p, p)) / (1.0 - q)
    units = F.unfold(xp, k, stride=s)  # (N, C*k*k, L)
    dropped = F.unfold(d, k, stride=s)
    mean = dropped.mean(dim=1, keepdim=True)
    var = dropped.var(dim=1, unbiased=False, keepdim=True)
    grid = ((x.shape[2] + 2 * p - k) // s + 1, (x.shape[3] + 2 * p - k) // s + 1)
    return (units - mean) / torch.sqrt(var + EPS), grid


def naive_kn_conv(x, weight, bias, k, s, p, groups, keep=None, q=0.0) -> Tensor:
    """KernelNorm of every unit, then the filters as a matmul per group (float64)."""
    units, (ho, wo) = naive_units(x, k, s, p, keep, q)
    n, c = x.shape[:2]
    o = weight.shape[0]
    units = units.view(n, c, k * k, -1)
    cg, og = c // groups, o // groups
    outs = []
    for g in range(groups):
        u = units[:, g * cg : (g + 1) * cg].reshape(n, cg * k * k, -1)  # (N, C/g*k*k, L)
        w = weight[g * og : (g + 1) * og].double().reshape(og, -1)  # (O/g, C/g*k*k)
        outs.append(w @ u)
    y = torch.cat(outs, dim=1)
    if bias is not None:
        y = y + bias.double()[None, :, None]
    return y.view(n, o, ho, wo)


def naive_kernel_norm(x, k, s, p, keep=None, q=0.0) -> Tensor:
    """Tiled KernelNorm output (N, C, k*H', k*W') in float64."""
    units, (ho, wo) = naive_units(x, k, s, p, keep, q)
    n, c = x.shape[:2]
    tiles = units.view(n, c, k, k, ho, wo).permute(0, 1, 4, 2, 5, 3)  # (N, C, H', k, W', k)
    return tiles.reshape(n, c, ho * k, wo * k)


def _keep(shape, q, seed=0) -> Tensor:
    """A random keep mask (drop probability q) that always keeps channels 0 and 1.

    With C = 4 channels and 1x1 windows, dropout 0.3 leaves some units with one or no element, so
    the dropped copy has a tiny variance and rstd amplifies rounding: the fast form computes
    conv(x) - mu * sum(W) like the official code, whose fp32 error grows like 1e-7 * |x| / sigma.
    Real layers (C >= 16, p <= 0.1) never get there; keeping two channels keeps the test about the
    maths, not about a pathological unit.
    """
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > q
    keep[:, :2] = True
    return keep


def _inputs(n=2, c=4, size=9, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # an offset so that the variance path is exercised with a non-zero mean
    return (torch.randn(n, c, size, size, generator=gen) * 2 + 1).to(dtype)


GEOMETRIES = sorted(
    {(k, s, p) for k in (1, 2, 3, 7) for s in (1, 2, k) for p in (0, 1, k // 2)},
)


@pytest.mark.parametrize("k,s,p", GEOMETRIES)
@pytest.mark.parametrize("groups", [1, 4])
def test_kn_conv_matches_naive_reference(k, s, p, groups):
    c = 4
    torch.manual_seed(1)
    layer = KNConv2d(c, 8 if groups == 1 else c, k, s, p, groups=groups)
    x = _inputs(c=c)
    keep = _keep(x.shape, 0.3)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        layer = layer.to(dtype).eval()
        xd = x.to(dtype)
        expected = naive_kn_conv(xd, layer.weight, layer.bias, k, s, p, groups)
        torch.testing.assert_close(layer(xd).double(), expected, atol=tol, rtol=tol)
        # the same dropout mask fed to the layer and to the reference
        got = kn_conv2d(xd, layer.weight, layer.bias, s, p, groups, 0.3, True, EPS, keep_mask=keep)
        expected = naive_kn_conv(xd, layer.weight, layer.bias, k, s, p, groups, keep, 0.3)
        torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_kn_conv_without_bias_and_rectangular_kernel():
    x = _inputs()
    layer = KNConv2d(4, 6, (2, 3), stride=(1, 2), padding=(1, 0), bias=False).double().eval()
    # reference for a rectangular kernel: unfold accepts pairs; reuse the formula directly
    xp = F.pad(x.double(), (0, 0, 1, 1))
    units = F.unfold(xp, (2, 3), stride=(1, 2))
    units = (units - units.mean(1, keepdim=True)) / torch.sqrt(units.var(1, unbiased=False, keepdim=True) + EPS)
    expected = (layer.weight.reshape(6, -1) @ units).view(2, 6, 10, 4)
    torch.testing.assert_close(layer(x.double()), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("k,s,p", [(1, 1, 0), (2, 2, 0), (3, 1, 1), (3, 2, 0), (2, 1, 1), (7, 1, 3)])
def test_kernel_norm2d_matches_naive_reference(k, s, p):
    x = _inputs(c=3)
    keep = _keep(x.shape, 0.25, seed=2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        layer = KernelNorm2d(k, s, p, dropout_p=0.25)
        xd = x.to(dtype)
        torch.testing.assert_close(layer.eval()(xd).double(), naive_kernel_norm(xd, k, s, p), atol=tol, rtol=tol)
        got = layer.train()(xd, keep_mask=keep)
        torch.testing.assert_close(got.double(), naive_kernel_norm(xd, k, s, p, keep, 0.25), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "k,s,p,size,expected",
    [
        (1, 1, 0, 8, 8),  # 1x1: shape kept
        (2, 2, 0, 8, 8),  # non-overlapping, divisible: shape kept
        (2, 2, 0, 9, 8),  # non-overlapping, not divisible: last row/col dropped
        (3, 1, 0, 8, 18),  # overlapping: 3 * (8 - 3 + 1)
        (3, 1, 1, 8, 24),  # overlapping, padded: 3 * 8
        (3, 2, 0, 9, 12),  # strided: 3 * ((9 - 3) // 2 + 1)
        (2, 3, 1, 7, 6),  # stride > kernel: 2 * ((7 + 2 - 2) // 3 + 1)
    ],
)
def test_kernel_norm2d_output_shape(k, s, p, size, expected):
    h_out = (size + 2 * p - k) // s + 1
    assert expected == k * h_out  # the formula of DESIGN §3, written out per case above
    out = KernelNorm2d(k, s, p)(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3, expected, expected)


def test_kn_conv_gradients_match_reference_autograd():
    """Our hand-written backward against autograd through the naive reference (float64)."""
    torch.manual_seed(3)
    for (k, s, p), groups, bias in itertools.product([(3, 1, 1), (2, 2, 0), (3, 2, 2), (1, 1, 0)], (1, 4), (True,)):
        layer = KNConv2d(4, 4, k, s, p, groups=groups, bias=bias).double()
        x = _inputs(size=6, dtype=torch.float64).requires_grad_()
        keep = _keep(x.shape, 0.2)
        out = kn_conv2d(x, layer.weight, layer.bias, s, p, groups, 0.2, True, EPS, keep_mask=keep)
        grad_out = torch.randn_like(out)
        ours = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad_out)
        ref = naive_kn_conv(x, layer.weight, layer.bias, k, s, p, groups, keep, 0.2)
        theirs = torch.autograd.grad(ref, (x, layer.weight, layer.bias), grad_out)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("k,s,p,groups", [(3, 1, 1, 1), (2, 2, 0, 1), (3, 1, 2, 3), (1, 1, 0, 1)])
def test_kn_conv_gradcheck_float64(k, s, p, groups):
    torch.manual_seed(4)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3 // groups, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(x.shape) > 0.3
    fn = lambda x, w, b: kn_conv2d(x, w, b, s, p, groups, 0.3, True, EPS, keep_mask=keep)  # noqa: E731
    # fast_mode checks random projections of the Jacobian (the slow mode takes minutes on 2 cores)
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    fn_no_bias = lambda x, w: kn_conv2d(x, w, None, s, p, groups, 0.0, False, EPS)  # noqa: E731
    assert torch.autograd.gradcheck(fn_no_bias, (x, w), fast_mode=True)


def test_kernel_norm2d_gradcheck_float64():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(x.shape) > 0.3
    layer = KernelNorm2d(3, 2, 1, dropout_p=0.3)
    assert torch.autograd.gradcheck(lambda x: layer(x, keep_mask=keep), (x,), fast_mode=True)


def test_module_dropout_uses_the_public_mask():
    """A seeded training forward equals the functional form fed the mask `dropout_keep_mask` draws."""
    layer = KNConv2d(4, 4, 3, padding=1, dropout_p=0.2).train()
    x = _inputs()
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    keep = dropout_keep_mask(x, 0.2)
    expected = naive_kn_conv(x, layer.weight, layer.bias, 3, 1, 1, 1, keep, 0.2)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,s,p,groups", [(3, 1, 1, 1), (7, 1, 3, 8), (2, 2, 0, 1), (1, 1, 0, 1)])
def test_channels_last_input_gives_the_reference_in_channels_last(k, s, p, groups):
    """A channels_last input is computed in its own layout (the sparse CPU dropout path, flat indices in
    NHWC order): output and gradients equal the naive reference's (autograd) for the mask that
    `dropout_keep_mask` draws under the same seed, and the output stays channels_last."""
    c = 8
    torch.manual_seed(1)
    layer = KNConv2d(c, 8, k, s, p, groups=groups, dropout_p=0.2).double().train()
    x = _inputs(c=c, dtype=torch.float64).relu()  # relu: zero windows, as dead units leave
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(5)
    y = layer(x_cl)
    torch.manual_seed(5)
    keep = dropout_keep_mask(x_cl, 0.2)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    x_ref = x.clone().requires_grad_()
    expected = naive_kn_conv(x_ref, layer.weight, layer.bias, k, s, p, groups, keep, 0.2)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, (x_cl, layer.weight, layer.bias), gy)
    want = torch.autograd.grad(expected, (x_ref, layer.weight, layer.bias), gy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
    # the same mask given as a (channels_last) bool keep mask: the dense path, as on GPU
    given = kn_conv2d(x_cl, layer.weight, layer.bias, s, p, groups, 0.2, True, EPS, keep_mask=keep)
    torch.testing.assert_close(given, expected, atol=1e-10, rtol=1e-10)
    got = torch.autograd.grad(given, (x_cl, layer.weight, layer.bias), gy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_dropout_mask_rate():
    keep = dropout_keep_mask(torch.empty(1_000_000), 0.05, generator=torch.Generator().manual_seed(0))
    drop_rate = 1.0 - keep.double().mean().item()
    assert abs(drop_rate - 0.05) < 5 * (0.05 * 0.95 / 1e6) ** 0.5  # within 5 sigma


def test_backward_twice_with_retain_graph():
    layer = KNConv2d(4, 4, 3, padding=1).double()
    x = _inputs(dtype=torch.float64).requires_grad_()
    out = layer(x).square().sum()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(g1, g2)


def test_output_may_be_modified_in_place():
    """Backward does not need KNConv2d's output, so a following ReLU(inplace=True) is fine."""
    layer = KNConv2d(4, 4, 3, padding=1)
    x = _inputs().requires_grad_()
    nn.ReLU(inplace=True)(layer(x)).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("make", [lambda: KNConv2d(4, 6, 3, padding=1), lambda: KernelNorm2d(2, 2)])
def test_batch_independence(make):
    layer = make().eval()
    x = _inputs(n=5)
    full = layer(x)
    for i in range(5):
        torch.testing.assert_close(layer(x[i : i + 1]), full[i : i + 1], atol=1e-6, rtol=1e-6)
    # also in training with the same per-sample masks
    keep = torch.rand(x.shape) > 0.1
    full = layer.train()(x, keep_mask=keep)
    torch.testing.assert_close(layer(x[2:3], keep_mask=keep[2:3]), full[2:3], atol=1e-6, rtol=1e-6)


def test_eval_is_deterministic_unless_eval_dropout():
    x = _inputs()
    for layer in (KNConv2d(4, 4, 3, padding=1), KernelNorm2d(3, 1, 1)):
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.eval_dropout = True  # the official code's behaviour
        assert not torch.equal(layer(x), layer(x))
        layer.train()
        assert not torch.equal(layer(x), layer(x))
    layer = KNConv2d(4, 4, 3, padding=1, eval_dropout=True).eval()
    assert not torch.equal(layer(x), layer(x))


def test_bf16_autocast_finite_with_fp32_statistics():
    torch.manual_seed(6)
    layer = KNConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 8, 8) * 50 + 200  # large offset: a bf16 one-pass variance would be garbage
    expected = layer.eval()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        tiled = KernelNorm2d(2, 2)(x)
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all() and torch.isfinite(tiled).all()
    # bf16 conv: ~3 significant digits; normalised outputs are O(1)
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)
    mean, var = kernel_norm_stats(x.half(), 3, 1, 1)
    assert mean.dtype == var.dtype == torch.float32
    assert torch.isfinite(var).all() and (var >= 0).all()  # x^2 ~ 6e4 would overflow fp16


@pytest.mark.parametrize("make", [lambda: KNConv2d(16, 8, 3, padding=1), lambda: KernelNorm2d(3, 1, 1)])
def test_all_zero_windows_are_exact(make):
    """Dead-ReLU regions: an all-zero unit has mean 0 and var 0, so KNConv2d gives exactly b there."""
    torch.manual_seed(7)
    x = torch.relu(torch.randn(2, 16, 12, 12) + 0.5)
    x[:, :, 2:8, 2:8] = 0.0
    layer = make().eval()
    if isinstance(layer, KNConv2d):
        expected = naive_kn_conv(x, layer.weight, layer.bias, 3, 1, 1, 1)
        assert torch.equal(layer(x)[:, :, 3:7, 3:7], layer.bias[None, :, None, None].expand(2, 8, 4, 4))
    else:
        expected = naive_kernel_norm(x, 3, 1, 1)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_large_offset_variance_is_accurate_and_non_negative():
    x = torch.randn(2, 4, 8, 8) + 1000.0  # one-pass E[x^2] - E[x]^2 without a shift loses ~6 digits
    layer = KNConv2d(4, 4, 3, padding=1).eval()
    expected = naive_kn_conv(x, layer.weight, layer.bias, 3, 1, 1, 1)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-3, rtol=1e-3)
    _, var = kernel_norm_stats(torch.full((1, 3, 4, 4), 7.0), 2)
    assert (var >= 0).all()


def test_state_dict_is_a_conv_state_dict():
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    layer = KNConv2d(4, 8, 3, padding=1, groups=2)
    assert isinstance(layer, nn.Conv2d)
    assert layer.state_dict().keys() == conv.state_dict().keys()
    layer.load_state_dict(conv.state_dict())
    assert torch.equal(layer.weight, conv.weight)
    assert list(KernelNorm2d(3).parameters()) == [] and list(KernelNorm2d(3).buffers()) == []


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: KernelNorm2d(3, stride=0), "stride"),
        (lambda: KernelNorm2d(3, padding=-1), "padding"),
        (lambda: KernelNorm2d(0), "kernel_size"),
        (lambda: KernelNorm2d(3, dropout_p=1.0), "dropout_p=1.0"),
        (lambda: KNConv2d(4, 4, 3, dropout_p=-0.1), "dropout_p=-0.1"),
        (lambda: KNConv2d(4, 4, 3, stride=-2), "stride"),
    ],
)
def test_impossible_geometry_raises_at_construction(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_kernel_larger_than_padded_input_raises_at_forward():
    with pytest.raises(ValueError, match=r"kernel size 7 .* H=4\+2\*1=6"):
        KNConv2d(2, 2, 7, padding=1)(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="kernel size 5"):
        KernelNorm2d(5)(torch.randn(1, 2, 4, 4))
