"""How a KernelNorm convolution is evaluated in low precision: centred, and with TF32 emulated on a CPU.

KNConv2d computes y = (conv(x, W) - mu * sum(W)) * rstd + b (DESIGN.md §3). Where a window is flat (a sky,
a letterbox, the digits' background) its variance is ~0, rstd ~ eps^-1/2 ~ 316, and conv(x, W) ~ mu * sum(W):
a convolution rounded to bf16 (8 bits), fp16 (11 bits) or TF32 (cuDNN's default for fp32 convolutions,
11 bits) is cancelled against the exact mu * sum(W), and its rounding error is amplified by rstd. Measured
(issue 24: 64 -> 64 ch, 3x3, a 16x16 patch of 1.5 in a randn input, against fp64): forward error in the
patch 2.05 x the output's std in bf16, weight gradient 66 % off.

The centred evaluation removes the cancellation: with m(p) the per-pixel channel mean that the statistics
already need,
    conv(x, W) - mu * sum(W) = conv_lowp(x - m, W) + sum_k sum_c(W)[k] * (m(p + k) - mu(p)),
where the first term is small wherever the window is flat (x - m = 0 there) and the second is a 1-channel
term with kh * kw taps per window, computed in fp32 from float64 differences. The backward uses the same
split (`kn_conv_function.normalised_conv_backward`). A plain fp32 convolution on a CPU is exact enough
(rounding 2^-24) and keeps the cheaper uncentred form.

`conv_numerics(centre=..., emulate_tf32=...)` overrides the choice for tests and `kn-dist bench precision`:
`emulate_tf32` rounds every convolution operand of the KernelNorm layers to TF32's 10 mantissa bits (fp32
accumulation), which is what cuDNN does on Ampere and later GPUs with TF32 on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
_OVERRIDE: dict[str, bool | None] = {"centre": None, "tf32": False}


@contextmanager
def conv_numerics(centre: bool | None = None, emulate_tf32: bool = False) -> Iterator[None]:
    """Within: `centre` forces the centred (True) or uncentred (False) form (None: chosen per call), and
    `emulate_tf32` rounds fp32 convolution operands of KernelNorm layers to TF32 (for CPU checks)."""
    saved = dict(_OVERRIDE)
    _OVERRIDE.update(centre=centre, tf32=emulate_tf32)
    try:
        yield
    finally:
        _OVERRIDE.update(saved)


def _cuda_conv_uses_tf32() -> bool:
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def uses_centring(x: Tensor, conv_dtype: torch.dtype) -> bool:
    """Whether the convolution of x in `conv_dtype` rounds coarser than fp32, so that it must be centred."""
    forced = _OVERRIDE["centre"]
    if forced is not None:
        return bool(forced)
    if conv_dtype in LOW_PRECISION:
        return True
    if conv_dtype == torch.float32:
        return bool(_OVERRIDE["tf32"]) or (x.device.type == "cuda" and _cuda_conv_uses_tf32())
    return False  # float64


def tf32_round(t: Tensor) -> Tensor:
    """t (float32, any layout) rounded to the nearest TF32 value (10 explicit mantissa bits, ties away from 0)."""
    return ((t.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def conv_operand(t: Tensor, conv_dtype: torch.dtype, tf32: bool) -> Tensor:
    """t as an operand of a KernelNorm convolution in `conv_dtype`, TF32-rounded where `tf32` (emulation)."""
    t = t.to(conv_dtype)
    return tf32_round(t) if tf32 and conv_dtype == torch.float32 else t


def emulating_tf32(conv_dtype: torch.dtype) -> bool:
    """Whether `conv_numerics(emulate_tf32=True)` is in effect for a convolution in `conv_dtype`."""
    return bool(_OVERRIDE["tf32"]) and conv_dtype == torch.float32


__all__ = ["LOW_PRECISION", "conv_numerics", "conv_operand", "emulating_tf32", "tf32_round", "uses_centring"]
