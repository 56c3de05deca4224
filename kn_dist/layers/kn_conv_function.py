"""KNConv2d's fast form as one autograd function (DESIGN.md §3; the maths is in `KNConv2dFunction`).

KernelNorm (Nasirigerdeh et al., TMLR 2024) normalises each (C, kh, kw) window of the zero-padded
input with the mean and variance of its dropped-out copy D = scale * e, e = x * keep; KNConv2d then
applies a conv, which is y = (conv(x, W) - mu * sum(W)) * rstd + b per window, rstd = (var + eps)^-1/2.

Where the time and the accuracy go (profiled on CPU, fp32, torch.profiler self time):
- input-sized work is a handful of passes: per-pixel channel statistics by batched matmuls, one
  centred square, the conv, two passes to normalise; the backward reads the output grad three times.
- dropout never builds a masked copy of the input on CPU: statistics are taken on x and corrected
  with the few dropped elements (flat indices, `dropout_draws`), gathered and scattered sparsely.
- everything per window is a 1-channel map (N, 1, H', W'), so it is kept in float64: the window
  variance E[e^2] - mean^2 and the variance gradient's centring terms would otherwise cancel in fp32
  where a window's variance is far below eps (dead ReLUs, near-constant inputs), and be amplified
  by rstd ~ eps^-1/2. Per-element terms are formed around each pixel's own channel mean m(p), so
  no large common term cancels in fp32 either.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kn_dist.layers.dropout_draws import is_channels_last, memory_flat

MAP_DTYPE = torch.float64  # the 1-channel window maps (see the module docstring)


def stats_dtype(x: Tensor) -> torch.dtype:
    """Input-sized statistics in fp32 for fp32/half/bf16 inputs (also under autocast), fp64 for fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


def _pool(t: Tensor, kernel, stride, padding) -> Tensor:
    """Average pooling over zero-padded windows, padded zeros counted (count_include_pad)."""
    out = _window_sum(_window_sum(t, -1, kernel[1], stride[1], padding[1]), -2, kernel[0], stride[0], padding[0])
    return out if kernel == (1, 1) else out.mul_(1.0 / (kernel[0] * kernel[1]))


def _pool_backward(g: Tensor, size, kernel, stride, padding) -> Tensor:
    """Transpose of `_pool` without its 1 / (kh * kw): per-window values -> per-pixel sums, (N, K, H, W)."""
    t = _window_sum_transpose(g, -2, size[0], kernel[0], stride[0], padding[0])
    return _window_sum_transpose(t, -1, size[1], kernel[1], stride[1], padding[1])


def _as_ncl(t: Tensor) -> Tensor:
    """t (N, C, H, W), NCHW or channels_last, as an (N, C, H*W) view without a copy (other layouts: copied)."""
    n, c = t.shape[:2]
    if is_channels_last(t):
        return t.permute(0, 2, 3, 1).reshape(n, -1, c).mT
    return t.contiguous().view(n, c, -1)


