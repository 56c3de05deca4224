"""A 1x1 KNConv2d over a growing concatenation of feature maps, with statistics built from its parts.

DenseNet (Huang et al., CVPR 2017) feeds every layer the concatenation of all earlier feature maps, so
a 1x1 KNConv2d there (the KN DenseNet bottlenecks and transitions, DESIGN.md §4) would take the
per-pixel channel mean and variance of the same, ever longer tensor again in every layer: O(L^2)
passes over the features in a block of L layers, forward and backward. Measured on CPU (batch 32,
DenseNet-BC-100), those statistics were a third of the KN model's step. The statistics of a
concatenation follow from those of its parts (Chan, Golub & LeVeque, "Updating formulae and a
pairwise algorithm for computing sample variances", 1979): with n_i channels, per-pixel means m_i and
sums of squared deviations M2_i,
    n = n_a + n_b,  m = m_a + (m_b - m_a) n_b / n,  M2 = M2_a + M2_b + (m_b - m_a)^2 n_a n_b / n,
exact and free of cancellation (no E[x^2] - m^2). So each feature map's statistics are taken once
(`pixel_stats`), merged in O(1) map operations per layer (`merge_stats`), and autograd sums every
layer's gradient of them before a single pass per feature map distributes it (`_PixelStatsFunction`).

Dropout on the statistics is unchanged: each KNConv still draws its own mask over the whole
concatenated input (the same draw, from the same generator, as `KNConv2d`), and its function corrects
the merged statistics for the dropped elements and, in backward, takes their share back out of the
gradient that the per-map pass gives every element. The result is the same function with the same
gradients as a plain KNConv2d on the concatenation (tests/layers/test_kn_concat.py).
"""

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kn_dist.layers.conv_numerics import conv_operand
from kn_dist.layers.dropout_draws import draw_dropped, is_channels_last, memory_flat
from kn_dist.layers.kernel_norm import KNConv2d, autocast_on, conv_setup, drop_plan
from kn_dist.layers.kn_conv_function import (
    MAP_DTYPE,
    _as_ncl,
    drop_sums,
    holder,
    layout,
    normalised_conv,
    normalised_conv_backward,
    stats_dtype,
    strided_like,
)

_CONF = ((1, 1), (0, 0), 1)  # stride, padding, groups of a 1x1 convolution


class PixelStats(NamedTuple):
    """Per-pixel statistics over the channels of a feature map (or of a concatenation of maps)."""

    count: int  # channels
    mean: Tensor  # (N, 1, H, W) float64
    m2: Tensor  # (N, 1, H, W) float64: sum over the channels of (x - mean)^2

    @property
    def var(self) -> Tensor:
        """Biased variance over the channels, (N, 1, H, W) float64."""
        return self.m2 / self.count


class _PixelStatsFunction(torch.autograd.Function):
    """x (N, C, H, W) -> (mean, M2) per pixel over C, float64; backward: g_mean / C + 2 g_M2 (x - mean)."""

    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        xs = _as_ncl(x.to(stats_dtype(x)))
        # sums rather than matmuls: a feature map is summarised once, and FLOP counters see no matmul here
        mean = xs.sum(dim=1, keepdim=True).div_(c)  # (N, 1, L)
        m2 = F.mse_loss(xs, mean.expand_as(xs), reduction="none").sum(dim=1, keepdim=True)
        ctx.save_for_backward(x, mean)
        return mean.to(MAP_DTYPE).view(n, 1, h, w), m2.to(MAP_DTYPE).view(n, 1, h, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mean, g_m2):
        x, mean = ctx.saved_tensors
        n, c, h, w = x.shape
        sdt = mean.dtype
        a = (g_mean / c).to(sdt)  # (N, 1, H, W)
        b = (2.0 * g_m2).to(sdt)
        # centred on the mean, so that a large common offset cancels in x - mean, not in the sum
        gx = x.to(sdt) - mean.view(n, 1, h, w)
        return torch.addcmul(a, gx, b, out=gx).to(x.dtype)


def pixel_stats(x: Tensor) -> PixelStats:
    """Per-pixel channel statistics of x (N, C, H, W), differentiable."""
    mean, m2 = _PixelStatsFunction.apply(x)
    return PixelStats(x.shape[1], mean, m2)


