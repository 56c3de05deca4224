"""`kn-dist bench precision`: KernelNorm layers in bf16 / fp16 / TF32 against fp64 (issue 24, item 1).

The issue's case: KNConv2d 64 -> 64 channels, 3x3, padding 1, a (8, 64, 32, 32) randn input whose 16x16
centre is the constant 1.5 in every channel (a flat region: sky, letterbox, the digits' background), one
fixed random output gradient. For each precision the layer runs in fp32 with
  - bf16:  CPU autocast to bfloat16 (8-bit mantissa; what a GPU's bf16 autocast computes, up to the
           accumulation order of the convolution),
  - fp16:  CPU autocast to float16 (11 bits),
  - tf32:  fp32 with every convolution operand of the layer rounded to TF32 (`conv_numerics(emulate_tf32=
           True)`: 11 bits, fp32 accumulation: cuDNN's default for fp32 convolutions on Ampere and later),
and is compared with the same layer in float64 (itself equal to the official KNConv2d to 1e-15,
tests/layers/test_kernel_norm.py):
  - forward:  max |y - y64| over the windows inside the flat patch (whole output for the other inputs),
              in units of y64's standard deviation;
  - weight_grad / input_grad:  ||g - g64|| / ||g64||.
`centred` is the layer as it runs (conv(x - m) + a per-tap 1-channel term, `kn_dist.layers.conv_numerics`),
`uncentred` the form it used before issue 24 (forced with conv_numerics(centre=False)): conv(x) - mu * sum(W),
whose rounding a flat window amplifies by eps^-1/2. Other inputs: near-constant (5 + 1e-3 randn), a flat
patch at the padded border, a large offset (1000 + randn); a depthwise 7x7 KNConv2d; KNConcatConv2d (1x1 on
merged statistics); the token KernelNorm (ViT) with flat tokens and an offset, under autocast.

Targets (issue 24, centred only): forward <= 0.05 (bf16) / 0.01 (fp16, tf32) x the output's std; weight
gradient <= 2 % (bf16) / 0.5 % (fp16, tf32). `ratio` is the centred error, `target` the bound; input
gradients and the token KernelNorm are reported against the same bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from kn_dist.layers import KernelNormTokens, KNConv2d
from kn_dist.layers.conv_numerics import conv_numerics
from kn_dist.layers.kn_concat import KNConcatConv2d, merge_stats, pixel_stats

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": None}
TARGETS = {"forward": {"bf16": 0.05, "fp16": 0.01, "tf32": 0.01}, "grad": {"bf16": 0.02, "fp16": 0.005, "tf32": 0.005}}
PATCH = (8, 24)  # rows / columns of the flat patch in a 32 x 32 input


def make_input(kind: str, batch: int, channels: int = 64, size: int = 32, seed: int = 1) -> Tensor:
    """The issue's inputs: "flat_patch", "near_constant", "padded_border", "large_offset" (fp32)."""
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    lo, hi = PATCH
    if kind == "flat_patch":
        x[:, :, lo:hi, lo:hi] = 1.5
    elif kind == "near_constant":
        x = 5.0 + 1e-3 * x
    elif kind == "padded_border":  # flat corner and a dead (zero) bottom band: windows over the padding
        x[:, :, : hi - lo, : hi - lo] = 1.5
        x[:, :, -6:, :] = 0.0
    elif kind == "large_offset":
        x = 1000.0 + x
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    return x


def run_layer(fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor, precision: str | None, centre=None):
    """(y, input grad) of fn(x) in float64 (precision None) or fp32 under `precision`, as float64 tensors."""
    xx = (x.double() if precision is None else x.clone()).requires_grad_()
    dtype = PRECISIONS.get(precision)
    amp = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
    with conv_numerics(centre=centre, emulate_tf32=precision == "tf32"), amp:
        y = fn(xx)
    y.backward(grad.to(y.dtype).clone())
    return y.detach().double(), xx.grad.double()


def _errors(module: nn.Module, x: Tensor, precision: str, centre, region) -> dict[str, float]:
    """Forward / weight-grad / input-grad errors of `module` (a conv layer) against its float64 copy."""
    torch.manual_seed(0)
    with torch.no_grad():
        grad = torch.randn_like(module(x))
    figures = {}
    results = {}
    for name, dtype, prec, ctr in (("ref", torch.float64, None, None), ("low", torch.float32, precision, centre)):
        layer = _copy(module).to(dtype)
        y, gx = run_layer(layer, x, grad, prec, ctr)
        results[name] = (y, layer.weight.grad.double(), gx)
    (y64, w64, x64), (y, w, gx) = results["ref"], results["low"]
    figures["forward"] = ((y - y64)[region].abs().max() / y64.std()).item()
    figures["weight_grad"] = ((w - w64).norm() / w64.norm()).item()
    figures["input_grad"] = ((gx - x64).norm() / x64.norm()).item()
    return figures


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


