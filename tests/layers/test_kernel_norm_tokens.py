"""KernelNormTokens / KernelNormEmbedGrid against naive references with explicit windows."""

import pytest
import torch

from kn_dist.layers import KernelNormTokens, dropout_keep_mask
from kn_dist.layers.kernel_norm_tokens import KernelNormEmbedGrid, embed_grid_shape

EPS = 1e-5


def naive_tokens(x, k, prefix, grid, keep=None, p=0.0):
    """Loop over prefix tokens and over k×k token windows of the (h, w) grid; normalise each unit."""
    n, length, d = x.shape
    h, w = grid
    stats = x if keep is None else x * keep / (1 - p)
    out = torch.empty_like(x)
    for b in range(n):
        for t in range(prefix):
            var, mu = torch.var_mean(stats[b, t], unbiased=False)
            out[b, t] = (x[b, t] - mu) / torch.sqrt(var + EPS)
        for i in range(0, h, k):
            for j in range(0, w, k):
                idx = [prefix + r * w + c for r in range(i, i + k) for c in range(j, j + k)]
                var, mu = torch.var_mean(stats[b, idx], unbiased=False)  # unit: k·k tokens × D channels
                out[b, idx] = (x[b, idx] - mu) / torch.sqrt(var + EPS)
    return out


def naive_embed_grid(x, k, grid, keep=None, p=0.0):
    """Every unit: a k×k patch of each token's (a, b) embedding grid, across all L tokens."""
    n, length, d = x.shape
    a, bb = grid
    xs = x.reshape(n, length, a, bb)
    stats = xs if keep is None else xs * keep.reshape(xs.shape) / (1 - p)
    out = torch.empty_like(xs)
    for s in range(n):
        for i in range(0, a, k):
            for j in range(0, bb, k):
                var, mu = torch.var_mean(stats[s, :, i : i + k, j : j + k], unbiased=False)
                out[s, :, i : i + k, j : j + k] = (xs[s, :, i : i + k, j : j + k] - mu) / torch.sqrt(var + EPS)
    return out.reshape(n, length, d)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize(
    "k,prefix,grid",
    [(1, 1, (4, 4)), (2, 1, (4, 4)), (4, 1, (4, 4)), (2, 0, (4, 6)), (2, 2, (6, 4)), (3, 1, (6, 3))],
)
def test_matches_naive_windows(k, prefix, grid, dtype, tol):
    torch.manual_seed(0)
    d = 12
    x = (torch.randn(3, prefix + grid[0] * grid[1], d) * 2 + torch.randn(3, 1, 1)).to(dtype)
    layer = KernelNormTokens(k, num_prefix_tokens=prefix, grid_size=grid, dropout_p=0.2).eval()
    torch.testing.assert_close(layer(x), naive_tokens(x, k, prefix, grid), atol=tol, rtol=0)
    # with dropout on the statistics: the same mask in both
    p = 0.2
    keep = torch.rand(x.shape) > p
    layer.train()
    torch.testing.assert_close(layer(x, keep_mask=keep), naive_tokens(x, k, prefix, grid, keep, p), atol=tol, rtol=0)


def test_square_grid_inferred_and_large_offset():
    torch.manual_seed(1)
    x = torch.randn(2, 1 + 64, 16, dtype=torch.float64) * 0.5 + 300.0  # large common offset
    want = naive_tokens(x, 2, 1, (8, 8))
    got = KernelNormTokens(2).eval()(x.float())
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)


def test_class_token_depends_only_on_itself_and_grid_not_on_class_token():
    torch.manual_seed(2)
    layer = KernelNormTokens(2, num_prefix_tokens=1).eval()
    x = torch.randn(2, 1 + 16, 8)
    y = layer(x)
    x_grid = x.clone()
    x_grid[:, 1:] = torch.randn_like(x_grid[:, 1:]) * 5
    torch.testing.assert_close(layer(x_grid)[:, 0], y[:, 0], atol=0, rtol=0)
    x_cls = x.clone()
    x_cls[:, 0] = torch.randn_like(x_cls[:, 0]) * 5
    torch.testing.assert_close(layer(x_cls)[:, 1:], y[:, 1:], atol=0, rtol=0)
    assert not torch.allclose(layer(x_cls)[:, 0], y[:, 0])


def test_windows_are_local_and_batch_independent():
    torch.manual_seed(3)
    layer = KernelNormTokens(2, num_prefix_tokens=0).eval()
    x = torch.randn(3, 16, 8)
    y = layer(x)
    x2 = x.clone()
    x2[:, 0] += 10.0  # token (0, 0): only the window of tokens (0,0), (0,1), (1,0), (1,1) may change
    changed = (layer(x2) - y).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [0, 1, 4, 5]
    torch.testing.assert_close(layer(x[1:2]), y[1:2], atol=0, rtol=0)


