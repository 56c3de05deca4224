"""DenseNet family: DenseNet-BC-100 (k = 12, CIFAR) and DenseNet-121 (ImageNet), bn or kn.

Huang et al., "Densely Connected Convolutional Networks", CVPR 2017; the bn models follow
torchvision's `densenet.py` (module names included, so torchvision weights load into densenet121).
With norm="kn" every BN -> ReLU -> Conv becomes ReLU -> KNConv (DESIGN.md §4, after the KN
DenseNet of Nasirigerdeh et al.): the bottleneck 1x1 and the 3x3 "same" conv of each dense layer and
the 1x1 transition conv are KNConvs with bias, the stem conv is a KNConv, and the final BN becomes a
1x1 KernelNorm.

The KernelNorm dropout defaults come from two sources:
- 0.05 in every KNConv: the KNConv default of the KernelNorm paper (Nasirigerdeh et al., "Kernel
  Normalized Convolutional Networks", TMLR 2024; KNConv2d in github.com/reza-nasirigerdeh/norm-torch),
  the value its KNResNets train with;
- 0.5 in the final 1x1 KernelNorm: the authors' KN DenseNet for differentially private training
  (Nasirigerdeh et al., arXiv:2210.00053; `kn_dropout_p=0.5` of densenet20x16_kn in
  github.com/reza-nasirigerdeh/dp-torch, models/densenet_kn.py). That model uses 0.1 in its KNConvs;
  we keep the TMLR paper's 0.05 there.

Keyword arguments (`CNNArgs`; the kn_* ones with norm="kn" only, None means the default):
    kn_kernel_size     kernel of the dense layers' spatial KNConv (default 3, "same" padding)
    kn_dropout_p       dropout on the statistics of every KNConv (default 0.05)
    kn_head_dropout_p  dropout of the final 1x1 KernelNorm (default 0.5)
    kn_eval_dropout    keep KernelNorm's dropout on in eval, as the official code does (default False)
    input_size         the input the geometry is checked at (default: the registered size)
"""

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kn_dist.layers import get_norm_layer
from kn_dist.layers.kn_concat import KNConcatConv2d, PixelStats, merge_stats, pixel_stats
from kn_dist.models._options import KN, CNNArgs, resolve_kn
from kn_dist.models._registry import check_geometry, register_model


class _Ops:
    """How a DenseNet builds its norm-dependent pieces: `block` and `transition`, and `final(c)`, the last norm.

    bn: every unit is norm -> ReLU -> conv (torchvision). kn: every unit is ReLU -> KNConv; the 1x1 KNConvs
    that read a block's concatenated features (bottlenecks, transitions) take its statistics from those of
    the parts (`kn_dist.layers.kn_concat`), which is the same function at O(L) rather than O(L^2) cost.
    """

    def __init__(self, norm: str, kn: KN) -> None:
        self.kn = norm == "kn"
        self.norm = get_norm_layer("bn") if not self.kn else None
        self.kn_layers = kn

    def unit(self, cin: int, cout: int, k: int) -> list[tuple[str, nn.Module]]:
        if not self.kn:
            return [("norm", self.norm(cin)), ("relu", nn.ReLU(inplace=True)), ("conv", _conv(cin, cout, k))]
        lo, hi = (k - 1) // 2, k // 2  # "same" padding; even kernels pad one more on the bottom/right
        if lo == hi:
            conv: nn.Module = self.kn_layers.conv(cin, cout, k, padding=lo)
        else:  # padded zeros count in the statistics either way, so a ZeroPad2d in front is the same
            conv = nn.Sequential(nn.ZeroPad2d((lo, hi, lo, hi)), self.kn_layers.conv(cin, cout, k))
        # in place, as the BN form: the input is always a fresh tensor (a KNConv output, which KNConv's
        # backward does not keep), and the copy costs a pass over the features
        return [("relu", nn.ReLU(inplace=True)), ("conv", conv)]

    def concat_conv(self, cin: int, cout: int) -> KNConcatConv2d:
        kn = self.kn_layers
        return KNConcatConv2d(cin, cout, dropout_p=kn.dropout_p, eval_dropout=kn.eval_dropout)

    def block(self, num_layers: int, cin: int, growth: int, bn_size: int, last: bool) -> nn.Module:
        if self.kn:
            return _KNDenseBlock(num_layers, cin, growth, bn_size, self, last)
        return _DenseBlock(num_layers, cin, growth, bn_size, self)

    def transition(self, cin: int, cout: int) -> nn.Module:
        if self.kn:
            return _KNTransition(cin, cout, self)
        return nn.Sequential(OrderedDict([*self.unit(cin, cout, 1), ("pool", nn.AvgPool2d(2, 2))]))

    def final(self, c: int) -> nn.Module:
        return self.kn_layers.head() if self.kn else self.norm(c)


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)


