"""Normalisation layers other than KernelNorm, and the norm factory used by every model.

A norm is chosen by name only at the edge (STYLE.md habit 1, after timm's `create_norm.py`):
`get_norm_layer(name, **kw)` returns a constructor `norm(num_channels) -> nn.Module` that models
call without knowing which normalisation they build.
"""

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from kn_dist.layers.kernel_norm import KernelNorm2d


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at every position of an NCHW map, with per-channel affine.

    This is ConvNeXt's "channels_first" LayerNorm (Liu et al. 2022; eps 1e-6 as in their code):
    each (n, :, h, w) vector is normalised on its own.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _kernel_norm(_num_channels: int, **kw) -> nn.Module:
    return KernelNorm2d(**kw)


NORM_NAMES = ("bn", "gn", "ln", "ln2d", "kn", "none")


def get_norm_layer(name: str, **kw) -> Callable[[int], nn.Module]:
    """Return `norm(num_channels) -> nn.Module` for a norm name.

    - "bn": BatchNorm2d(C, **kw).
    - "gn": GroupNorm(num_groups, C) with `num_groups` from kw (default 32).
    - "ln": GroupNorm(1, C), what the KernelNorm paper calls LayerNorm (whole (C, H, W) per sample).
    - "ln2d": LayerNorm2d(C), ConvNeXt's per-position channel LayerNorm.
    - "kn": KernelNorm2d(kernel_size=1, stride=1, padding=0, dropout_p=0.1 unless given in kw); it
      ignores num_channels (no parameters). The default kernel is 1 because that is the only
      geometry that keeps the input shape for any H, W, so it can replace a per-layer norm in place
      (it then normalises each position over its channels, as the final 1x1 KernelNorm of KNResNet).
      Larger kernels tile the output; pass kernel_size/stride/padding explicitly where that is meant.
    - "none": Identity.
    """
    if name == "bn":
        return lambda c: nn.BatchNorm2d(c, **kw)
    if name == "gn":
        num_groups = kw.pop("num_groups", 32)
        return lambda c: nn.GroupNorm(num_groups, c, **kw)
    if name == "ln":
        return lambda c: nn.GroupNorm(1, c, **kw)
    if name == "ln2d":
        return lambda c: LayerNorm2d(c, **kw)
    if name == "kn":
        kn_kw = {"kernel_size": 1, **kw}
        KernelNorm2d(**kn_kw)  # validate now, so a bad kernel/dropout fails where the name is chosen
        return lambda c: _kernel_norm(c, **kn_kw)
    if name == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(NORM_NAMES)}")