def merge_stats(a: PixelStats, b: PixelStats) -> PixelStats:
    """The statistics of torch.cat([xa, xb], dim=1) from those of xa and xb (Chan et al., module docstring)."""
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta.square() * (a.count * b.count / n)
    return PixelStats(n, mean, m2)


class ConcatState(NamedTuple):
    """What the backward of a KNConv1x1 on statistics needs (from `concat_forward`)."""

    xin: Tensor  # the convolution's operand: x (uncentred) or x - m, in the conv dtype
    q: Tensor | None  # (N, 1, H, W) float64: what the drop took from each pixel's mean, or None
    mu: Tensor  # (N, 1, H, W) float64
    rstd: Tensor  # (N, 1, H, W) float64
    rhs: Tensor  # `normalised_conv`
    sparse: tuple | None  # (pixel index, value) of each dropped element for sparse drops


def concat_forward(x, m, v, weight, bias, eps, dropped, scale, conv_dtype, centre, tf32):
    """Forward of `_KNConv1x1OnStatsFunction`: (y in `conv_dtype`, conv output z, ConcatState)."""
    n, c, h, w = x.shape
    sdt = stats_dtype(x)
    xs = _as_ncl(x.to(sdt))
    q = s2 = sparse = None
    if dropped is None:
        mean_e, mean_e2 = m, v + m * m
    else:
        if dropped.dtype == torch.bool:  # dense mask (other devices): two masked channel sums
            xd = xs * _as_ncl(dropped)
            q = xd.sum(dim=1, keepdim=True).to(MAP_DTYPE).div_(-c).view(n, 1, h, w)
            s2 = xd.square_().sum(dim=1, keepdim=True).to(MAP_DTYPE).div_(-c).view(n, 1, h, w)
        else:
            q, s2, pix, xd = drop_sums(xs, dropped, is_channels_last(x))
            q, s2 = q.view(n, 1, h, w), s2.view(n, 1, h, w)
            sparse = (pix, xd)
        mean_e, mean_e2 = m + q, v + s2 + m * m
    mu = mean_e * scale
    var = torch.addcmul(mean_e2, mean_e, mean_e, value=-1.0).clamp_min_(0.0)
    rstd = var.mul_(scale * scale).add_(eps).rsqrt_()
    # centred: conv(x - m) + sum(W) (m - mu), see `conv_numerics`
    xin = conv_operand(x.to(sdt) - m.to(sdt) if centre else x, conv_dtype, tf32)
    y, z, rhs = normalised_conv(xin, weight, bias, _CONF, mu, rstd, m if centre else None, tf32, conv_dtype)
    return y, z, ConcatState(xin, q, mu, rstd, rhs, sparse)


def concat_backward(holder, gy, x, m, weight, dropped, state: ConcatState, scale, centred, tf32):
    """Backward of `_KNConv1x1OnStatsFunction`: (gx in x's dtype and layout, g_m, g_v, gw, gb)."""
    xin, q, mu, rstd, rhs, sparse = state
    g_mu, g_var, gx, gw, gb = normalised_conv_backward(
        holder, gy, xin, weight, mu, rstd, rhs, _CONF, centred, True, tf32
    )
    g_m = g_mu.mul_(scale)
    if q is not None:
        g_m.addcmul_(q, g_var, value=-2.0 * scale * scale)
    g_v = g_var.mul_(scale * scale)
    sdt = rhs.dtype
    gx = gx.to(sdt).contiguous(memory_format=layout(x))  # flat drop indices are in x's memory order
    if dropped is not None:
        n, c, h, w = x.shape
        # the share of this layer's statistics that _PixelStatsFunction gives each element, per pixel:
        # a + b * (x - m) with a = g_m / C, b = 2 g_v / C
        a, b = g_m / c, g_v * (2.0 / c)
        if sparse is None:
            xc = xin.to(sdt) if centred else x.to(sdt) - m.to(sdt)
            share = torch.addcmul(a.to(sdt), xc, b.to(sdt))
            gx.sub_(share.masked_fill_(~dropped, 0.0))
        else:
            pix, xd = sparse
            # a + b (x_d - m) = (a - b m) + b x_d: float64, so nothing cancels; one gather of both per element
            rows = torch.cat([(b * m).sub_(a), b.neg()], dim=1).view(n, 2, h * w).mT.reshape(-1, 2)
            ab = rows.index_select(0, pix)  # (D, 2): -(a - b m), -b
            share = torch.empty(xd.shape, dtype=gx.dtype, device=gx.device)
            torch.addcmul(ab[:, 0], ab[:, 1], xd, out=share)  # float64 arithmetic, one rounding
            memory_flat(gx).scatter_add_(0, dropped, share)
    return gx.to(x.dtype), g_m, g_v, gw, gb