class _Concat(nn.Module):
    """KNConcatConv2d on the concatenation of two halves of x, statistics merged from the halves."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = KNConcatConv2d(channels, channels, dropout_p=0.0)
        self.weight = self.conv.weight

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return self.conv(x, merge_stats(pixel_stats(a), pixel_stats(b)))


def _token_errors(precision: str, batch: int) -> dict[str, float]:
    """Token KernelNorm (2x2 windows on an 8x8 grid, a class token), fp32 input, under `precision`."""
    gen = torch.Generator().manual_seed(3)
    x = 1000.0 + torch.randn(batch, 65, 192, generator=gen)
    x[:, 1:17] = 1.5  # the first two grid rows flat
    grad = torch.randn(x.shape, generator=gen)
    norm = KernelNormTokens(2, dropout_p=0.0)
    y64, g64 = run_layer(norm, x, grad, None)
    y, g = run_layer(norm, x, grad, precision)
    return {"forward": ((y - y64).abs().max() / y64.std()).item(), "input_grad": ((g - g64).norm() / g64.norm()).item()}


def _layer_cases(quick: bool) -> list[tuple[str, nn.Module, str, tuple]]:
    lo, hi = PATCH
    inside = (slice(None), slice(None), slice(lo + 1, hi - 1), slice(lo + 1, hi - 1))  # 3x3 windows in the patch
    everywhere = (slice(None),)
    torch.manual_seed(0)
    cases = [("knconv3x3_c64", KNConv2d(64, 64, 3, padding=1, dropout_p=0.0), "flat_patch", inside)]
    if not quick:
        for kind in ("near_constant", "padded_border", "large_offset"):
            cases.append(("knconv3x3_c64", KNConv2d(64, 64, 3, padding=1, dropout_p=0.0), kind, everywhere))
        dw_inside = (slice(None), slice(None), slice(lo + 3, hi - 3), slice(lo + 3, hi - 3))
        cases.append(
            ("knconv_dw7x7_c64", KNConv2d(64, 64, 7, padding=3, groups=64, dropout_p=0.0), "flat_patch", dw_inside)
        )
        cases.append(
            ("knconcat1x1_c64", _Concat(64), "flat_patch", (slice(None), slice(None), slice(lo, hi), slice(lo, hi)))
        )
    return cases


def _figure(value: float | None) -> float | str | None:
    """3 significant digits; "inf" / "nan" as strings (strict JSON has no infinity: fp16 can overflow)."""
    if value is None:
        return None
    return float(f"{value:.3g}") if math.isfinite(value) else str(value)


def _case(name: str, centred: float, uncentred: float | None, target: float) -> dict:
    return {
        "name": name,
        "centred": _figure(centred),
        "uncentred": _figure(uncentred),
        "ratio": _figure(centred),
        "target": f"<= {target}",
        "met": centred <= target,
    }


def run(quick: bool = False) -> dict:
    """Every layer case x precision: centred and uncentred errors against fp64, with the issue's targets."""
    batch = 2 if quick else 8
    cases = []
    for layer_name, module, kind, region in _layer_cases(quick):
        x = make_input(kind, batch)
        for precision in PRECISIONS:
            after = _errors(module, x, precision, None, region)
            before = _errors(module, x, precision, False, region)
            for quantity in ("forward", "weight_grad", "input_grad"):
                target = TARGETS["forward" if quantity == "forward" else "grad"][precision]
                label = f"{layer_name}/{kind}/{precision}/{quantity}"
                cases.append(_case(label, after[quantity], before[quantity], target))
    for precision in ("bf16", "fp16"):
        figures = _token_errors(precision, batch)
        for quantity, value in figures.items():
            target = TARGETS["forward" if quantity == "forward" else "grad"][precision]
            cases.append(_case(f"kernel_norm_tokens/flat_and_offset/{precision}/{quantity}", value, None, target))
    settings = {"batch": batch, "reference": "float64", "device": "cpu", "tf32": "emulated (operands rounded)"}
    return {"cases": cases, "settings": settings}
