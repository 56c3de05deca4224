"""ResNet family: torchvision-style ResNet-18/34/50 with a pluggable norm, and the paper's KNResNets.

Baselines follow He et al. 2016 in torchvision's layout (v1.5: the bottleneck strides in its 3x3
conv), so their parameter counts equal torchvision's. With norm="kn" the same entrypoints build
KNResNet-18/34/50 of Nasirigerdeh et al., "Kernel Normalized Convolutional Networks", TMLR 2024,
laid out as in the official code (github.com/reza-nasirigerdeh/norm-torch,
models/knresnet/knresnet.py): pre-activation ReLU -> KNConv (with bias) blocks whose 2x2 kernels
come in pairs padded 1 then 0 (so the pair keeps the map size), max-pool transitions, identity
shortcuts and a 1x1 KernelNorm -> ReLU -> global-average-pool -> FC head.

Keyword arguments (`CNNArgs`; the kn_* ones with norm="kn" only, None means the official value):
    kn_kernel_size     kernel of the paired KNConvs and transitions (paper: 2; odd k pads k//2 both times)
    kn_dropout_p       dropout on the statistics of every KNConv (paper: 0.05)
    kn_head_dropout_p  dropout of the final 1x1 KernelNorm; by default min(5 * kn_dropout_p, 0.25) as in
                       the official code (0.25 at the paper's 0.05)
    kn_eval_dropout    keep KernelNorm's dropout on in eval, as the official code does (default False)
    input_size         the input the geometry is checked at (default: the registered size)
"""

import functools
from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

from kn_dist.layers import KNConv2d, get_norm_layer
from kn_dist.models._options import KN, CNNArgs, resolve_kn
from kn_dist.models._registry import check_geometry, register_alias, register_model

NormFn = Callable[[int], nn.Module]

# ----------------------------------------------------------------------------------------------
# Baseline ResNet (torchvision layout)


class BasicBlock(nn.Module):
    """3x3 -> norm -> ReLU -> 3x3 -> norm, plus a projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, norm: NormFn) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as torchvision's v1.5) -> 1x1 expanding 4x, each followed by a norm."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, norm: NormFn) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(inplanes, planes * 4, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _shortcut(inplanes: int, outplanes: int, stride: int, norm: NormFn) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), norm(outplanes))


class ResNet(nn.Module):
    """ResNet with module names as torchvision's (torchvision weights load into the bn variant).

    `cifar=True` replaces the 7x7/2 stem and its max-pool by one 3x3/1 conv, the usual 32x32 stem.
    """

    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int, norm: NormFn, cifar: bool
    ) -> None:
        super().__init__()
        if cifar:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(block(inplanes, planes, stride if j == 0 else 1, norm))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) -> logits (N, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


# ----------------------------------------------------------------------------------------------
# KNResNet (the paper's; no norm layers, KernelNorm fused into every conv)


def _kn_conv(cin: int, cout: int, k: int, pad: tuple[int, int, int, int], kn: KN) -> nn.Module:
    """KNConv2d with (left, right, top, bottom) zero padding; asymmetric padding goes in a ZeroPad2d,
    which is the same thing because padded zeros count in KernelNorm's statistics either way."""
    left, right, top, bottom = pad
    if left == right and top == bottom:
        return kn.conv(cin, cout, k, padding=(top, left))
    return nn.Sequential(nn.ZeroPad2d(pad), kn.conv(cin, cout, k))


