"""KernelNorm layers (Nasirigerdeh et al., "Kernel Normalized Convolutional Networks", TMLR 2024).

Semantics (DESIGN.md §3): a *unit* is one window of all C channels x kh x kw of the zero-padded
input; its mean and biased variance are taken over a dropped-out copy of the unit, and the clean
unit is normalised with them. No affine parameters, no running buffers: batch-independent.

`KNConv2d` uses the exact pooled form of the statistics: per-window mean and variance are
avg-pools of per-pixel channel statistics, so no unfold and no k²-sized tensor is built.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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


def _drop_mask(x: Tensor, dropout_p: float, generator: torch.Generator | None = None) -> Tensor:
    """Bool mask, shape of x, True where an element is dropped, with probability dropout_p (to 2**-31).

    Built from 31 random bits per element (int64 draws viewed as int32 pairs, top bit cleared),
    which is ~6x faster on CPU than `bernoulli_` and exact to 5e-10 in the drop probability.
    Padded elements need no draw: they are zero, so dropping them or not changes nothing.
    """
    bits = torch.empty((x.numel() + 1) // 2, dtype=torch.int64, device=x.device).random_(generator=generator)
    bits = bits.view(torch.int32)[: x.numel()].view(x.shape).bitwise_and_(0x7FFFFFFF)  # uniform on [0, 2**31)
    return bits < round(dropout_p * 2**31)


def dropout_keep_mask(x: Tensor, dropout_p: float, generator: torch.Generator | None = None) -> Tensor:
    """A bool mask with one Bernoulli(1 - dropout_p) draw per element of x (True = kept)."""
    return ~_drop_mask(x, dropout_p, generator)


def _stats_dtype(x: Tensor) -> torch.dtype:
    # fp32 statistics for half/bf16 inputs (DESIGN §3); fp64 stays fp64 (gradcheck).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
    means. The second term is a one-pass variance of a 1-channel map; shifting it by each sample's
    mean keeps it accurate when activations have a large common offset. Padded pixels count with
    mean 0 and variance 0, as in the official unfold code. KernelNorm2d and the token variant use
    this; KNConv2d uses a no-grad twin (`_fast_stats`) inside its custom autograd function.
    """
    kernel, stride_, pad = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(padding, "padding")
    _check_geometry(kernel, stride_, pad, dropout_p)
    _output_size(tuple(x.shape[-2:]), kernel, stride_, pad)
    d = x.to(_stats_dtype(x))
    if keep_mask is None and training and dropout_p > 0:
        keep_mask = dropout_keep_mask(x, dropout_p)
    if keep_mask is not None:
        d = d * keep_mask * (1.0 / (1.0 - dropout_p))
    var_pix, mean_pix = torch.var_mean(d, dim=1, keepdim=True, correction=0)  # (N, 1, H, W) each
    shift = mean_pix.mean(dim=(2, 3), keepdim=True).detach()  # (N, 1, 1, 1); any constant is exact
    lr_tb = (pad[1], pad[1], pad[0], pad[0])
    mean_pad = F.pad(mean_pix, lr_tb)  # padded pixels: mean 0, variance 0
    pix = torch.cat([mean_pad, F.pad(var_pix, lr_tb), (mean_pad - shift).square()], dim=1)  # (N, 3, Hp, Wp)
    win = F.avg_pool2d(pix, kernel, stride_)
    mean = win[:, :1]  # unshifted: an all-zero window has mean exactly 0
    # avg(v) + [avg((m - c)^2) - (avg(m) - c)^2]; the bracket is exactly 0 for 1x1 windows
    var = (win[:, 2:] - (mean - shift).square() + win[:, 1:2]).clamp_min(0.0)
    return mean, var


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


def _pool(t: Tensor, kernel, stride, padding) -> Tensor:
    """Average pooling over zero-padded windows, padded zeros counted (count_include_pad)."""
    if padding[0] <= kernel[0] // 2 and padding[1] <= kernel[1] // 2:  # avg_pool2d's own padding limit
        return F.avg_pool2d(t, kernel, stride, padding)
    return F.avg_pool2d(F.pad(t, (padding[1], padding[1], padding[0], padding[0])), kernel, stride)


def _pool_backward(g: Tensor, size, kernel, stride, padding) -> Tensor:
    """Transpose of `_pool`: per-window grads (N, K, H', W') -> per-pixel grads (N, K, H, W)."""
    n, k = g.shape[:2]
    ph, pw = padding
    if ph <= kernel[0] // 2 and pw <= kernel[1] // 2:
        like = g.new_zeros(()).expand(n, k, *size)  # only its shape is read
        return torch.ops.aten.avg_pool2d_backward(g, like, kernel, stride, padding, False, True, None)
    like = g.new_zeros(()).expand(n, k, size[0] + 2 * ph, size[1] + 2 * pw)
    gp = torch.ops.aten.avg_pool2d_backward(g, like, kernel, stride, (0, 0), False, True, None)
    return gp[..., ph : ph + size[0], pw : pw + size[1]]


