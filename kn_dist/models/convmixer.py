"""ConvMixer family: ConvMixer-1536/20 and -768/32 (ImageNet) and ConvMixer-256/8 (CIFAR).

Trockman & Kolter, "Patches Are All You Need?", TMLR 2023 (github.com/locuslab/convmixer): a
p x p / p patch embedding, then `depth` blocks of residual depthwise k x k conv and pointwise 1x1
conv, each followed by the activation (GELU; ReLU in ConvMixer-768/32, as published: locuslab/convmixer
README "ConvMixer-768/32 here uses ReLU instead of GELU", timm's convmixer_768_32 act_layer=nn.ReLU) and
a norm; GAP -> Linear. Norms:
- "bn": the published model (BatchNorm after every activation).
- "ln": GroupNorm(1, C) in the same places (what the KernelNorm paper calls LayerNorm).
- "kn": every conv is a KNConv (DESIGN.md §4): the patch embedding KNConv p x p / p, the depthwise
  k x k KNConv (groups = C, "same" padding; its statistics cover all channels of the window) and
  the pointwise 1x1 KNConv; each followed by the activation only.

Keyword arguments (`ConvMixerArgs`; None means the default):
    kernel_size, patch_size  the architecture's (any norm; default: the published ones)
    kn_dropout_p             dropout on the statistics of every KNConv (norm="kn"; default 0.05, the paper's)
    kn_eval_dropout          keep that dropout on in eval, as the official code does (norm="kn"; default False)
    input_size               the input the geometry is checked at (default: the registered size)
"""

from collections.abc import Callable

from torch import Tensor, nn

from kn_dist.layers import get_norm_layer
from kn_dist.models._options import KN, ConvMixerArgs, resolve_kn
from kn_dist.models._registry import check_geometry, register_model


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(x)


def _same_kn_conv(dim: int, k: int, kn: KN) -> nn.Module:
    """Depthwise KNConv with "same" padding; an even kernel pads one more on the bottom/right, in a
    ZeroPad2d in front (padded zeros count in the statistics either way, so this is the same)."""
    lo, hi = (k - 1) // 2, k // 2
    if lo == hi:
        return kn.conv(dim, dim, k, padding=lo, groups=dim)
    return nn.Sequential(nn.ZeroPad2d((lo, hi, lo, hi)), kn.conv(dim, dim, k, groups=dim))


def convmixer_layers(
    dim: int,
    depth: int,
    kernel_size: int,
    patch_size: int,
    num_classes: int,
    norm: str,
    kn: KN,
    act: Callable[[], nn.Module] = nn.GELU,
) -> nn.Sequential:
    """The ConvMixer as one nn.Sequential (the reference code's layout: indices 0-2 embed, 3.. blocks)."""
    if norm == "kn":
        embed = [kn.conv(3, dim, patch_size, patch_size), act()]

        def block() -> nn.Sequential:
            return nn.Sequential(
                Residual(nn.Sequential(_same_kn_conv(dim, kernel_size, kn), act())), kn.conv(dim, dim, 1), act()
            )
    else:
        norm_layer = get_norm_layer(norm)
        embed = [nn.Conv2d(3, dim, patch_size, patch_size), act(), norm_layer(dim)]

        def block() -> nn.Sequential:
            depthwise = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")
            return nn.Sequential(
                Residual(nn.Sequential(depthwise, act(), norm_layer(dim))),
                nn.Conv2d(dim, dim, 1),
                act(),
                norm_layer(dim),
            )

    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_classes)]
    return nn.Sequential(*embed, *(block() for _ in range(depth)), *head)


def _convmixer(
    name: str,
    arch: tuple[int, int, int, int, int],
    norm: str,
    num_classes: int,
    args: ConvMixerArgs,
    act: Callable[[], nn.Module] = nn.GELU,
) -> nn.Module:
    """arch = (dim, depth, published kernel, published patch, registered input size)."""
    dim, depth, kernel, patch, default_size = arch
    kn = resolve_kn(name, norm, args, ("kn",))
    kernel_size = kernel if args.kernel_size is None else args.kernel_size
    patch_size = patch if args.patch_size is None else args.patch_size
    for arg, value in (("kernel_size", kernel_size), ("patch_size", patch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg}={value!r} must be a positive int")
    # PyTorch's default init, as the reference code
    build: Callable[[], nn.Module] = lambda: convmixer_layers(  # noqa: E731
        dim, depth, kernel_size, patch_size, num_classes, norm, kn, act
    )
    check_geometry(build, args.input_size or default_size, name)
    return build()


_NORMS = ("bn", "ln", "kn")


@register_model(family="convmixer", norms=_NORMS, default_norm="bn", input_size=224, test_input_size=14)
def convmixer_1536_20(norm: str, num_classes: int, args: ConvMixerArgs) -> nn.Module:
    """ConvMixer-1536/20 (kernel 9, patch 7), 224 px, 51.6 M parameters."""
    return _convmixer("convmixer_1536_20", (1536, 20, 9, 7, 224), norm, num_classes, args)


@register_model(family="convmixer", norms=_NORMS, default_norm="bn", input_size=224, test_input_size=14)
def convmixer_768_32(norm: str, num_classes: int, args: ConvMixerArgs) -> nn.Module:
    """ConvMixer-768/32 (kernel 7, patch 7), 224 px, 21.1 M parameters; ReLU, as published."""
    return _convmixer("convmixer_768_32", (768, 32, 7, 7, 224), norm, num_classes, args, act=nn.ReLU)


@register_model(family="convmixer", norms=_NORMS, default_norm="bn", input_size=32, test_input_size=16)
def convmixer_256_8(norm: str, num_classes: int, args: ConvMixerArgs) -> nn.Module:
    """ConvMixer-256/8 for CIFAR (kernel 5, patch 2: the locuslab/convmixer-cifar10 setting), 32 px."""
    return _convmixer("convmixer_256_8", (256, 8, 5, 2, 32), norm, num_classes, args)
