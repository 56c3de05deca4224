"""KernelNorm layers (Nasirigerdeh et al., "Kernel Normalized Convolutional Networks", TMLR 2024).

Semantics (DESIGN.md §3): a *unit* is one window of all C channels x kh x kw of the zero-padded
input; its mean and biased variance are taken over a dropped-out copy of the unit, and the clean
unit is normalised with them. No affine parameters, no running buffers: batch-independent.

`KNConv2d` uses the exact pooled form of the statistics: per-window mean and variance are
avg-pools of per-pixel channel statistics, so no unfold and no k²-sized tensor is built.
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kn_dist.layers import kn_ops
from kn_dist.layers.conv_numerics import emulating_tf32, uses_centring
from kn_dist.layers.dropout_draws import draw_dropped, dropout_keep_mask, is_channels_last
from kn_dist.layers.kn_conv_function import MAP_DTYPE, KNConv2dFunction, stats_dtype

_Size2 = int | tuple[int, int]


def _pair(value: _Size2, name: str) -> tuple[int, int]:
    """Turn an int or a 2-sequence into a (h, w) pair of ints, or raise naming the value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name}={value!r} must be an int or a pair of ints")


def _check_geometry(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], dropout_p: float):
    """Validate everything that does not depend on the input size (STYLE.md habit 7)."""
    if min(kernel) < 1:
        raise ValueError(f"kernel_size={kernel} must be >= 1")
    if min(stride) < 1:
        raise ValueError(f"stride={stride} must be >= 1")
    if min(padding) < 0:
        raise ValueError(f"padding={padding} must be >= 0")
    if not (isinstance(dropout_p, int | float) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")


def _output_size(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]):
    """Number of windows along H and W; raises if the kernel does not fit the padded input."""
    out = []
    for n, k, s, p, axis in zip(size, kernel, stride, padding, "HW", strict=True):
        if n + 2 * p < k:
            raise ValueError(f"kernel size {k} is larger than the padded input {axis}={n}+2*{p}={n + 2 * p}")
        out.append((n + 2 * p - k) // s + 1)
    return tuple(out)


def kernel_norm_stats(
    x: Tensor,
    kernel_size: _Size2,
    stride: _Size2 = 1,
    padding: _Size2 = 0,
    dropout_p: float = 0.0,
    training: bool = False,
    keep_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-window mean and biased variance of the dropped-out, zero-padded input (differentiable).

    x: (N, C, H, W). Returns (mean, var), each (N, 1, H', W') in fp32 (fp64 for fp64 inputs).
    Dropout is applied when `training` and `dropout_p > 0` (a fresh mask), or whenever `keep_mask`
    (bool, shape of x, True = kept) is given; kept values are scaled by 1 / (1 - dropout_p).

    Exact pooled form (DESIGN §3): every pixel holds C elements of the unit, so by the law of total
    variance the window variance is avg_pool(per-pixel variance) + the variance of the per-pixel
    means, i.e. avg_pool(v + m^2) - avg_pool(m)^2 with per-pixel mean m and variance v (two-pass, fp32).
    These 1-channel maps are pooled in float64, where m^2 ~ 1e6 for a 1000 + randn input still leaves
    the window variance exact to ~1e-10 (in fp32, with a per-sample shift, a sample mixing a flat patch of
    1.5 with that offset gave the 2x2 KernelNorm2d's output 6.7 % of its std off; issue 24). Padded pixels
    count with mean 0 and variance 0, as in the official unfold code. KernelNorm2d and the token variant use
    this; KNConv2d computes the same statistics inside its autograd function (`kn_conv_function`).
    """
    kernel, stride_, pad = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(padding, "padding")
    _check_geometry(kernel, stride_, pad, dropout_p)
    _output_size(tuple(x.shape[-2:]), kernel, stride_, pad)
    sdt = stats_dtype(x)
    d = x.to(sdt)
    if keep_mask is None and training and dropout_p > 0:
        keep_mask = dropout_keep_mask(x, dropout_p)
    if keep_mask is not None:
        d = d * keep_mask * (1.0 / (1.0 - dropout_p))
    var_pix, mean_pix = torch.var_mean(d, dim=1, keepdim=True, correction=0)  # (N, 1, H, W) each
    m = mean_pix.to(MAP_DTYPE)
    pix = F.pad(torch.cat([m, torch.addcmul(var_pix.to(MAP_DTYPE), m, m)], dim=1), (pad[1], pad[1], pad[0], pad[0]))
    win = F.avg_pool2d(pix, kernel, stride_)  # (N, 2, H', W'): mean of e, mean of e^2; padded pixels count as 0
    mean = win[:, :1]  # an all-zero window has mean exactly 0
    var = torch.addcmul(win[:, 1:], mean, mean, value=-1.0).clamp_min(0.0)
    return mean.to(sdt), var.to(sdt)


class KernelNorm2d(nn.Module):
    """The paper's KernelNorm: normalise each (C, kh, kw) unit and tile the units.

    Output (N, C, kh*H', kw*W') with H' = floor((H + 2p - kh) / sh) + 1: the shape is kept only for
    kernel 1 (stride 1, padding 0) or kernel == stride with H, W divisible by it.
    `eval_dropout=True` keeps dropout on the statistics in eval, as the official code does (it calls
    F.dropout without `training=`); by default eval is deterministic.

    Note: the official KernelNorm2d draws its dropout mask on the unfolded units, so overlapping
    windows get independent masks; we draw one mask per input element (as the official KNConv2d
    does). The two are identical for non-overlapping windows, the configuration the paper uses.
    """

    def __init__(
        self,
        kernel_size: _Size2,
        stride: _Size2 = 1,
        padding: _Size2 = 0,
        dropout_p: float = 0.1,
        eps: float = 1e-5,
        eval_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        _check_geometry(self.kernel_size, self.stride, self.padding, dropout_p)
        self.dropout_p = float(dropout_p)
        self.eps = eps
        self.eval_dropout = eval_dropout

    def forward(self, x: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """x: (N, C, H, W) -> (N, C, kh*H', kw*W'). `keep_mask` (bool, shape of x) replaces the random draw."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h_out, w_out = _output_size(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.padding)
        drop = self.training or self.eval_dropout
        mean, var = kernel_norm_stats(x, self.kernel_size, self.stride, self.padding, self.dropout_p, drop, keep_mask)
        rstd = torch.rsqrt(var + self.eps)
        n, c = x.shape[:2]
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            return ((x - mean) * rstd).to(x.dtype)
        xp = F.pad(x, (pw, pw, ph, ph))
        units = xp.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, H', W', kh, kw), a view
        units = (units - mean[..., None, None]) * rstd[..., None, None]
        # tile: (N, C, H', kh, W', kw) -> (N, C, H'*kh, W'*kw)
        return units.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h_out * kh, w_out * kw).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dropout_p={self.dropout_p}, eps={self.eps}, eval_dropout={self.eval_dropout}"
        )


