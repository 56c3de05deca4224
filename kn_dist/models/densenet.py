"""DenseNet family: DenseNet-BC-100 (k = 12, CIFAR) and DenseNet-121 (ImageNet), bn or kn.

Huang et al., "Densely Connected Convolutional Networks", CVPR 2017; the bn models follow
torchvision's `densenet.py` (module names included, so torchvision weights load into densenet121).
With norm="kn" every BN -> ReLU -> Conv becomes ReLU -> KNConv (DESIGN.md §4, after the KN
DenseNet of Nasirigerdeh et al.): the bottleneck 1x1 and the 3x3 "same" conv of each dense layer and
the 1x1 transition conv are KNConvs with bias, the stem conv is a KNConv, and the final BN becomes a
1x1 KernelNorm (dropout 0.5, as in the authors' KN DenseNet for differential privacy).

KernelNorm arguments (norm="kn" only; None means the default):
    kn_kernel_size     kernel of the dense layers' spatial KNConv (default 3, "same" padding)
    kn_dropout_p       dropout on the statistics of every KNConv (default 0.05, the paper's)
    kn_head_dropout_p  dropout of the final 1x1 KernelNorm (default 0.5)
Every entrypoint also takes `input_size` (default: the registered size) to check the geometry.
"""

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kn_dist.layers import KernelNorm2d, KNConv2d, get_norm_layer
from kn_dist.models._registry import check_geometry, refuse_kn_kwargs, register_model


class _Ops:
    """How a DenseNet builds its norm-dependent pieces: `unit(cin, cout, k)` is one
    norm -> ReLU -> conv (bn) or ReLU -> KNConv (kn) with "same" padding, `final(c)` the last norm."""

    def __init__(self, norm: str, kernel_size: int, dropout_p: float, head_dropout_p: float) -> None:
        self.kn = norm == "kn"
        self.norm = get_norm_layer("bn") if not self.kn else None
        self.kernel_size, self.dropout_p, self.head_dropout_p = kernel_size, dropout_p, head_dropout_p

    def unit(self, cin: int, cout: int, k: int) -> list[tuple[str, nn.Module]]:
        if not self.kn:
            return [("norm", self.norm(cin)), ("relu", nn.ReLU(inplace=True)), ("conv", _conv(cin, cout, k))]
        lo, hi = (k - 1) // 2, k // 2  # "same" padding; even kernels pad one more on the bottom/right
        if lo == hi:
            conv: nn.Module = KNConv2d(cin, cout, k, padding=lo, dropout_p=self.dropout_p)
        else:  # padded zeros count in the statistics either way, so a ZeroPad2d in front is the same
            conv = nn.Sequential(nn.ZeroPad2d((lo, hi, lo, hi)), KNConv2d(cin, cout, k, dropout_p=self.dropout_p))
        return [("relu", nn.ReLU()), ("conv", conv)]

    def final(self, c: int) -> nn.Module:
        return KernelNorm2d(1, dropout_p=self.head_dropout_p) if self.kn else self.norm(c)


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)


class _DenseLayer(nn.Module):
    """Bottleneck unit 1x1 (bn_size * growth) then spatial unit (growth); output concatenated."""

    def __init__(self, cin: int, growth: int, bn_size: int, ops: _Ops) -> None:
        super().__init__()
        mid = bn_size * growth
        k = ops.kernel_size if ops.kn else 3
        # torchvision's names: norm1 relu1 conv1 norm2 relu2 conv2 (forward runs them in this order)
        for i, (cout, kk) in enumerate([(mid, 1), (growth, k)]):
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
            layers["conv0"] = KNConv2d(3, init_features, stem_k, stem_s, stem_k // 2, dropout_p=ops.dropout_p)
        else:
            layers["conv0"] = nn.Conv2d(3, init_features, stem_k, stem_s, stem_k // 2, bias=False)
            if not cifar:  # torchvision's stem: conv -> BN -> ReLU -> max-pool
                layers["norm0"] = ops.norm(init_features)
                layers["relu0"] = nn.ReLU(inplace=True)
        if not cifar:
            layers["pool0"] = nn.MaxPool2d(3, 2, 1)
        c = init_features
        for i, num_layers in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = _DenseBlock(num_layers, c, growth, bn_size, ops)
            c += num_layers * growth
            if i != len(block_config) - 1:
                out = int(c * compression)
                layers[f"transition{i + 1}"] = nn.Sequential(
                    OrderedDict([*ops.unit(c, out, 1), ("pool", nn.AvgPool2d(2, 2))])
                )
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


def _densenet(
    name: str,
    cifar: bool,
    arch: dict,
    norm: str,
    num_classes: int,
    kn_kernel_size: int | None,
    kn_dropout_p: float | None,
    kn_head_dropout_p: float | None,
    input_size: int | None,
) -> nn.Module:
    refuse_kn_kwargs(
        name,
        norm,
        ("kn",),
        kn_kernel_size=kn_kernel_size,
        kn_dropout_p=kn_dropout_p,
        kn_head_dropout_p=kn_head_dropout_p,
    )
    k = 3 if kn_kernel_size is None else kn_kernel_size
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}: kn_kernel_size={k!r} must be a positive int (default 3)")
    p = 0.05 if kn_dropout_p is None else kn_dropout_p
    hp = 0.5 if kn_head_dropout_p is None else kn_head_dropout_p
    build: Callable[[], nn.Module] = lambda: DenseNet(  # noqa: E731
        **arch, num_classes=num_classes, cifar=cifar, ops=_Ops(norm, k, p, hp)
    )
    check_geometry(build, input_size or (32 if cifar else 224), name)
    return build()


@register_model(family="densenet", norms=("bn", "kn"), default_norm="bn", input_size=224, test_input_size=32)
def densenet121(
    norm: str,
    num_classes: int,
    kn_kernel_size: int | None = None,
    kn_dropout_p: float | None = None,
    kn_head_dropout_p: float | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """DenseNet-121 (k = 32, blocks 6-12-24-16), 224 px; torchvision's parameter count with bn."""
    arch = dict(growth=32, block_config=(6, 12, 24, 16), init_features=64, bn_size=4, compression=0.5)
    return _densenet(
        "densenet121", False, arch, norm, num_classes, kn_kernel_size, kn_dropout_p, kn_head_dropout_p, input_size
    )


@register_model(family="densenet", norms=("bn", "kn"), default_norm="bn", input_size=32, test_input_size=16)
def densenet_bc100(
    norm: str,
    num_classes: int,
    kn_kernel_size: int | None = None,
    kn_dropout_p: float | None = None,
    kn_head_dropout_p: float | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """DenseNet-BC-100 (k = 12, 3 blocks of 16 layers, compression 0.5) for 32 px, ~0.8 M parameters."""
    arch = dict(growth=12, block_config=(16, 16, 16), init_features=24, bn_size=4, compression=0.5)
    return _densenet(
        "densenet_bc100", True, arch, norm, num_classes, kn_kernel_size, kn_dropout_p, kn_head_dropout_p, input_size
    )