class _KNConv1x1OnStatsFunction(torch.autograd.Function):
    """A 1x1, stride-1 KNConv2d whose input's per-pixel (mean m, variance v) come in as differentiable inputs.

    With the drop of this layer, e = x * keep and scale = 1 / (1 - p): mean e = m + q and mean e^2 =
    v + s2 + m^2 per pixel (q, s2 from the dropped elements, `drop_sums`); mu = scale * mean e and
    var = scale^2 (mean e^2 - (mean e)^2). Backward returns, besides the conv's gradients,
        g_m = scale g_mu - 2 scale^2 q g_var,   g_v = scale^2 g_var,
    which reach every element u as (g_m + 2 g_v (x_u - m)) / C through `_PixelStatsFunction`; a
    dropped element has no part in this layer's statistics, so exactly that share is subtracted from it
    here (written in the same centred form, so that the two cancel to rounding). `conv_dtype`, `centre`
    and `tf32` as in KNConv2dFunction: centred, the convolution is conv(x - m) + sum(W) (m - mu).
    """

    @staticmethod
    def forward(ctx, x, m, v, weight, bias, eps, dropped, scale, conv_dtype, centre, tf32):
        y, z, state = concat_forward(x, m, v, weight, bias, eps, dropped, scale, conv_dtype, centre, tf32)
        ctx.conf = (scale, centre, tf32)
        ctx.sparse = state.sparse
        ctx.save_for_backward(x, m, state.xin, state.q, weight, dropped, state.mu, state.rstd, state.rhs)
        ctx.z = z  # freed early in backward, as in KNConv2dFunction
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, m, xin, q, weight, dropped, mu, rstd, rhs = ctx.saved_tensors
        scale, centre, tf32 = ctx.conf
        state = ConcatState(xin, q, mu, rstd, rhs, ctx.sparse)
        gx, g_m, g_v, gw, gb = concat_backward(ctx, gy, x, m, weight, dropped, state, scale, centre, tf32)
        return gx, g_m, g_v, gw, gb, None, None, None, None, None, None


class KNConcatConv2d(KNConv2d):
    """A 1x1 KNConv2d whose input is a concatenation with known per-pixel statistics (module docstring).

    `forward(x, stats)`: x (N, C, H, W) is the concatenation and `stats` its `PixelStats` (from
    `pixel_stats` / `merge_stats` of the parts, which carry the gradient to them); without `stats` it is
    a plain KNConv2d. Same parameters, state-dict keys and dropout draw as KNConv2d.
    """

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__(in_channels, out_channels, 1, **kwargs)

    def forward(self, x: Tensor, stats: PixelStats | None = None, keep_mask: Tensor | None = None) -> Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H, W)."""
        if stats is None:
            return super().forward(x, keep_mask)
        if stats.count != x.shape[1]:
            raise ValueError(f"stats cover {stats.count} channels but the input has {x.shape[1]}")
        drop, draw_p, scale = drop_plan(keep_mask, self.dropout_p, self.training or self.eval_dropout)
        x, conv_dtype, centre, tf32 = conv_setup(x)
        args = (self.weight, self.bias, self.eps)
        if torch.compiler.is_compiling():  # one custom op, as KNConv2d (kn_ops); a dense draw traced before it
            if draw_p > 0:
                drop = draw_dropped(x, draw_p)
            return _concat_op(x, stats.mean, stats.var, *args, drop, scale, conv_dtype, centre, tf32)
        with torch.autocast(x.device.type, enabled=False) if autocast_on(x) else nullcontext():
            if draw_p > 0:
                drop = draw_dropped(x, draw_p)  # the draw KNConv2d makes: flat indices on CPU, else a mask
            return _KNConv1x1OnStatsFunction.apply(
                x, stats.mean, stats.var, *args, drop, scale, conv_dtype, centre, tf32
            )


# ------------------------------------------------------------------------ the same as custom ops (kn_ops)


@torch.library.custom_op("kn_dist::kn_conv1x1_on_stats", mutates_args=())
def _concat_fwd(
    x: Tensor,
    m: Tensor,
    v: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
    dropped: Tensor | None,
    scale: float,
    conv_dtype: torch.dtype,
    centre: bool,
    tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, z, xin or empty when it is x, q or empty, mu, rstd, rhs): `concat_forward` with a dense drop mask."""
    with torch.autocast(x.device.type, enabled=False):
        y, z, st = concat_forward(x, m, v, weight, bias, eps, dropped, scale, conv_dtype, centre, tf32)
    xin = x.new_empty(0) if st.xin is x else strided_like(st.xin, x)
    q = m.new_empty(0) if st.q is None else st.q
    return y, strided_like(z, y), xin, q, st.mu, st.rstd, st.rhs  # the fake's strides (see kn_ops)


