"""One small model per KernelNorm family variant, for CPU tests of the GPU path (issue 24).

Built through the registry (`create_model`, the same entrypoints and KernelNorm layers as training), at 16 px
with dropout on in every KernelNorm, with the deep families shortened: KNResNet-18 to one block per stage at
1/8 of its widths, DenseNet-BC to blocks of 2 layers, ConvNeXt to one block per stage at 1/4 width,
ConvMixer-256/8 to 64/2, the ViT to 2 blocks, the Conformer to 3 blocks of width 48. What is tested
(the layers, their wiring, the compile / DDP / autocast / layout behaviour) does not depend on depth, and the
full models compile in minutes on this machine's 2 cores, their shortened forms in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from torch import nn

from kn_dist.models import conformer as conformer_module
from kn_dist.models import convmixer, convnext, create_model, densenet, resnet, vit

SIZE = 16
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "resnet/kn": ("resnet18_cifar", "kn", {}),
    "densenet/kn": ("densenet_bc100", "kn", {"input_size": SIZE}),
    "convnext/kn": ("convnext_cifar", "kn", {"input_size": SIZE}),
    "convnext/kn_down": ("convnext_cifar", "kn_down", {"input_size": SIZE}),
    "convmixer/kn": ("convmixer_256_8", "kn", {"input_size": SIZE, "patch_size": 2, "kernel_size": 3}),
    "vit/kn": ("vit_cifar", "kn", {"input_size": SIZE}),
    "vit/kn_embed": ("vit_cifar", "kn_embed", {"input_size": SIZE}),
    "conformer/kn": ("conformer_tiny_cifar", "kn", {"input_size": SIZE, "drop_path_rate": 0.1}),
}


def _shorter(cls, **changes):
    def build(*args, **kwargs):
        return cls(*args, **(kwargs | changes))

    return build


_VIT = vit.VisionTransformer
_CONVMIXER = convmixer.convmixer_layers


def _narrower_convmixer(dim, depth, *args, **kwargs):
    return _CONVMIXER(dim // 4, depth // 4, *args, **kwargs)  # convmixer_layers(dim, depth, ...)


_KNRESNET = resnet.KNResNet


def _narrower_knresnet(stem, stages, bottleneck, final, *args):
    # KNResNet(stem_channels, stages [(blocks, channels, inter)], bottleneck, final_channels, ...): 1/8 width,
    # one block per stage; transitions, their alternating padding and the head as in KNResNet-18
    stages = [(1, channels // 8, inter // 8) for _, channels, inter in stages]
    return _KNRESNET(stem // 8, stages, bottleneck, None if final is None else final // 8, *args)


def _shorter_vit(*args, **kwargs):
    # VisionTransformer(input_size, patch_size, dim, depth, ...): depth is the 4th positional argument
    return _VIT(*args[:3], 2, *args[4:], **kwargs)


@contextmanager
def _shortened() -> Iterator[None]:
    with (
        mock.patch.object(resnet, "KNResNet", _narrower_knresnet),
        mock.patch.object(densenet, "DenseNet", _shorter(densenet.DenseNet, block_config=(2, 2, 2))),
        mock.patch.object(convnext, "ConvNeXt", _shorter(convnext.ConvNeXt, dims=(16, 32, 64, 128), depths=(1,) * 4)),
        mock.patch.object(convmixer, "convmixer_layers", _narrower_convmixer),
        mock.patch.object(vit, "VisionTransformer", _shorter_vit),
        mock.patch.object(
            conformer_module, "Conformer", _shorter(conformer_module.Conformer, embed_dim=48, depth=3, num_heads=2)
        ),
    ):
        yield


def build(label: str, **overrides) -> nn.Module:
    """The small model of FAMILIES[label] (train mode), with `overrides` on its keyword arguments."""
    name, norm, kwargs = FAMILIES[label]
    with _shortened():
        return create_model(name, norm=norm, num_classes=10, **(kwargs | overrides)).train()
