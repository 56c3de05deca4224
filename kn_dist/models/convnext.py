"""ConvNeXt family: ConvNeXt-T (ImageNet) and a CIFAR-size ConvNeXt, with ln, kn_down or kn.

Liu et al., "A ConvNet for the 2020s", CVPR 2022, in torchvision's layout (module names included;
`convnext_tiny` with ln has torchvision's 28,589,128 parameters). Norm variants:
- "ln": the published model (per-position LayerNorm, eps 1e-6, in stem, blocks, downsamplers, head).
- "kn_down": the authors' KN-ConvNeXt (Nasirigerdeh et al., TMLR 2024; official code
  models/knconvnext/knconvnext.py): only the three downsamplers change, LN -> conv 2x2/2 becoming
  ReLU -> KNConv 2x2/2 (dropout 0.1). Stem, blocks and head keep their LayerNorms.
- "kn": KernelNorm everywhere: the stem is a KNConv patchify (k = s), downsamplers as kn_down, each
  block's LayerNorm is fused into its 7x7 depthwise conv as a KNConv (groups = C; the statistics
  cover all channels of the window), and the head LayerNorm becomes a 1x1 KernelNorm.

Keyword arguments (`CNNArgs`; None means the default):
    kn_kernel_size     downsampler KNConv kernel, stride 2, padding (k-1)//2 (default 2; kn_down, kn)
    kn_dropout_p       dropout on the statistics of every KNConv (default 0.1, the authors'; kn_down, kn)
    kn_head_dropout_p  dropout of the head's 1x1 KernelNorm (default 0.1; kn only)
    kn_eval_dropout    keep KernelNorm's dropout on in eval, as the official code does (default False)
    input_size         the input the geometry is checked at (default: the registered size)
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kn_dist.layers import LayerNorm2d
from kn_dist.models._options import KN, CNNArgs, resolve_kn
from kn_dist.models._registry import check_geometry, register_model

Factory = Callable[..., nn.Module]


class Permute(nn.Module):
    """Permute the dimensions (torchvision.ops.misc.Permute; kept as a module for the state-dict layout)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class ChannelsLast(nn.Module):
    """Store the (N, C, H, W) stream channels_last: the layout the published model's LayerNorm2d stem
    leaves it in, in which each block's permute to (N, H, W, C) is free and its Linears and GELU run
    on contiguous memory (CIFAR KN ConvNeXt, CPU training step: 213 ms with it, 247 ms without)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth, "row" mode (Huang et al. 2016): drop the whole residual branch per sample."""
    if not training or p == 0.0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class CNBlock(nn.Module):
    """dwconv 7x7 -> (N,H,W,C) -> norm -> Linear 4C -> GELU -> Linear C -> (N,C,H,W), layer-scaled, + x."""

    def __init__(self, dim: int, layer_scale: float, sd_prob: float, dwconv: Factory, norm: Factory) -> None:
        super().__init__()
        self.block = nn.Sequential(
            dwconv(dim),
            Permute([0, 2, 3, 1]),
            norm(dim),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.sd_prob = sd_prob

    def forward(self, x: Tensor) -> Tensor:
        return x + drop_path(self.layer_scale * self.block(x), self.sd_prob, self.training)


@dataclass(frozen=True)
class _Parts:
    """The norm-dependent constructors, chosen once by the entrypoint (STYLE.md habit 1)."""

    stem: Factory  # (cin, cout, patch) -> module
    down: Factory  # (cin, cout) -> module halving H and W
    dwconv: Factory  # (dim) -> 7x7 depthwise conv
    block_norm: Factory  # (dim) -> norm on (N, H, W, C)
    head_norm: Factory  # (dim) -> norm on (N, C, 1, 1)


def _parts(norm: str, kn: KN) -> _Parts:
    k = kn.kernel_size
    ln_stem = lambda cin, cout, s: nn.Sequential(nn.Conv2d(cin, cout, s, s), LayerNorm2d(cout))  # noqa: E731
    kn_down = lambda cin, cout: nn.Sequential(nn.ReLU(), kn.conv(cin, cout, k, stride=2, padding=(k - 1) // 2))  # noqa: E731
    dw = lambda dim: nn.Conv2d(dim, dim, 7, padding=3, groups=dim)  # noqa: E731
    block_ln = lambda dim: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731
    if norm == "ln":
        ln_down = lambda cin, cout: nn.Sequential(LayerNorm2d(cin), nn.Conv2d(cin, cout, 2, 2))  # noqa: E731
        return _Parts(ln_stem, ln_down, dw, block_ln, LayerNorm2d)
    if norm == "kn_down":
        return _Parts(ln_stem, kn_down, dw, block_ln, LayerNorm2d)
    return _Parts(
        stem=lambda cin, cout, s: nn.Sequential(kn.conv(cin, cout, s, s), ChannelsLast()),
        down=kn_down,
        dwconv=lambda dim: kn.conv(dim, dim, 7, padding=3, groups=dim),
        block_norm=lambda dim: nn.Identity(),  # fused into the depthwise KNConv
        head_norm=lambda dim: kn.head(),
    )


class ConvNeXt(nn.Module):
    """Stem (patchify) -> 4 stages of CNBlocks with downsamplers between -> GAP -> norm -> Linear."""

    def __init__(
        self,
        dims: tuple[int, ...],
        depths: tuple[int, ...],
        stem_patch: int,
        num_classes: int,
        parts: _Parts,
        stochastic_depth_prob: float,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [parts.stem(3, dims[0], stem_patch)]
        total, done = sum(depths), 0
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            blocks = []
            for _ in range(depth):
                # linearly increasing drop rate over all blocks, as torchvision
                sd = stochastic_depth_prob * done / (total - 1.0)
                blocks.append(CNBlock(dim, layer_scale, sd, parts.dwconv, parts.block_norm))
                done += 1
            layers.append(nn.Sequential(*blocks))
            if i < len(dims) - 1:
                layers.append(parts.down(dim, dims[i + 1]))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(parts.head_norm(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):  # KNConv2d included
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) -> logits (N, num_classes)."""
        return self.classifier(self.avgpool(self.features(x)))


_NORMS = ("ln", "kn_down", "kn")


def _convnext(name: str, arch: dict, default_size: int, norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    # the authors' KN-ConvNeXt downsamplers: 2x2/2 KNConv with dropout 0.1 (knconvnext.py); k >= 2 keeps stride 2
    kn = resolve_kn(
        name, norm, args, ("kn_down", "kn"), min_kernel_size=2, dropout_p=0.1, head_dropout_p=0.1, head_norms=("kn",)
    )
    parts = _parts(norm, kn)
    build: Callable[[], nn.Module] = lambda: ConvNeXt(**arch, num_classes=num_classes, parts=parts)  # noqa: E731
    check_geometry(build, args.input_size or default_size, name)
    return build()


@register_model(family="convnext", norms=_NORMS, default_norm="ln", input_size=224, test_input_size=32)
def convnext_tiny(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """ConvNeXt-T (dims 96-192-384-768, depths 3-3-9-3, 4x4 stem, stochastic depth 0.1), 224 px."""
    arch = dict(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), stem_patch=4, stochastic_depth_prob=0.1)
    return _convnext("convnext_tiny", arch, 224, norm, num_classes, args)


@register_model(family="convnext", norms=_NORMS, default_norm="ln", input_size=32, test_input_size=16)
def convnext_cifar(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """CIFAR ConvNeXt: ConvNeXt-Pico widths (64-128-256-512, depths 2-2-6-2) with a 2x2 stem, so the
    stages see 16, 8, 4, 2 px at 32 px input; stochastic depth 0.1."""
    arch = dict(dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), stem_patch=2, stochastic_depth_prob=0.1)
    return _convnext("convnext_cifar", arch, 32, norm, num_classes, args)