@_concat_fwd.register_fake
def _(x, m, v, weight, bias, eps, dropped, scale, conv_dtype, centre, tf32):
    n, _, h, w = x.shape
    y = torch.empty((n, weight.shape[0], h, w), dtype=conv_dtype, device=x.device, memory_format=layout(x))
    xin_is_x = not centre and not tf32 and conv_dtype == x.dtype
    xin = x.new_empty(0) if xin_is_x else torch.empty_like(x, dtype=conv_dtype)
    q = m.new_empty(0) if dropped is None else torch.empty_like(m)
    sdt = torch.float64 if conv_dtype == torch.float64 else torch.float32
    rhs = x.new_empty((n, 1 + (bias is not None), h * w), dtype=sdt)
    return y, torch.empty_like(y), xin, q, torch.empty_like(m), torch.empty_like(m), rhs


@torch.library.custom_op("kn_dist::kn_conv1x1_on_stats_backward", mutates_args=())
def _concat_bwd(
    gy: Tensor,
    x: Tensor,
    m: Tensor,
    xin: Tensor,
    q: Tensor,
    weight: Tensor,
    dropped: Tensor | None,
    z: Tensor,
    mu: Tensor,
    rstd: Tensor,
    rhs: Tensor,
    scale: float,
    has_bias: bool,
    centre: bool,
    tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(gx, g_m, g_v, gw, gb or empty): `concat_backward`."""
    state = ConcatState(x if xin.numel() == 0 else xin, q if q.numel() else None, mu, rstd, rhs, None)
    with torch.autocast(x.device.type, enabled=False):
        gx, g_m, g_v, gw, gb = concat_backward(holder(z), gy, x, m, weight, dropped, state, scale, centre, tf32)
    return strided_like(gx, x), g_m, g_v, gw, weight.new_empty(0) if gb is None else gb.contiguous()


@_concat_bwd.register_fake
def _(gy, x, m, xin, q, weight, dropped, z, mu, rstd, rhs, scale, has_bias, centre, tf32):
    gb = weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty(0)
    gx = torch.empty_like(x)
    return gx, torch.empty_like(m), torch.empty_like(m), torch.empty_like(weight), gb


def _concat_setup(ctx, inputs, output) -> None:
    x, m, v, weight, bias, eps, dropped, scale, conv_dtype, centre, tf32 = inputs
    _, z, xin, q, mu, rstd, rhs = output
    ctx.conf = (scale, bias is not None, centre, tf32)
    ctx.save_for_backward(x, m, xin, q, weight, dropped, z, mu, rstd, rhs)


def _concat_grad(ctx, gy, *_unused):
    x, m, xin, q, weight, dropped, z, mu, rstd, rhs = ctx.saved_tensors
    scale, has_bias, centre, tf32 = ctx.conf
    gx, g_m, g_v, gw, gb = _concat_bwd(
        gy, x, m, xin, q, weight, dropped, z, mu, rstd, rhs, scale, has_bias, centre, tf32
    )
    return gx, g_m, g_v, gw, (gb if has_bias else None), *([None] * 6)


_concat_fwd.register_autograd(_concat_grad, setup_context=_concat_setup)


def _concat_op(x, m, v, weight, bias, eps, dropped, scale, conv_dtype, centre, tf32) -> Tensor:
    """_KNConv1x1OnStatsFunction as one custom op (a dense drop mask or None): y."""
    return _concat_fwd(x, m, v, weight, bias, eps, dropped, scale, conv_dtype, centre, tf32)[0]


__all__ = ["KNConcatConv2d", "PixelStats", "merge_stats", "pixel_stats"]
