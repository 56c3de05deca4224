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
  by rstd ~ eps^-1/2. The per-pixel variance is formed around each pixel's own channel mean m(p)
  (two passes), so no large common term cancels there in fp32 either.
- with sparse drops the backward gives every element b x + a and takes it back from the dropped ones
  with one gather of (a, b) per dropped element and one scatter (their pixel and value are saved
  compactly in forward), instead of reading and restoring the gradient at every dropped element.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kn_dist.layers.dropout_draws import floor_div, is_channels_last, memory_flat

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


def _pixel_of(flat: Tensor, c: int, length: int, channels_last: bool) -> Tensor:
    """Flat pixel index n * L + l of flat element indices into an (N, C, L) tensor's memory (NCL or NLC order).

    In float64 throughout (`floor_div`: exact, and vectorised where integer division is not).
    """
    if channels_last:  # flat = (n * L + l) * C + c
        return floor_div(flat, c)
    f = flat.to(torch.float64)  # flat = (n * C + c) * L + l
    row = torch.div(f, length).floor_()  # n * C + c
    n = torch.div(row, c).floor_()
    return f.sub_(row.sub_(n).mul_(length)).to(torch.int64)  # flat - (n * C + c - n) * L = n * L + l


def drop_sums(xs: Tensor, dropped: Tensor, channels_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What sparse drops (flat indices into x's memory, `dropout_draws`) take from each pixel's statistics.

    xs: (N, C, L), a view of x in x's layout (`channels_last`: memory order N, L, C). Returns, float64,
    q = -sum_d x_d / C and s2 = -sum_d x_d^2 / C per pixel (N, 1, L) over the dropped elements d of that
    pixel, and per dropped element its flat pixel index (n * L + l) and its value x_d, compact for backward
    (int32 and xs's dtype: together half the memory of int64 and float64).
    """
    n, c, length = xs.shape
    xd = (xs.mT if channels_last else xs).reshape(-1).take(dropped)
    pix = _pixel_of(dropped, c, length, channels_last)
    corr = torch.empty((2, dropped.numel()), dtype=MAP_DTYPE, device=xs.device)
    xd64 = xd.to(MAP_DTYPE)
    torch.mul(xd64, -1.0 / c, out=corr[0])
    torch.mul(corr[0], xd64, out=corr[1])
    sums = torch.zeros((2, n * length), dtype=MAP_DTYPE, device=xs.device).scatter_add_(1, pix.expand(2, -1), corr)
    return sums[0].view(n, 1, length), sums[1].view(n, 1, length), pix.to(torch.int32), xd


def _pixel_maps(xs: Tensor, dropped: Tensor | None, channels_last: bool = False) -> tuple[Tensor, tuple | None]:
    """Per-pixel statistics of e = x * keep over the C channels.

    xs: (N, C, L) in the statistics dtype, a view of x in x's layout (`channels_last`: memory order
    N, L, C, which is also the order of flat drop indices). Returns maps (N, 2, L) float64: [mean of e,
    mean of e^2], the latter formed as v + 2 m q + m^2 with m the channel mean of x (of e with a dense
    mask), v = mean_c (e - m)^2 (a two-pass variance) and q = mean_c (e - m); and, for sparse drops,
    the pixel index and value of each dropped element (`drop_sums`), else None.
    Sparse drops correct both around m (`drop_sums`): a dropped element x_d turns (x_d - m) into -m,
    so q gains -x_d / C and v gains -x_d (x_d - 2 m) / C.
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
        return maps, None
    q, s2, pix, xd = drop_sums(xs, dropped, channels_last)
    torch.add(md, q, out=maps[:, :1])
    # mean e^2 = v + dv + 2 m q + m^2 with dv = s2 - 2 m q (the sum of -x_d (x_d - 2 m) / C): = v + s2 + m^2,
    # without gathering m at each dropped element
    torch.addcmul(v.add_(s2), md, md, out=maps[:, 1:])
    return maps, (pix, xd)


def normalised_conv(x, weight, bias, stride, padding, groups, mu, rstd) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = (conv(x, W, s) - mu * sum(W)) * rstd + b, given the window statistics mu, rstd (N, 1, H', W') float64.

    Returns y (x's dtype), the conv output z (kept for backward, see KNConv2dFunction), sum(W) (O,) and
    rhs (N, K, L) = [mu * rstd, 1 if there is a bias] in the statistics dtype, which backward reduces gy with.
    """
    sdt = stats_dtype(x)
    n = x.shape[0]
    z = F.conv2d(x, weight, None, stride, padding, 1, groups)  # (N, O, H', W')
    o, length = z.shape[1], z.shape[2] * z.shape[3]
    sum_w = weight.sum(dim=(1, 2, 3), dtype=sdt)  # (O,)
    # rhs: the bias row only serves the grads of sum_w and b in backward
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
    return y.to(x.dtype), z, sum_w, rhs


def normalised_conv_backward(ctx, conf, gy, x, weight, mu, rstd, sum_w, rhs, need_gx: bool):
    """Backward of `normalised_conv`: (g_mu, g_var) per window (N, 1, H', W') float64, and gx, gw, gb through the
    conv alone (gx None unless `need_gx`). With G1 = sum_o gy_o sum(W_o) and Gz = sum_o gy_o z_o per window:
    g_mu = -rstd * G1, g_var = -rstd^3 / 2 * (Gz - mu * G1).

    The conv output z is taken from ctx.z, which holds the only reference, so that it is freed before the
    conv backward (the peak of backward); a second backward (retain_graph=True) recomputes it.
    """
    stride, padding, groups = conf
    z, ctx.z = ctx.z, None
    if z is None:  # a second backward through the same graph (retain_graph=True): recompute
        z = F.conv2d(x, weight, None, stride, padding, 1, groups)
    n, o, h_out, w_out = gy.shape
    sdt = rhs.dtype
    gy3 = _as_ncl(gy.to(sdt))  # (N, O, L), in gy's layout
    z3 = _as_ncl(z)
    g1 = torch.matmul(sum_w.view(1, o), gy3)  # (N, 1, L)
    gz_sum = (gy3 * z3.to(sdt)).sum(dim=1, keepdim=True)
    del z, z3  # the peak of backward is at the conv backward below
    g1 = g1.view(n, 1, h_out, w_out).to(MAP_DTYPE)
    gz_sum = gz_sum.view(n, 1, h_out, w_out).to(MAP_DTYPE)
    g_var = torch.addcmul(gz_sum, mu, g1, value=-1.0).mul_(rstd * rstd * rstd).mul_(-0.5)
    g_mu = g1.mul_(rstd).neg_()
    # Over (N, L): the grads of sum_w (it reaches every weight of its filter) and of the bias.
    red = torch.matmul(gy3, rhs.mT).sum(0)  # (O, K)
    gz = (gy.to(sdt) * rstd.to(sdt)).to(x.dtype)  # in gy's layout, as the conv backward wants
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gz, x, weight, None, stride, padding, (1, 1), False, (0, 0), groups, (need_gx, True, False)
    )
    del gz
    gw.sub_(red[:, 0].to(gw.dtype).view(o, 1, 1, 1))
    gb = red[:, 1].to(weight.dtype) if red.shape[1] == 2 else None
    return g_mu, g_var, gx, gw, gb


class KNConv2dFunction(torch.autograd.Function):
    """y = (conv(x, W, s) - mu * sum(W)) * rstd + b with a hand-written backward.

    Statistics of D = scale * e per window w (n = C * kh * kw elements): mu = scale * mean(e),
    var = scale^2 * (mean(e^2) - mean(e)^2), both pooled from the per-pixel maps of `_pixel_maps`.
    Backward, with g_mu and g_var per window from `normalised_conv_backward`:
        dL/dx_u = keep_u * scale / n * sum_{w containing u} [g_mu + 2 g_var (scale x_u - mu_w)]
                = keep_u * (B(p) * x_u + A(p))      for u at pixel p,
    with B = 2 scale^2 / n * sum_w g_var and A = scale / n * sum_w [g_mu - 2 g_var mu_w]
    (the sums over windows are the transpose of the average pooling, in float64).
    Saved: x, W, the drop (indices or mask), the conv output z and 1-channel maps. z rather than y
    is kept so that in-place ops on y (ReLU(inplace=True)) stay legal; backward frees it before the
    conv backward (a second backward, retain_graph=True, recomputes it).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups, eps, dropped, scale):
        kernel = tuple(weight.shape[-2:])
        n, c, h, w = x.shape
        maps, ctx.sparse = _pixel_maps(_as_ncl(x.to(stats_dtype(x))), dropped, is_channels_last(x))
        win = _pool(maps.view(n, 2, h, w), kernel, stride, padding)  # (N, 2, H', W'): mean e, mean e^2
        mu = win[:, :1] * scale
        var = torch.addcmul(win[:, 1:], win[:, :1], win[:, :1], value=-1.0).clamp_min_(0.0)
        rstd = var.mul_(scale * scale).add_(eps).rsqrt_()
        y, z, sum_w, rhs = normalised_conv(x, weight, bias, stride, padding, groups, mu, rstd)
        ctx.conf = (stride, padding, groups, scale)
        ctx.save_for_backward(x, weight, dropped, mu, rstd, sum_w, rhs)
        ctx.z = z  # an intermediate: kept on ctx so that backward can free it early
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight, dropped, mu, rstd, sum_w, rhs = ctx.saved_tensors
        stride, padding, groups, scale = ctx.conf
        need_gx = ctx.needs_input_grad[0]
        g_mu, g_var, gx, gw, gb = normalised_conv_backward(
            ctx, (stride, padding, groups), gy, x, weight, mu, rstd, sum_w, rhs, need_gx
        )
        sparse = ctx.sparse  # kept for a second backward (retain_graph=True)
        if not need_gx:  # e.g. a stem conv on the input images
            return None, gw, gb, None, None, None, None, None, None
        c, sdt = x.shape[1], rhs.dtype
        # per window, float64: [g_mu - 2 g_var mu, g_var]
        g = torch.cat([g_mu.addcmul_(g_var, mu, value=-2.0), g_var], dim=1)
        # [A, B] per pixel (class docstring), times kh * kw / C: one transposed pooling, one cast
        ab = _pool_backward(g, x.shape[2:], tuple(weight.shape[-2:]), stride, padding)  # (N, 2, H, W)
        ab[:, 1:] *= 2.0 * scale
        ab = ab.to(sdt).mul_(scale / (c * weight.shape[-2] * weight.shape[-1]))
        a, b = ab[:, :1], ab[:, 1:]
        if dropped is None or dropped.dtype != torch.bool:
            # in place, then dropped elements (flat indices, in x's memory order: gx in x's layout) lose
            # again what they were given: b x_d + a at their pixel, one gather of (a, b) per element
            gx = gx.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)
            gx.addcmul_(b, x).add_(a)
            if dropped is not None:
                pix, xd = sparse
                rows = ab.view(ab.shape[0], 2, -1).mT.neg().reshape(-1, 2).index_select(0, pix)  # (D, 2): -a, -b
                memory_flat(gx).scatter_add_(0, dropped, torch.addcmul(rows[:, 0], rows[:, 1], xd).to(gx.dtype))
        else:
            gx.add_(torch.addcmul(a, b, x.to(sdt)).masked_fill_(dropped, 0.0))
        return gx, gw, gb, None, None, None, None, None, None