def test_eval_deterministic_by_default_and_eval_dropout_option():
    torch.manual_seed(4)
    x = torch.randn(2, 17, 8)
    layer = KernelNormTokens(2, dropout_p=0.5)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # dropout on the statistics in training
    layer.eval()
    torch.testing.assert_close(layer(x), naive_tokens(x, 2, 1, (4, 4)), atol=1e-5, rtol=0)
    official = KernelNormTokens(2, dropout_p=0.5, eval_dropout=True).eval()
    assert not torch.equal(official(x), official(x))


@pytest.mark.parametrize("k,prefix,dropout", [(2, 1, True), (2, 0, False), (1, 2, True), (1, 1, False)])
def test_gradcheck_float64(k, prefix, dropout):
    torch.manual_seed(5)
    x = torch.randn(2, prefix + 4, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(x.shape) > 0.3 if dropout else None
    layer = KernelNormTokens(k, dropout_p=0.3 if dropout else 0.0, num_prefix_tokens=prefix).train()
    assert torch.autograd.gradcheck(lambda t: layer(t, keep_mask=keep), (x,))


@pytest.mark.parametrize("k,prefix,offset", [(2, 1, 0.0), (1, 2, 0.0), (2, 0, 50.0)])
def test_own_sparse_draw_matches_naive_windows_with_that_mask(k, prefix, offset):
    """On CPU the layer draws flat indices and corrects its statistics sparsely (no mask); with the mask the
    same seed gives (`dropout_keep_mask`), the naive windows must give the same output and input gradient."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(3, prefix + 16, 24, generator=gen, dtype=torch.float64) * 2 + offset).requires_grad_()
    layer = KernelNormTokens(k, num_prefix_tokens=prefix, dropout_p=0.1).train()
    torch.manual_seed(8)
    keep = dropout_keep_mask(x, 0.1)
    torch.manual_seed(8)
    y = layer(x)
    want = naive_tokens(x, k, prefix, (4, 4), keep, 0.1)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=0)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (got,), (ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(want, x, g)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_embed_grid_own_sparse_draw_matches_naive_with_that_mask():
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 5, 24, generator=gen, dtype=torch.float64) + 3.0).requires_grad_()
    layer = KernelNormEmbedGrid(24, 2, dropout_p=0.1).train()
    torch.manual_seed(10)
    keep = dropout_keep_mask(x, 0.1)
    torch.manual_seed(10)
    y = layer(x)
    want = naive_embed_grid(x, 2, (4, 6), keep, 0.1)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=0)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (got,), (ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(want, x, g)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_gradcheck_embed_grid_float64():
    torch.manual_seed(5)
    z = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(z.shape) > 0.3
    emb = KernelNormEmbedGrid(8, 2, dropout_p=0.3).train()
    assert torch.autograd.gradcheck(lambda t: emb(t, keep_mask=keep), (z,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_finite_outputs(dtype):
    x = (torch.randn(2, 17, 32) * 100).to(dtype)
    y = KernelNormTokens(2).eval()(x)
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=3, grid_size=(8, 8)), "kernel_size=3"),
        (dict(kernel_size=2, stride=1), "stride=1"),
        (dict(kernel_size=0), "kernel_size=0"),
        (dict(kernel_size=2, dropout_p=1.0), "dropout_p=1.0"),
    ],
)
def test_impossible_geometry_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelNormTokens(**kwargs)


def test_non_square_sequence_without_grid_raises():
    with pytest.raises(ValueError, match="square"):
        KernelNormTokens(1)(torch.randn(1, 1 + 12, 4))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_embed_grid_matches_naive(dtype, tol):
    torch.manual_seed(6)
    x = torch.randn(2, 5, 24, dtype=dtype) + 1.0
    layer = KernelNormEmbedGrid(24, 2, dropout_p=0.25).eval()
    assert layer.grid == (4, 6)
    torch.testing.assert_close(layer(x), naive_embed_grid(x, 2, (4, 6)), atol=tol, rtol=0)
    keep = torch.rand(x.shape) > 0.25
    got = layer.train()(x, keep_mask=keep)
    torch.testing.assert_close(got, naive_embed_grid(x, 2, (4, 6), keep, 0.25), atol=tol, rtol=0)


def test_embed_grid_shapes():
    assert embed_grid_shape(784, 2) == (28, 28)  # the seed project's square width
    assert embed_grid_shape(192, 2) == (12, 16)
    assert embed_grid_shape(768, 2) == (24, 32)
    with pytest.raises(ValueError, match="dim 14"):
        embed_grid_shape(14, 2)