@functools.lru_cache(maxsize=64)
def _pad_fraction(size, kernel, stride, padding, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, 1, H', W'): the fraction of each window that lies in the zero padding."""
    return 1.0 - _pool(torch.ones((1, 1, *size), device=device, dtype=dtype), kernel, stride, padding)


def _fast_stats(x: Tensor, kernel, stride, padding, drop: Tensor | None, scale: float):
    """No-grad pooled statistics for the custom function.

    With e = x * keep, batched matmuls give each pixel's channel mean m and its exact (two-pass)
    channel variance v. By the law of total variance a window's variance is avg(v) plus the
    variance of the m's, taken one-pass around a per-sample constant c (the sample mean) as
    avg((m - c)^2) - (avg(m) - c)^2: for 1x1 windows that difference is exactly 0, and c keeps it
    accurate under a large common offset. Padded pixels have m = v = 0, so they add (0 - c)^2 = c^2
    through the padded fraction of each window; all-zero windows (dead ReLUs) get mean exactly 0.
    Returns (mean_e, var_e, c): fp32 (N, 1, H', W') maps and c (N, 1, 1, 1). D(x) = scale * e, so
    its mean is scale * mean_e and its variance scale^2 * var_e.
    """
    n, c, h, w = x.shape
    xs = x.to(_stats_dtype(x))
    shift = xs.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    e = xs.view(n, c, -1).clone()  # (N, C, HW)
    if drop is not None:
        e.masked_fill_(drop.view(n, c, -1), 0.0)
    avg = torch.full((1, c), 1.0 / c, dtype=xs.dtype, device=x.device)
    m = torch.matmul(avg, e)  # (N, 1, HW)
    v = torch.matmul(avg, e.sub_(m).square_())  # (N, 1, HW)
    del e
    pix = torch.cat([m, v, (m - shift.view(n, 1, 1)).square_()], dim=1).view(n, 3, h, w)
    win = _pool(pix, kernel, stride, padding)  # (N, 3, H', W'): avg m, avg v, avg (m - c)^2
    if padding != (0, 0):
        pad_frac = _pad_fraction((h, w), kernel, stride, padding, x.device, xs.dtype)
        win[:, 2:].addcmul_(shift.square(), pad_frac)
    mean_e = win[:, :1]
    mean_s = mean_e - shift
    var_e = torch.addcmul(win[:, 2:], mean_s, mean_s, value=-1.0).add_(win[:, 1:2]).clamp_min_(0.0)
    return mean_e, var_e, shift


class _KNConv2dFunction(torch.autograd.Function):
    """y = (conv(x~, W, s) - mu * sum(W)) * rstd + b with a hand-written backward.

    Saved: x, W, the bool drop mask, the conv output z and a few 1-channel maps. We keep z rather
    than the output y so that in-place ops on y (ReLU(inplace=True)) stay legal, and free it inside
    backward before the conv backward (a second backward, retain_graph=True, recomputes it).
    Autograd through the pooled form would also keep the dropped-out copy and several output-sized
    temporaries. Forward normalises with one mul and one batched K<=2 matmul; backward reads the
    output grad four times and never builds a k²-sized tensor. Few, fused 1-channel ops: on a
    loaded CPU every parallel op pays a scheduling delay, whatever its size.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups, eps, drop, scale):
        kernel = tuple(weight.shape[-2:])
        mean_e, var_e, shift = _fast_stats(x, kernel, stride, padding, drop, scale)
        rstd = var_e.mul_(scale * scale).add_(eps).rsqrt_()  # (N, 1, H', W') of D(x~)
        z = F.conv2d(x, weight, None, stride, padding, 1, groups)  # (N, O, H', W')
        n, o = z.shape[:2]
        sdt = rstd.dtype
        sum_w = weight.sum(dim=(1, 2, 3), dtype=sdt)  # (O,)
        # y = z * rstd + [-sum_w, b] @ [mean * rstd, 1]
        lhs = torch.stack([-sum_w] + ([] if bias is None else [bias.to(sdt)]), dim=1).expand(n, o, -1)  # (N, O, K)
        rhs = torch.ones((n, lhs.shape[-1], rstd[0].numel()), dtype=sdt, device=x.device)  # (N, K, L)
        torch.mul(mean_e.view(n, 1, -1), (rstd * scale).view(n, 1, -1), out=rhs[:, :1])
        y = torch.mul(z, rstd) if z.dtype == sdt else z.to(sdt).mul_(rstd)
        y.view(n, o, -1).baddbmm_(lhs, rhs)
        ctx.conf = (stride, padding, groups, scale)
        ctx.save_for_backward(x, weight, drop, mean_e, rstd, shift, sum_w, rhs)
        ctx.z = z  # an intermediate: kept on ctx so that backward can free it early
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight, drop, mean_e, rstd, shift, sum_w, rhs = ctx.saved_tensors
        stride, padding, groups, scale = ctx.conf
        z, ctx.z = ctx.z, None
        if z is None:  # a second backward through the same graph (retain_graph=True): recompute
            z = F.conv2d(x, weight, None, stride, padding, 1, groups)
        n, o, h_out, w_out = gy.shape
        c, sdt = x.shape[1], rstd.dtype
        gy3 = gy.contiguous().view(n, o, -1).to(sdt)  # (N, O, L)
        # Over output channels: sum_o gy * sum_w and sum_o gy * z.
        gy_sw = torch.matmul(sum_w.view(1, o), gy3).view(n, 1, h_out, w_out)
        gy_z = torch.linalg.vecdot(gy3, z.view(n, o, -1).to(sdt), dim=1).view(n, 1, h_out, w_out)
        del z  # the peak of backward is at the conv backward below
        # y = (z - mu * sum_w) * rstd + b with mu = scale * mean_e, rstd = (scale^2 var_e + eps)^-1/2,
        # var_e = avg(v) + avg((m - c)^2) - (mean_e - c)^2, whose gradient is that of the channel means
        # of e and (e - c)^2 (the per-pixel centring only changes the rounding).
        # g: (N, 2, H', W') = [grad of window mean of (e - c), grad of window 2nd moment], times 1/C, 2/C
        g = torch.empty((n, 2, h_out, w_out), dtype=sdt, device=gy.device)
        mu = mean_e * scale
        g_var = torch.addcmul(gy_z, mu, gy_sw, value=-1.0).mul_(rstd.pow(3) * (-0.5 * scale * scale))
        torch.mul(g_var, 2.0 / c, out=g[:, 1:])
        torch.mul(gy_sw, rstd * (-scale / c), out=g[:, :1]).addcmul_(mean_e - shift, g_var, value=-2.0 / c)
        g_pix = _pool_backward(g, x.shape[2:], tuple(weight.shape[-2:]), stride, padding)  # (N, 2, H, W)
        # per element: grad_x = keep * (g_mean_pix + g_second_pix * (x - c))
        a = torch.addcmul(g_pix[:, :1], shift, g_pix[:, 1:], value=-1.0)
        # Over (N, L): the grads of sum_w (it reaches every weight of its filter) and of the bias.
        red = torch.matmul(gy3, rhs.mT).sum(0)  # (O, K)
        gz = (gy3 * rstd.view(n, 1, -1)).view(gy.shape).to(x.dtype)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            gz, x, weight, None, stride, padding, (1, 1), False, (0, 0), groups, (True, True, False)
        )
        del gz
        gw.sub_(red[:, 0].to(gw.dtype).view(o, 1, 1, 1))
        gb = red[:, 1].to(weight.dtype) if red.shape[1] == 2 else None
        g_stats = torch.addcmul(a, g_pix[:, 1:], x.to(sdt))
        if drop is not None:
            g_stats.masked_fill_(drop, 0.0)
        gx.add_(g_stats)
        return gx, gw, gb, None, None, None, None, None, None


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
    that count in the statistics.
    """
    kernel = tuple(weight.shape[-2:])
    stride_, pad = _pair(stride, "stride"), _pair(padding, "padding")
    _check_geometry(kernel, stride_, pad, dropout_p)
    _output_size(tuple(x.shape[-2:]), kernel, stride_, pad)
    drop = None
    if keep_mask is not None:
        drop = ~keep_mask
    elif training and dropout_p > 0:
        drop = _drop_mask(x, dropout_p)
    scale = 1.0 if drop is None else 1.0 / (1.0 - dropout_p)  # inverted dropout
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Conv in the autocast dtype, statistics and normalisation in fp32 (inside the function).
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _KNConv2dFunction.apply(x.to(dtype), weight.to(dtype), bias, stride_, pad, groups, eps, drop, scale)
    return _KNConv2dFunction.apply(x, weight, bias, stride_, pad, groups, eps, drop, scale)


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