def kn_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: _Size2 = 1,
    padding: _Size2 = 0,
    groups: int = 1,
    dropout_p: float = 0.05,
    training: bool = False,
    eps: float = 1e-5,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """Functional KNConv2d: KernelNorm(k, s, p) then a conv with kernel k and stride k on the tiles.

    Computed as y = (conv(x~, W, s) - mu * sum(W)) / sqrt(var + eps) + b (DESIGN §3).
    Statistics are over ALL C channels of a window even for groups > 1, while sum(W) is per filter
    over (C_in/groups, kh, kw): this is what the official KNConv2d does (var_mean over the whole
    unfolded (C, kh, kw) unit, `weight.sum(dim=[1, 2, 3])`), and it pads explicitly with zeros
    that count in the statistics. Under autocast the convolution runs in the autocast dtype, centred
    (`conv_numerics`), the statistics and the normalisation in fp32/float64; the output is in the autocast dtype.
    """
    kernel = tuple(weight.shape[-2:])
    stride_, pad = _pair(stride, "stride"), _pair(padding, "padding")
    _check_geometry(kernel, stride_, pad, dropout_p)
    _output_size(tuple(x.shape[-2:]), kernel, stride_, pad)
    drop, draw_p, scale = drop_plan(keep_mask, dropout_p, training)
    x, conv_dtype, centre, tf32 = conv_setup(x)
    if torch.compiler.is_compiling():
        # one opaque op in the graph (no graph break, no recompiles), its backward our own; the draw is traced
        # out of place before it (a dense mask: flat indices would have a data-dependent size)
        if draw_p > 0:
            drop = draw_dropped(x, draw_p)
        return kn_ops.kn_conv2d(x, weight, bias, drop, stride_, pad, groups, eps, scale, conv_dtype, centre, tf32)
    with torch.autocast(x.device.type, enabled=False) if autocast_on(x) else nullcontext():
        if draw_p > 0:
            drop = draw_dropped(x, draw_p)  # flat indices on CPU, a bool mask elsewhere
        return KNConv2dFunction.apply(x, weight, bias, stride_, pad, groups, eps, drop, scale, conv_dtype, centre, tf32)