class _DenseLayer(nn.Module):
    """Bottleneck unit 1x1 (bn_size * growth) then spatial unit (growth); output concatenated."""

    def __init__(self, cin: int, growth: int, bn_size: int, ops: _Ops) -> None:
        super().__init__()
        mid = bn_size * growth
        # torchvision's names: norm1 relu1 conv1 norm2 relu2 conv2 (forward runs them in this order)
        for i, (cout, kk) in enumerate([(mid, 1), (growth, 3)]):
            for name, module in ops.unit(cin if i == 0 else mid, cout, kk):
                self.add_module(f"{name}{i + 1}", module)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        for module in self.children():
            x = module(x)
        return x


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, cin: int, growth: int, bn_size: int, ops: _Ops) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size, ops))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _KNFeatures:
    """A KN dense block's feature maps so far: ReLU'd (what the next 1x1 KNConv reads, concatenated), the
    per-pixel statistics of their concatenation, merged one map at a time, and (`keep_raw`) the raw maps."""

    def __init__(self, keep_raw: bool) -> None:
        self.keep_raw = keep_raw  # only the last block hands its raw features on (to the final norm)
        self.raw: list[Tensor] = []
        self.relu: list[Tensor] = []
        self.stats: PixelStats | None = None

    def append(self, raw: Tensor) -> None:
        x = torch.relu(raw)  # not in place: the last block hands its raw features to the final norm
        if self.keep_raw:
            self.raw.append(raw)
        self.relu.append(x)
        stats = pixel_stats(x)
        self.stats = stats if self.stats is None else merge_stats(self.stats, stats)

    def relu_cat(self) -> Tensor:
        return torch.cat(self.relu, 1)


class _KNDenseLayer(nn.Module):
    """ReLU -> 1x1 KNConv (bn_size * growth) on the block's features, then ReLU -> KNConv (growth)."""

    def __init__(self, cin: int, growth: int, bn_size: int, ops: _Ops) -> None:
        super().__init__()
        mid = bn_size * growth
        self.conv1 = ops.concat_conv(cin, mid)
        for name, module in ops.unit(mid, growth, ops.kn_layers.kernel_size):
            self.add_module(f"{name}2", module)

    def forward(self, features: _KNFeatures) -> Tensor:
        return self.conv2(self.relu2(self.conv1(features.relu_cat(), features.stats)))


class _KNDenseBlock(nn.ModuleDict):
    """Returns its features for the transition after it, or (`last`) their raw concatenation for the final norm."""

    def __init__(self, num_layers: int, cin: int, growth: int, bn_size: int, ops: _Ops, last: bool) -> None:
        super().__init__()
        self.last = last
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _KNDenseLayer(cin + i * growth, growth, bn_size, ops))

    def forward(self, x: Tensor) -> _KNFeatures | Tensor:
        features = _KNFeatures(keep_raw=self.last)
        features.append(x)
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features.raw, 1) if self.last else features


