"""The KernelNorm layers as torch.library custom ops: what torch.compile sees of them (issue 24, item 2).

Eagerly, KNConv2d, KNConcatConv2d and the token KernelNorms run their autograd functions. Under
torch.compile those were graph breaks (`torch.compiler.disable`): KNResNet-18 broke its graph 21 times
and dynamo recompiled `KNConv2d.forward` for every new padding / input shape until the recompile limit (8),
after which it ran eagerly. A custom op is one opaque node instead: the model compiles into one graph, the
op's forward and backward run our eager code (`kn_conv_function`, `kn_concat`, `kernel_norm_tokens`), and
inductor never traces into them. Tracing them was also inaccurate: with KNConv2dFunction traced, KNResNet-18's
compiled weight gradients were 1-10 % away from fp64 where eager is within 3e-7.

A custom op returns tensors only, none aliasing an input: what backward needs is returned as extra outputs
(an empty tensor where there is none), and the fake (meta) implementation gives every output the shape,
dtype and strides the real one has. The dropout draw is traced before the op (a dense mask, out of place,
`dropout_draws`), so the op itself is deterministic. Autocast is off inside the ops: the caller has chosen
the convolution's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from kn_dist.layers.kn_conv_function import (
    MAP_DTYPE,
    ConvState,
    holder,
    kn_conv_backward,
    kn_conv_forward,
    layout,
    strided_like,
)

_EMPTY = (0,)


@contextmanager
def _no_autocast(device_type: str):
    with torch.autocast(device_type, enabled=False):
        yield


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY)


# ----------------------------------------------------------------------------------------------- KNConv2d


@torch.library.custom_op("kn_dist::kn_conv2d", mutates_args=())
def _kn_conv2d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    dropped: Tensor | None,
    stride: list[int],
    padding: list[int],
    groups: int,
    eps: float,
    scale: float,
    conv_dtype: torch.dtype,
    centre: bool,
    tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, z, xin or empty when it is x, mu, rstd, rhs, m4 or empty): `kn_conv_forward` with a dense drop mask."""
    with _no_autocast(x.device.type):
        y, z, st = kn_conv_forward(
            x, weight, bias, tuple(stride), tuple(padding), groups, eps, dropped, scale, conv_dtype, centre, tf32
        )
    # outputs with exactly the fake's strides (inductor asserts them): y's own, z like y, xin like x
    xin = _empty(x) if st.xin is x else strided_like(st.xin, x)
    m4 = _empty(st.mu) if st.m4 is None else st.m4
    return y, strided_like(z, y), xin, st.mu, st.rstd, st.rhs, m4


@_kn_conv2d_fwd.register_fake
def _(x, weight, bias, dropped, stride, padding, groups, eps, scale, conv_dtype, centre, tf32):
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    h_out, w_out = _out_size(h, kh, stride[0], padding[0]), _out_size(w, kw, stride[1], padding[1])
    y = torch.empty((n, o, h_out, w_out), dtype=conv_dtype, device=x.device, memory_format=layout(x))
    z = torch.empty_like(y)
    xin_is_x = not centre and not tf32 and conv_dtype == x.dtype
    xin = _empty(x) if xin_is_x else torch.empty_like(x, dtype=conv_dtype)
    mu = x.new_empty((n, 1, h_out, w_out), dtype=MAP_DTYPE)
    taps = kh * kw if centre else 1
    sdt = torch.float64 if conv_dtype == torch.float64 else torch.float32
    rhs = x.new_empty((n, taps + (bias is not None), h_out * w_out), dtype=sdt)
    m4 = x.new_empty((n, 1, h, w), dtype=MAP_DTYPE) if centre else _empty(mu)
    return y, z, xin, mu, torch.empty_like(mu), rhs, m4


@torch.library.custom_op("kn_dist::kn_conv2d_backward", mutates_args=())
def _kn_conv2d_bwd(
    gy: Tensor,
    x: Tensor,
    xin: Tensor,
    weight: Tensor,
    dropped: Tensor | None,
    z: Tensor,
    mu: Tensor,
    rstd: Tensor,
    rhs: Tensor,
    m4: Tensor,
    stride: list[int],
    padding: list[int],
    groups: int,
    scale: float,
    has_bias: bool,
    need_gx: bool,
    tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(gx or empty, gw, gb or empty): `kn_conv_backward`."""
    xin = x if xin.numel() == 0 else xin
    centred = m4.numel() > 0
    state = ConvState(xin, xin if centred else x, mu, rstd, rhs, m4 if centred else None, None)
    conf = (tuple(stride), tuple(padding), groups)
    with _no_autocast(x.device.type):
        gx, gw, gb = kn_conv_backward(holder(z), gy, x.dtype, weight, dropped, state, conf, scale, need_gx, tf32)
    return (_empty(x) if gx is None else strided_like(gx, x)), gw, (_empty(weight) if gb is None else gb.contiguous())


@_kn_conv2d_bwd.register_fake
def _(gy, x, xin, weight, dropped, z, mu, rstd, rhs, m4, stride, padding, groups, scale, has_bias, need_gx, tf32):
    gx = torch.empty_like(x) if need_gx else _empty(x)
    gb = weight.new_empty((weight.shape[0],)) if has_bias else _empty(weight)
    return gx, torch.empty_like(weight), gb


def _kn_conv2d_setup(ctx, inputs, output) -> None:
    x, weight, bias, dropped, stride, padding, groups, eps, scale, conv_dtype, centre, tf32 = inputs
    _, z, xin, mu, rstd, rhs, m4 = output
    ctx.conf = (stride, padding, groups, scale, bias is not None, tf32)
    ctx.save_for_backward(x, xin, weight, dropped, z, mu, rstd, rhs, m4)


def _kn_conv2d_grad(ctx, gy, *_unused):
    x, xin, weight, dropped, z, mu, rstd, rhs, m4 = ctx.saved_tensors
    stride, padding, groups, scale, has_bias, tf32 = ctx.conf
    need_gx = ctx.needs_input_grad[0]
    gx, gw, gb = _kn_conv2d_bwd(
        gy, x, xin, weight, dropped, z, mu, rstd, rhs, m4, stride, padding, groups, scale, has_bias, need_gx, tf32
    )
    return (gx if need_gx else None), gw, (gb if has_bias else None), *([None] * 9)


_kn_conv2d_fwd.register_autograd(_kn_conv2d_grad, setup_context=_kn_conv2d_setup)


def kn_conv2d(x, weight, bias, dropped, stride, padding, groups, eps, scale, conv_dtype, centre, tf32) -> Tensor:
    """KNConv2dFunction as one custom op (a dense drop mask or None): y."""
    return _kn_conv2d_fwd(
        x, weight, bias, dropped, list(stride), list(padding), groups, eps, scale, conv_dtype, centre, tf32
    )[0]