def drop_plan(keep_mask: Tensor | None, dropout_p: float, active: bool) -> tuple[Tensor | None, float, float]:
    """(the given drop mask or None, the probability of a random draw still to make, the inverted-dropout scale)."""
    drop = None if keep_mask is None else ~keep_mask
    draw_p = dropout_p if keep_mask is None and active else 0.0
    scale = 1.0 if drop is None and draw_p == 0 else 1.0 / (1.0 - dropout_p)
    return drop, draw_p, scale


def autocast_on(x: Tensor) -> bool:
    """Whether autocast is enabled for x's device type."""
    device_type = x.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def conv_setup(x: Tensor) -> tuple[Tensor, torch.dtype, bool, bool]:
    """(x in a layout KNConv functions take, the convolution's dtype, centred evaluation, TF32 emulation).

    A channels_last input is computed in its own layout, so the output is channels_last too, as with
    nn.Conv2d: a network whose stream is channels_last (ConvNeXt's, after its permuted LayerNorms; any
    model under `channels_last: true`) would otherwise switch layouts at every KNConv, and the convs after
    it run on mixed layouts (CIFAR KN-ConvNeXt's depthwise convs on CPU: ~2x slower). Flat drop indices are
    in x's memory order (NCHW, or NHWC for channels_last). Under autocast the convolution runs in the
    autocast dtype (fp64 inputs excepted, as autocast leaves them), x itself is not cast: the statistics
    and the centring (`conv_numerics`) see its full precision.
    """
    if not is_channels_last(x):
        x = x.contiguous()
    conv_dtype = x.dtype
    if x.dtype != torch.float64 and autocast_on(x):
        conv_dtype = torch.get_autocast_dtype(x.device.type)
    return x, conv_dtype, uses_centring(x, conv_dtype), emulating_tf32(conv_dtype)


def _kn_conv2d_autograd(x, weight, bias, stride, padding, groups, eps, keep_mask, scale):
    """The same maths through autograd (the "straightforward pooled" version; kept for tests/bench)."""
    kernel = tuple(weight.shape[-2:])
    p = 1.0 - 1.0 / scale
    mean, var = kernel_norm_stats(x, kernel, stride, padding, p, False, keep_mask)
    rstd = torch.rsqrt(var + eps)
    out = F.conv2d(x, weight, None, stride, padding, 1, groups)
    sum_w = weight.sum(dim=(1, 2, 3)).to(mean.dtype)  # (O,)
    y = (out.to(mean.dtype) - mean * sum_w[None, :, None, None]) * rstd
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y.to(out.dtype)


class KNConv2d(nn.Conv2d):
    """Kernel-normalised convolution, a drop-in `nn.Conv2d` (same weight/bias and state-dict keys).

    Defaults follow the paper: dropout 0.05 on the statistics, eps 1e-5, zero padding counted.
    `eval_dropout=True` reproduces the official code, whose dropout stays on in eval.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size2,
        stride: _Size2 = 1,
        padding: _Size2 = 0,
        groups: int = 1,
        bias: bool = True,
        dropout_p: float = 0.05,
        eps: float = 1e-5,
        eval_dropout: bool = False,
    ) -> None:
        kernel, stride_, pad = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(padding, "padding")
        _check_geometry(kernel, stride_, pad, dropout_p)
        super().__init__(in_channels, out_channels, kernel, stride_, pad, groups=groups, bias=bias)
        self.dropout_p = float(dropout_p)
        self.eps = eps
        self.eval_dropout = eval_dropout

    def forward(self, x: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H', W'). `keep_mask` (bool, shape of x) replaces the random draw."""
        drop = self.training or self.eval_dropout
        return kn_conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.groups, self.dropout_p, drop, self.eps, keep_mask
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}, eps={self.eps}, eval_dropout={self.eval_dropout}"


__all__ = ["KNConv2d", "KernelNorm2d", "dropout_keep_mask", "kernel_norm_stats", "kn_conv2d"]