def _pixel_maps(xs: Tensor, dropped: Tensor | None, channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """Per-pixel statistics of e = x * keep over the C channels.

    xs: (N, C, L) in the statistics dtype, a view of x in x's layout (`channels_last`: memory order
    N, L, C, which is also the order of flat drop indices). Returns the centre m (N, 1, L), the
    channel mean of x (of e with a dense mask), and maps (N, 2, L) float64: [mean of e, mean of
    e^2], the latter formed as v + 2 m q + m^2 with v = mean_c (e - m)^2 (a two-pass variance) and
    q = mean_c (e - m).
    Sparse drops (flat indices into x) correct both around m: a dropped element x_d turns
    (x_d - m) into -m, so q gains -x_d / C and v gains -x_d (x_d - 2 m) / C.
    """
    n, c, length = xs.shape
    sparse = dropped is not None and dropped.dtype != torch.bool
    if dropped is not None and not sparse:
        xs = xs.masked_fill(_as_ncl(dropped), 0.0)
    avg = torch.full((1, c), 1.0 / c, dtype=xs.dtype, device=xs.device)
    m = torch.matmul(avg, xs)  # (N, 1, L)
    v = torch.matmul(avg, F.mse_loss(xs, m.expand_as(xs), reduction="none")).to(MAP_DTYPE)  # (x - m)^2 in one pass
    md = m.to(MAP_DTYPE)
    maps = torch.empty((n, 2, length), dtype=MAP_DTYPE, device=xs.device)
    if not sparse:
        maps[:, :1] = md
        torch.addcmul(v, md, md, out=maps[:, 1:])
        return m, maps
    if channels_last:
        xd = xs.mT.reshape(-1).index_select(0, dropped).to(MAP_DTYPE)
        pix = dropped // c  # memory order (n, l, c): flat (n, l) of each dropped element
    else:
        xd = xs.reshape(-1).index_select(0, dropped).to(MAP_DTYPE)
        pix = dropped // (c * length) * length + dropped % length
    corr = torch.empty((2, dropped.numel()), dtype=MAP_DTYPE, device=xs.device)
    torch.mul(xd, -1.0 / c, out=corr[0])
    torch.mul(corr[0], xd, out=corr[1])
    sums = torch.zeros((2, n * length), dtype=MAP_DTYPE, device=xs.device).scatter_add_(1, pix.expand(2, -1), corr)
    q, s2 = sums[0].view(n, 1, length), sums[1].view(n, 1, length)  # s2 = -sum_d x_d^2 / C
    torch.add(md, q, out=maps[:, :1])
    # mean e^2 = v + dv + 2 m q + m^2 with dv = s2 - 2 m q (the sum of -x_d (x_d - 2 m) / C): = v + s2 + m^2,
    # without gathering m at each dropped element
    torch.addcmul(v.add_(s2), md, md, out=maps[:, 1:])
    return m, maps


class KNConv2dFunction(torch.autograd.Function):
    """y = (conv(x, W, s) - mu * sum(W)) * rstd + b with a hand-written backward.

    Statistics of D = scale * e per window w (n = C * kh * kw elements): mu = scale * mean(e),
    var = scale^2 * (mean(e^2) - mean(e)^2), both pooled from the per-pixel maps of `_pixel_maps`.
    Backward, with G1 = sum_o gy_o sum(W_o) and Gz = sum_o gy_o z_o per window:
        g_mu = -rstd * G1,   g_var = -rstd^3 / 2 * (Gz - mu * G1),
        dL/dx_u = keep_u * scale / n * sum_{w containing u} [g_mu + 2 g_var (scale x_u - mu_w)]
                = keep_u * (B(p) * (x_u - m(p)) + A(p))      for u at pixel p,
    with B = 2 scale^2 / n * sum_w g_var and A = scale / n * sum_w [g_mu + 2 g_var (scale m(p) - mu_w)]
    (the sums over windows are the transpose of the average pooling, in float64).
    Saved: x, W, the drop (indices or mask), the conv output z and 1-channel maps. z rather than y
    is kept so that in-place ops on y (ReLU(inplace=True)) stay legal; backward frees it before the
    conv backward (a second backward, retain_graph=True, recomputes it).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups, eps, dropped, scale):
        kernel = tuple(weight.shape[-2:])
        n, c, h, w = x.shape
        sdt = stats_dtype(x)
        _, maps = _pixel_maps(_as_ncl(x.to(sdt)), dropped, is_channels_last(x))
        win = _pool(maps.view(n, 2, h, w), kernel, stride, padding)  # (N, 2, H', W'): mean e, mean e^2
        mu = win[:, :1] * scale
        var = torch.addcmul(win[:, 1:], win[:, :1], win[:, :1], value=-1.0).clamp_min_(0.0)
        rstd = var.mul_(scale * scale).add_(eps).rsqrt_()
        z = F.conv2d(x, weight, None, stride, padding, 1, groups)  # (N, O, H', W')
        o, length = z.shape[1], z.shape[2] * z.shape[3]
        sum_w = weight.sum(dim=(1, 2, 3), dtype=sdt)  # (O,)
        # rhs: (N, K, L) = [mu * rstd, 1]; the bias row only serves the grads of sum_w and b in backward
        rhs = torch.ones((n, 1 if bias is None else 2, length), dtype=sdt, device=x.device)
        mu_rstd = torch.mul(mu, rstd, out=rhs[:, :1].view(n, 1, *z.shape[2:]))
        rstd_s = rstd.to(sdt)
        # y = b + z * rstd - sum_w * (mu * rstd): two passes over the output
        zs = z.to(sdt)
        if bias is None:
            y = torch.mul(zs, rstd_s)
        else:
            y = torch.addcmul(bias.to(sdt).view(1, o, 1, 1), zs, rstd_s)
        y.addcmul_(sum_w.view(1, o, 1, 1), mu_rstd, value=-1.0)
        ctx.conf = (stride, padding, groups, scale)
        ctx.save_for_backward(x, weight, dropped, mu, rstd, sum_w, rhs)
        ctx.z = z  # an intermediate: kept on ctx so that backward can free it early
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight, dropped, mu, rstd, sum_w, rhs = ctx.saved_tensors
        stride, padding, groups, scale = ctx.conf
        z, ctx.z = ctx.z, None
        if z is None:  # a second backward through the same graph (retain_graph=True): recompute
            z = F.conv2d(x, weight, None, stride, padding, 1, groups)
        n, o, h_out, w_out = gy.shape
        c, sdt = x.shape[1], rhs.dtype
        gy3 = _as_ncl(gy.to(sdt))  # (N, O, L), in gy's layout
        z3 = _as_ncl(z)
        g1 = torch.matmul(sum_w.view(1, o), gy3)  # (N, 1, L)
        gz_sum = (gy3 * z3.to(sdt)).sum(dim=1, keepdim=True)
        del z, z3  # the peak of backward is at the conv backward below
        # per window, float64: [g_mu - 2 g_var mu, g_var]
        g1 = g1.view(n, 1, h_out, w_out).to(MAP_DTYPE)
        gz_sum = gz_sum.view(n, 1, h_out, w_out).to(MAP_DTYPE)
        g = torch.empty((n, 2, h_out, w_out), dtype=MAP_DTYPE, device=gy.device)
        g_var = torch.addcmul(gz_sum, mu, g1, value=-1.0, out=g[:, 1:]).mul_(rstd * rstd * rstd).mul_(-0.5)
        torch.mul(g1, rstd, out=g[:, :1]).neg_().addcmul_(g_var, mu, value=-2.0)
        # [A, B] per pixel (class docstring), times kh * kw / C: one transposed pooling, one cast
        ab = _pool_backward(g, x.shape[2:], tuple(weight.shape[-2:]), stride, padding)  # (N, 2, H, W)
        ab[:, 1:] *= 2.0 * scale
        ab = ab.to(sdt).mul_(scale / (c * weight.shape[-2] * weight.shape[-1]))
        # Over (N, L): the grads of sum_w (it reaches every weight of its filter) and of the bias.
        red = torch.matmul(gy3, rhs.mT).sum(0)  # (O, K)
        gz = (gy.to(sdt) * rstd.to(sdt)).to(x.dtype)  # in gy's layout, as the conv backward wants
        gx, gw, _ = torch.ops.aten.convolution_backward(
            gz, x, weight, None, stride, padding, (1, 1), False, (0, 0), groups, (True, True, False)
        )
        del gz
        gw.sub_(red[:, 0].to(gw.dtype).view(o, 1, 1, 1))
        gb = red[:, 1].to(weight.dtype) if red.shape[1] == 2 else None
        a, b = ab[:, :1], ab[:, 1:]
        if dropped is None or dropped.dtype != torch.bool:
            # in place; dropped elements (flat indices) get their conv-only gradient back exactly
            # flat indices are in x's memory order: gx in x's layout
            gx = gx.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)
            kept_out = None if dropped is None else memory_flat(gx).index_select(0, dropped)
            gx.addcmul_(b, x).add_(a)
            if kept_out is not None:
                memory_flat(gx).index_copy_(0, dropped, kept_out)
        else:
            gx.add_(torch.addcmul(a, b, x.to(sdt)).masked_fill_(dropped, 0.0))
        return gx, gw, gb, None, None, None, None, None, None
