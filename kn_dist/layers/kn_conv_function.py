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
- a convolution rounded coarser than fp32 (bf16 / fp16 autocast, TF32 on a GPU) is evaluated centred,
  conv(x - m, W) plus a 1-channel term per kernel tap (`conv_numerics`), so that flat windows do not
  amplify its rounding; `normalised_conv` writes both forms as taps: y = z * rstd + sum_k W_k (d_k rstd)
  + b with z the convolution, W_k the tap weights and d_k per window (uncentred: one tap, W = sum(W),
  d = -mu; centred: kh * kw taps, W_k = the filter's tap k summed over its channels, d_k = m(p + k) - mu).
- with sparse drops the backward gives every element b x + a and takes it back from the dropped ones
  with one gather of (a, b) per dropped element and one scatter (their pixel and value are saved
  compactly in forward), instead of reading and restoring the gradient at every dropped element.
"""

from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kn_dist.layers.conv_numerics import conv_operand
from kn_dist.layers.dropout_draws import floor_div, is_channels_last, memory_flat
from kn_dist.layers.window_sums import pool, pool_backward

MAP_DTYPE = torch.float64  # the 1-channel window maps (see the module docstring)


def stats_dtype(x: Tensor) -> torch.dtype:
    """Input-sized statistics in fp32 for fp32/half/bf16 inputs (also under autocast), fp64 for fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layout(x: Tensor) -> torch.memory_format:
    """The memory format KernelNorm layers keep: channels_last for a channels_last x, else contiguous."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def strided_like(t: Tensor, ref: Tensor) -> Tensor:
    """t with exactly ref's strides (a copy only where they differ).

    A weight gradient must have its parameter's strides: DDP copies it into a bucket view with them and
    warns "Grad strides do not match bucket view strides" otherwise, and a custom op's output must have
    the strides its fake gives. Strides of size-1 dimensions count too, which `contiguous(memory_format)`
    leaves as they are: a depthwise (C, 1, k, k) weight is both contiguous and channels_last.
    """
    if t.stride() == ref.stride():
        return t
    return torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device).copy_(t)


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


def pixel_maps(x4: Tensor, dropped: Tensor | None, centre: bool) -> tuple[Tensor, Tensor, Tensor | None, tuple | None]:
    """Per-pixel statistics of e = x * keep over the C channels, and x centred on its channel mean.

    x4: (N, C, H, W) in the statistics dtype, contiguous or channels_last (flat drop indices count in that
    memory order). Returns
    - maps (N, 2, L) float64: [mean of e, mean of e^2], the latter formed as v + 2 m q + m^2 with m the
      channel mean of x (of e for an uncentred dense mask), v = mean_c (e - m)^2 (a two-pass variance) and
      q = mean_c (e - m). Sparse drops correct both around m (`drop_sums`): a dropped element x_d turns
      (x_d - m) into -m, so q gains -x_d / C and v gains -x_d (x_d - 2 m) / C;
    - m (N, 1, L) in the statistics dtype;
    - xc = x - m (N, C, H, W) in x's layout where `centre`, else None;
    - for sparse drops (pixel index, value) of each dropped element, the value x_d (x_d - m for `centre`).
    """
    n, c, h, w = x4.shape
    sparse = dropped is not None and dropped.dtype != torch.bool
    xs = _as_ncl(x4)
    if dropped is not None and not sparse and not centre:
        xs = xs.masked_fill(_as_ncl(dropped), 0.0)
    avg = torch.full((1, c), 1.0 / c, dtype=xs.dtype, device=xs.device)
    m = torch.matmul(avg, xs)  # (N, 1, L)
    xc, q = None, None
    if centre:
        xc = x4 - m.view(n, 1, h, w)  # in x's layout: the convolution's operand
        ec = _as_ncl(xc)
        if dropped is not None and not sparse:  # e - m is -m where dropped
            ec = torch.where(_as_ncl(dropped), m.neg(), ec)
            q = torch.matmul(avg, ec).to(MAP_DTYPE)
        v = torch.matmul(avg, ec.square()).to(MAP_DTYPE)
    else:
        v = torch.matmul(avg, F.mse_loss(xs, m.expand_as(xs), reduction="none")).to(MAP_DTYPE)  # (x - m)^2 in one pass
    md = m.to(MAP_DTYPE)
    maps = torch.empty((n, 2, h * w), dtype=MAP_DTYPE, device=xs.device)
    if sparse:
        q, s2, pix, xd = drop_sums(xs, dropped, is_channels_last(x4))
        torch.add(md, q, out=maps[:, :1])
        # mean e^2 = v + dv + 2 m q + m^2 with dv = s2 - 2 m q (the sum of -x_d (x_d - 2 m) / C): = v + s2 + m^2,
        # without gathering m at each dropped element
        torch.addcmul(v.add_(s2), md, md, out=maps[:, 1:])
        if centre:
            xd = xd - m.view(-1).index_select(0, pix)  # the same fp32 subtraction as in xc
        return maps, m, xc, (pix, xd)
    if q is None:
        maps[:, :1] = md
        torch.addcmul(v, md, md, out=maps[:, 1:])
    else:
        torch.add(md, q, out=maps[:, :1])
        torch.addcmul(v.addcmul_(md, q, value=2.0), md, md, out=maps[:, 1:])
    return maps, m, xc, None


def window_moments(maps: Tensor, shape, kernel, stride, padding, scale: float, eps: float) -> tuple[Tensor, Tensor]:
    """(mu, rstd) per window, (N, 1, H', W') float64, from the per-pixel maps (N, 2, L) of `pixel_maps`."""
    n, _, h, w = shape
    win = pool(maps.view(n, 2, h, w), kernel, stride, padding)  # (N, 2, H', W'): mean e, mean e^2
    mu = win[:, :1] * scale
    var = torch.addcmul(win[:, 1:], win[:, :1], win[:, :1], value=-1.0).clamp_min_(0.0)
    return mu, var.mul_(scale * scale).add_(eps).rsqrt_()


def _tap_weights(weight: Tensor, dtype: torch.dtype, centred: bool) -> Tensor:
    """(O, K): sum(W) per filter (K = 1), or for `centred` each tap of the filter summed over its channels."""
    o = weight.shape[0]
    if centred:
        return weight.sum(dim=1, dtype=dtype).view(o, -1)  # (O, kh * kw), taps in unfold's order
    return weight.sum(dim=(1, 2, 3), dtype=dtype).view(o, 1)


def normalised_conv(xin, weight, bias, conf, mu, rstd, m4, tf32: bool, out_dtype) -> tuple[Tensor, Tensor, Tensor]:
    """y = (conv(x, W, s) - mu * sum(W)) * rstd + b from the window statistics mu, rstd (N, 1, H', W') float64.

    xin is the convolution's operand in its dtype: x (m4 None) or x - m with m4 = m (N, 1, H, W) float64, the
    per-pixel mean it was centred on. Returns y (`out_dtype`, xin's layout), the conv output z (kept for
    backward, see KNConv2dFunction) and rhs (N, K (+1), L') = [d_k * rstd for each tap, 1 if there is a bias]
    in the statistics dtype (module docstring), which backward reduces gy with.
    """
    stride, padding, groups = conf
    sdt = stats_dtype(xin)
    n = xin.shape[0]
    z = F.conv2d(xin, conv_operand(weight, xin.dtype, tf32), None, stride, padding, 1, groups)  # (N, O, H', W')
    o, h_out, w_out = z.shape[1:]
    if m4 is None:
        d = mu.view(n, 1, -1).neg()  # (N, 1, L')
    else:  # d_k = m(p + k) - mu(p), exact in float64; padded pixels have m = 0
        d = F.unfold(m4, tuple(weight.shape[-2:]), padding=padding, stride=stride).sub_(mu.view(n, 1, -1))
    taps = d.shape[1]
    rhs = torch.ones((n, taps + (bias is not None), h_out * w_out), dtype=sdt, device=xin.device)
    torch.mul(d, rstd.view(n, 1, -1), out=rhs[:, :taps])
    wk = _tap_weights(weight, sdt, m4 is not None)
    if bias is not None:
        wk = torch.cat([wk, bias.to(sdt).view(o, 1)], dim=1)
    # y = z * rstd + [sum_k W_k d_k rstd + b]: the bracket by one matmul, in xin's layout; then one pass
    channels_last = is_channels_last(xin)
    y = torch.empty((n, o, h_out, w_out), dtype=sdt, device=xin.device, memory_format=layout(xin))
    if channels_last:
        torch.matmul(rhs.mT, wk.T, out=y.permute(0, 2, 3, 1).view(n, h_out * w_out, o))
    else:
        torch.matmul(wk, rhs, out=y.view(n, o, h_out * w_out))
    y.addcmul_(z, rstd.to(sdt))
    return y.to(out_dtype), z, rhs


def normalised_conv_backward(holder, gy, xin, weight, mu, rstd, rhs, conf, centred: bool, need_gx: bool, tf32: bool):
    """Backward of `normalised_conv`: (g_mu, g_var) per window (N, 1, H', W') float64, and gx, gw, gb through the
    conv alone (gx in xin's dtype; None unless `need_gx`). With H_k = sum_o gy_o W_ok per tap and window,
    G1 = sum_k H_k and Gz = sum_o gy_o z_o:  g_mu = -rstd G1,  g_var = -rstd^2 / 2 (rstd Gz + sum_k H_k rhs_k).

    The conv output z is taken from holder.z, which holds the only reference, so that it is freed before the
    conv backward (the peak of backward); a second backward (retain_graph=True) recomputes it.
    """
    stride, padding, groups = conf
    w_conv = conv_operand(weight, xin.dtype, tf32)
    z, holder.z = holder.z, None
    if z is None:  # a second backward through the same graph (retain_graph=True): recompute
        z = F.conv2d(xin, w_conv, None, stride, padding, 1, groups)
    n, o, h_out, w_out = gy.shape
    sdt = rhs.dtype
    kh, kw = weight.shape[-2:]
    taps = kh * kw if centred else 1
    gy_s = gy.to(sdt)
    gy3 = _as_ncl(gy_s)  # (N, O, L), in gy's layout
    h = torch.matmul(_tap_weights(weight, sdt, centred).T, gy3)  # (N, K, L)
    gz_sum = (gy3 * _as_ncl(z).to(sdt)).sum(dim=1, keepdim=True)  # (N, 1, L): sum_o gy_o z_o
    del z  # the peak of backward is at the conv backward below
    if taps == 1:  # uncentred: H rhs = -G1 mu rstd cancels against rstd Gz, so the product in float64
        g1 = h.to(MAP_DTYPE)
        h_rhs = g1 * rhs[:, :1]
    else:
        g1 = h.sum(dim=1, keepdim=True).to(MAP_DTYPE)
        h_rhs = (h * rhs[:, :taps]).sum(dim=1, keepdim=True).to(MAP_DTYPE)
    r = rstd.view(n, 1, -1)
    g_var = gz_sum.to(MAP_DTYPE).mul_(r).add_(h_rhs).mul_(r * r).mul_(-0.5).view(n, 1, h_out, w_out)
    g_mu = g1.mul_(r).neg_().view(n, 1, h_out, w_out)
    # Over (N, L): the grads of the tap weights (each reaches its tap of every channel) and of the bias.
    red = torch.matmul(gy3, rhs.mT).sum(0)  # (O, K (+1))
    gz = _scaled_operand(gy_s, rstd.to(sdt), xin.dtype, tf32)  # in gy's layout, as the conv backward wants
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gz, xin, w_conv, None, stride, padding, (1, 1), False, (0, 0), groups, (need_gx, True, False)
    )
    del gz
    gw = strided_like(gw.to(weight.dtype), weight)
    gw.add_(red[:, :taps].to(gw.dtype).view(o, 1, kh if taps > 1 else 1, kw if taps > 1 else 1))
    gb = red[:, taps].to(weight.dtype) if red.shape[1] == taps + 1 else None
    return g_mu, g_var, gx, gw, gb


def _scaled_operand(gy: Tensor, rstd: Tensor, dtype: torch.dtype, tf32: bool) -> Tensor:
    """gy * rstd as the conv backward's operand in `dtype`: one pass, no fp32 temporary for a low-precision one."""
    if gy.dtype == dtype:
        return conv_operand(gy * rstd, dtype, tf32)
    out = torch.empty_like(gy, dtype=dtype)
    return torch.mul(gy, rstd, out=out)


class ConvState(NamedTuple):
    """What KNConv2d's backward needs besides x's shape and the weight (all from `kn_conv_forward`)."""

    xin: Tensor  # the convolution's operand: x (uncentred) or x - m, in the conv dtype
    xv: Tensor  # the input of the statistics' gradient: x (uncentred) or x - m (= xin)
    mu: Tensor  # (N, 1, H', W') float64
    rstd: Tensor  # (N, 1, H', W') float64
    rhs: Tensor  # (N, K (+1), L') statistics dtype (`normalised_conv`)
    m4: Tensor | None  # (N, 1, H, W) float64 per-pixel mean x was centred on, or None
    sparse: tuple | None  # (pixel index, value) of each dropped element for sparse drops


def kn_conv_forward(x, weight, bias, stride, padding, groups, eps, dropped, scale, conv_dtype, centre, tf32):
    """KNConv2d forward (class docstring of KNConv2dFunction): (y, z, ConvState). y is in `conv_dtype`."""
    n, c, h, w = x.shape
    kernel = tuple(weight.shape[-2:])
    maps, m, xc, sparse = pixel_maps(x.to(stats_dtype(x)), dropped, centre)
    mu, rstd = window_moments(maps, x.shape, kernel, stride, padding, scale, eps)
    xin = conv_operand(xc if centre else x, conv_dtype, tf32)
    m4 = m.view(n, 1, h, w).to(MAP_DTYPE) if centre else None
    y, z, rhs = normalised_conv(xin, weight, bias, (stride, padding, groups), mu, rstd, m4, tf32, conv_dtype)
    return y, z, ConvState(xin, xin if centre else x, mu, rstd, rhs, m4, sparse)


def kn_conv_backward(holder, gy, x_dtype, weight, dropped, state: ConvState, conf, scale, need_gx, tf32):
    """KNConv2d backward: (gx in `x_dtype` and x's layout or None, gw, gb); holder.z is the conv output."""
    stride, padding, groups = conf
    xin, xv, mu, rstd, rhs, m4, sparse = state
    g_mu, g_var, gx, gw, gb = normalised_conv_backward(
        holder, gy, xin, weight, mu, rstd, rhs, conf, m4 is not None, need_gx, tf32
    )
    if not need_gx:  # e.g. a stem conv on the input images
        return None, gw, gb
    n, c, h, w = xv.shape
    kh, kw = weight.shape[-2:]
    sdt = rhs.dtype
    # per window, float64: [g_mu - 2 g_var mu, g_var]
    g = torch.cat([g_mu.addcmul_(g_var, mu, value=-2.0), g_var], dim=1)
    # [A, B] per pixel (class docstring), times 1 / C: one transposed pooling, one cast
    ab = pool_backward(g, (h, w), (kh, kw), stride, padding)  # (N, 2, H, W)
    ab[:, 1:] *= 2.0 * scale
    ab.mul_(scale / c)
    if m4 is not None:  # B x + A = B (x - m) + (A + B m)
        ab[:, :1].addcmul_(ab[:, 1:], m4)
    ab = ab.to(sdt)
    a, b = ab[:, :1], ab[:, 1:]
    gx = gx.to(sdt).contiguous(memory_format=layout(xv))
    if dropped is None or dropped.dtype != torch.bool:
        # in place, then dropped elements (flat indices, in x's memory order: gx in x's layout) lose
        # again what they were given: b x_d + a at their pixel, one gather of (a, b) per element
        gx.addcmul_(b, xv).add_(a)
        if dropped is not None:
            pix, xd = sparse
            rows = ab.view(n, 2, -1).mT.neg().reshape(-1, 2).index_select(0, pix)  # (D, 2): -a, -b
            memory_flat(gx).scatter_add_(0, dropped, torch.addcmul(rows[:, 0], rows[:, 1], xd).to(gx.dtype))
    else:
        gx.add_(torch.addcmul(a, b, xv.to(sdt)).masked_fill_(dropped, 0.0))
    return gx.to(x_dtype), gw, gb


class KNConv2dFunction(torch.autograd.Function):
    """y = (conv(x, W, s) - mu * sum(W)) * rstd + b with a hand-written backward.

    Statistics of D = scale * e per window w (n = C * kh * kw elements): mu = scale * mean(e),
    var = scale^2 * (mean(e^2) - mean(e)^2), both pooled from the per-pixel maps of `pixel_maps`.
    Backward, with g_mu and g_var per window from `normalised_conv_backward`:
        dL/dx_u = keep_u * scale / n * sum_{w containing u} [g_mu + 2 g_var (scale x_u - mu_w)]
                = keep_u * (B(p) * x_u + A(p))      for u at pixel p,
    with B = 2 scale^2 / n * sum_w g_var and A = scale / n * sum_w [g_mu - 2 g_var mu_w]
    (the sums over windows are the transpose of the average pooling, in float64); centred, B (x_u - m) +
    (A + B m). `conv_dtype` (default x's) is the convolution's dtype, `centre` its centred form and `tf32`
    TF32 emulation (`conv_numerics`); y is in `conv_dtype`, gx in x's dtype.
    Saved: x or x - m, W, the drop (indices or mask), the conv output z and 1-channel maps. z rather than y
    is kept so that in-place ops on y (ReLU(inplace=True)) stay legal; backward frees it before the
    conv backward (a second backward, retain_graph=True, recomputes it).
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, stride, padding, groups, eps, dropped, scale, conv_dtype=None, centre=False, tf32=False
    ):
        conv_dtype = x.dtype if conv_dtype is None else conv_dtype
        y, z, state = kn_conv_forward(
            x, weight, bias, stride, padding, groups, eps, dropped, scale, conv_dtype, centre, tf32
        )
        ctx.conf = (stride, padding, groups)
        ctx.scale, ctx.tf32, ctx.x_dtype, ctx.sparse = scale, tf32, x.dtype, state.sparse
        ctx.save_for_backward(state.xin, state.xv, weight, dropped, state.mu, state.rstd, state.rhs, state.m4)
        ctx.z = z  # an intermediate: kept on ctx so that backward can free it early
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        xin, xv, weight, dropped, mu, rstd, rhs, m4 = ctx.saved_tensors
        state = ConvState(xin, xv, mu, rstd, rhs, m4, ctx.sparse)  # ctx.sparse kept for a second backward
        gx, gw, gb = kn_conv_backward(
            ctx, gy, ctx.x_dtype, weight, dropped, state, ctx.conf, ctx.scale, ctx.needs_input_grad[0], ctx.tf32
        )
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


def holder(z: Tensor) -> SimpleNamespace:
    """An object whose `.z` `normalised_conv_backward` takes (and drops) the conv output from."""
    return SimpleNamespace(z=z)