class KNResidualBlock(nn.Module):
    """Identity + (ReLU -> KNConv) x 2 (basic) or x 3 (bottleneck: k, 3x3, k).

    The k x k pair is padded k//2 then (k-1)//2 on every side, so it keeps the map size: for the
    paper's k = 2 that is padding 1 (H -> H+1) then 0 (H+1 -> H).
    """

    def __init__(self, channels: int, inter: int, k: int, bottleneck: bool, kn: KN) -> None:
        super().__init__()
        first, last = (k // 2,) * 4, ((k - 1) // 2,) * 4
        if bottleneck:
            specs = [(channels, inter, k, first), (inter, inter, 3, (1,) * 4), (inter, channels, k, last)]
        else:
            specs = [(channels, inter, k, first), (inter, channels, k, last)]
        self.body = nn.Sequential(
            *(m for cin, cout, kk, pad in specs for m in (nn.ReLU(), _kn_conv(cin, cout, kk, pad, kn)))
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class KNResNet(nn.Module):
    """KNResNet-18/34/50 from a stage table.

    stages: (blocks, channels, inter-block width) per stage. Between stages a transition
    ReLU -> KNConv(k) -> MaxPool 2x2 changes the width; its k-1 padding rows alternate sides
    (paper, k=2: (1,0), (0,1), (1,0)). Without `bottleneck`, a final MaxPool -> ReLU -> KNConv to
    `final_channels` precedes the head; the ImageNet variant pads its last transition by one more on
    every side so both variants end on a 3x3 map (CIFAR 8->4->2->3, ImageNet 14->8->4->3).
    """

    def __init__(
        self,
        stem_channels: int,
        stages: list[tuple[int, int, int]],
        bottleneck: bool,
        final_channels: int | None,
        num_classes: int,
        cifar: bool,
        kn: KN,
    ) -> None:
        super().__init__()
        k = kn.kernel_size
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if cifar:
            layers["stem"] = kn.conv(3, stem_channels, 3, padding=1)
        else:
            layers["stem"] = kn.conv(3, stem_channels, 7, stride=2, padding=3)
            layers["stem_pool"] = nn.MaxPool2d(3, 2, 1)
        last = len(stages) - 1
        for i, (blocks, channels, inter) in enumerate(stages):
            if i > 0:
                # KNResNet-50's last transition and stage use 1x1 KNConvs (official code: KNConv2d1x1).
                kt = 1 if (bottleneck and i == last) else k
                a, b = kt // 2, (kt - 1) // 2
                lo, hi = (b, a) if i == 2 else (a, b)
                if i == last and final_channels is not None and not cifar:
                    lo, hi = lo + 1, hi + 1
                layers[f"trans{i}"] = nn.Sequential(
                    nn.ReLU(), _kn_conv(stages[i - 1][1], channels, kt, (lo, hi, lo, hi), kn), nn.MaxPool2d(2)
                )
            kb = 1 if (bottleneck and i == last) else k
            layers[f"stage{i + 1}"] = nn.Sequential(
                *(KNResidualBlock(channels, inter, kb, bottleneck, kn) for _ in range(blocks))
            )
        width = stages[-1][1]
        if final_channels is not None:
            pad = k // 2 if cifar else (k - 1) // 2
            layers["final_pool"] = nn.MaxPool2d(2)
            layers["final_relu"] = nn.ReLU()
            layers["final_conv"] = kn.conv(width, final_channels, k, padding=pad)
            width = final_channels
        self.features = nn.Sequential(layers)
        self.head_norm = kn.head()
        self.head_relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

        for m in self.modules():
            if isinstance(m, KNConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) -> logits (N, num_classes)."""
        x = self.head_relu(self.head_norm(self.features(x)))
        return self.fc(self.avgpool(x).flatten(1))


# (blocks, channels, inter) per stage, stem width, bottleneck, final conv width: the official widths.
_KN_SPECS = {
    18: (64, [(2, 64, 256), (2, 256, 256), (1, 512, 512), (1, 724, 724)], False, 512),
    34: (64, [(4, 64, 256), (5, 256, 320), (3, 512, 640), (2, 512, 843)], False, 512),
    50: (256, [(4, 256, 64), (5, 512, 128), (4, 810, 201), (2, 2048, 512)], True, None),
}
_TV_SPECS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3])}


def _resnet(name: str, depth: int, cifar: bool, norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    # official code (knresnet.py): the head KernelNorm's dropout is min(5 * dropout_p, 0.25)
    kn = resolve_kn(name, norm, args, ("kn",), kernel_size=2, head_dropout_p=lambda p: min(5 * p, 0.25))
    if norm == "kn":
        stem, stages, bottleneck, final = _KN_SPECS[depth]

        def build() -> nn.Module:
            return KNResNet(stem, stages, bottleneck, final, num_classes, cifar, kn)
    else:
        block, layers = _TV_SPECS[depth]

        def build() -> nn.Module:
            return ResNet(block, layers, num_classes, get_norm_layer(norm), cifar)

    check_geometry(build, args.input_size or (32 if cifar else 224), name)
    return build()


_NORMS = ("bn", "gn", "ln", "kn")
_register = functools.partial(register_model, family="resnet", norms=_NORMS, default_norm="bn")


# ImageNet-size: tests run them at 96 px (the smallest input KNResNet-18/34's geometry takes) or 64: at
# 32 px ResNet-50's last BatchNorms see 1x1 maps, whose output at batch 2 is +-1 whatever the input, so
# its loss jumps under any small step (seen: 2.38 -> 2.59 at lr 1e-5) and a gradient test means nothing.
@_register(input_size=224, test_input_size=96)
def resnet18(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """ResNet-18 (224 px); norm="kn" is KNResNet-18."""
    return _resnet("resnet18", 18, False, norm, num_classes, args)


@_register(input_size=224, test_input_size=96)
def resnet34(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """ResNet-34 (224 px); norm="kn" is KNResNet-34."""
    return _resnet("resnet34", 34, False, norm, num_classes, args)


@_register(input_size=224, test_input_size=64)
def resnet50(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """ResNet-50 (224 px); norm="kn" is KNResNet-50."""
    return _resnet("resnet50", 50, False, norm, num_classes, args)


@_register(input_size=32, test_input_size=16)
def resnet18_cifar(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """ResNet-18 with the 3x3/1 stem for 32 px; norm="kn" is the paper's CIFAR KNResNet-18."""
    return _resnet("resnet18_cifar", 18, True, norm, num_classes, args)


@_register(input_size=32, test_input_size=16)
def resnet34_cifar(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """ResNet-34 with the 3x3/1 stem for 32 px; norm="kn" is the paper's CIFAR KNResNet-34."""
    return _resnet("resnet34_cifar", 34, True, norm, num_classes, args)


@_register(input_size=32, test_input_size=16)
def resnet50_cifar(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """ResNet-50 with the 3x3/1 stem for 32 px; norm="kn" is the paper's CIFAR KNResNet-50."""
    return _resnet("resnet50_cifar", 50, True, norm, num_classes, args)


# The paper's names: the same models, KernelNorm only.
register_alias("knresnet18", "resnet18", "kn", "KNResNet-18 (224 px), = resnet18(norm='kn').")
register_alias("knresnet34", "resnet34", "kn", "KNResNet-34 (224 px), = resnet34(norm='kn').")
register_alias("knresnet50", "resnet50", "kn", "KNResNet-50 (224 px), = resnet50(norm='kn').")
register_alias("knresnet18_cifar", "resnet18_cifar", "kn", "KNResNet-18 for 32 px, = resnet18_cifar(norm='kn').")
register_alias("knresnet34_cifar", "resnet34_cifar", "kn", "KNResNet-34 for 32 px, = resnet34_cifar(norm='kn').")
register_alias("knresnet50_cifar", "resnet50_cifar", "kn", "KNResNet-50 for 32 px, = resnet50_cifar(norm='kn').")