class _KNTransition(nn.Module):
    """ReLU -> 1x1 KNConv -> 2x2 average pooling on a block's features (names as the bn form's Sequential)."""

    def __init__(self, cin: int, cout: int, ops: _Ops) -> None:
        super().__init__()
        self.conv = ops.concat_conv(cin, cout)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, features: _KNFeatures) -> Tensor:
        return self.pool(self.conv(features.relu_cat(), features.stats))


class DenseNet(nn.Module):
    """DenseNet-BC: dense blocks with 1x1 bottlenecks, transitions compressing by `compression`.

    `cifar=True`: one 3x3 stem conv to 2 * growth channels and no stem pooling (Huang et al. §4);
    otherwise torchvision's 7x7/2 conv + 3x3/2 max-pool stem with `init_features` channels.
    """

    def __init__(
        self,
        growth: int,
        block_config: tuple[int, ...],
        init_features: int,
        bn_size: int,
        compression: float,
        num_classes: int,
        cifar: bool,
        ops: _Ops,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        stem_k, stem_s = (3, 1) if cifar else (7, 2)
        if ops.kn:
            layers["conv0"] = ops.kn_layers.conv(3, init_features, stem_k, stem_s, stem_k // 2)
        else:
            layers["conv0"] = nn.Conv2d(3, init_features, stem_k, stem_s, stem_k // 2, bias=False)
            if not cifar:  # torchvision's stem: conv -> BN -> ReLU -> max-pool
                layers["norm0"] = ops.norm(init_features)
                layers["relu0"] = nn.ReLU(inplace=True)
        if not cifar:
            layers["pool0"] = nn.MaxPool2d(3, 2, 1)
        c = init_features
        for i, num_layers in enumerate(block_config):
            last = i == len(block_config) - 1
            layers[f"denseblock{i + 1}"] = ops.block(num_layers, c, growth, bn_size, last)
            c += num_layers * growth
            if not last:
                out = int(c * compression)
                layers[f"transition{i + 1}"] = ops.transition(c, out)
                c = out
        layers["norm5"] = ops.final(c)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(c, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # KNConv2d included
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) -> logits (N, num_classes)."""
        x = torch.relu(self.features(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _densenet(name: str, cifar: bool, arch: dict, norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    kn = resolve_kn(name, norm, args, ("kn",), kernel_size=3, head_dropout_p=0.5)  # sources: module docstring
    build: Callable[[], nn.Module] = lambda: DenseNet(  # noqa: E731
        **arch, num_classes=num_classes, cifar=cifar, ops=_Ops(norm, kn)
    )
    check_geometry(build, args.input_size or (32 if cifar else 224), name)
    return build()


# Tests run DenseNet-121 at 64 px: at 32 px its final BN sees 1x1 maps, whose output at batch 2 is +-1
# whatever the input, which leaves the loss flat to a gradient step.
@register_model(family="densenet", norms=("bn", "kn"), default_norm="bn", input_size=224, test_input_size=64)
def densenet121(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """DenseNet-121 (k = 32, blocks 6-12-24-16), 224 px; torchvision's parameter count with bn."""
    arch = dict(growth=32, block_config=(6, 12, 24, 16), init_features=64, bn_size=4, compression=0.5)
    return _densenet("densenet121", False, arch, norm, num_classes, args)


@register_model(family="densenet", norms=("bn", "kn"), default_norm="bn", input_size=32, test_input_size=16)
def densenet_bc100(norm: str, num_classes: int, args: CNNArgs) -> nn.Module:
    """DenseNet-BC-100 (k = 12, 3 blocks of 16 layers, compression 0.5) for 32 px, ~0.8 M parameters."""
    arch = dict(growth=12, block_config=(16, 16, 16), init_features=24, bn_size=4, compression=0.5)
    return _densenet("densenet_bc100", True, arch, norm, num_classes, args)
