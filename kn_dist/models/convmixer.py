"""ConvMixer family: ConvMixer-1536/20 and -768/32 (ImageNet) and ConvMixer-256/8 (CIFAR).

Trockman & Kolter, "Patches Are All You Need?", TMLR 2023 (github.com/locuslab/convmixer): a
p x p / p patch embedding, then `depth` blocks of residual depthwise k x k conv and pointwise 1x1
conv, each followed by GELU and a norm; GAP -> Linear. Norms:
- "bn": the published model (BatchNorm after every GELU).
- "ln": GroupNorm(1, C) in the same places (what the KernelNorm paper calls LayerNorm).
- "kn": every conv is a KNConv (DESIGN.md §4): the patch embedding KNConv p x p / p, the depthwise
  k x k KNConv (groups = C, "same" padding; its statistics cover all channels of the window) and
  the pointwise 1x1 KNConv; each followed by GELU only.

Architecture arguments (all norms): kernel_size, patch_size (defaults: the published ones).
KernelNorm arguments (norm="kn" only): kn_dropout_p, dropout on the statistics of every KNConv
(default 0.05, the paper's). `input_size` (default: the registered size) checks the geometry.
"""

from collections.abc import Callable

from torch import Tensor, nn

from kn_dist.layers import KNConv2d, get_norm_layer
from kn_dist.models._registry import check_geometry, refuse_kn_kwargs, register_model


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(x)


def _same_kn_conv(dim: int, k: int, dropout_p: float) -> nn.Module:
    """Depthwise KNConv with "same" padding; an even kernel pads one more on the bottom/right, in a
    ZeroPad2d in front (padded zeros count in the statistics either way, so this is the same)."""
    lo, hi = (k - 1) // 2, k // 2
    if lo == hi:
        return KNConv2d(dim, dim, k, padding=lo, groups=dim, dropout_p=dropout_p)
    return nn.Sequential(nn.ZeroPad2d((lo, hi, lo, hi)), KNConv2d(dim, dim, k, groups=dim, dropout_p=dropout_p))


def convmixer_layers(
    dim: int, depth: int, kernel_size: int, patch_size: int, num_classes: int, norm: str, kn_dropout_p: float
) -> nn.Sequential:
    """The ConvMixer as one nn.Sequential (the reference code's layout: indices 0-2 embed, 3.. blocks)."""
    if norm == "kn":
        embed = [KNConv2d(3, dim, patch_size, patch_size, dropout_p=kn_dropout_p), nn.GELU()]

        def block() -> nn.Sequential:
            return nn.Sequential(
                Residual(nn.Sequential(_same_kn_conv(dim, kernel_size, kn_dropout_p), nn.GELU())),
                KNConv2d(dim, dim, 1, dropout_p=kn_dropout_p),
                nn.GELU(),
            )
    else:
        norm_layer = get_norm_layer(norm)
        embed = [nn.Conv2d(3, dim, patch_size, patch_size), nn.GELU(), norm_layer(dim)]

        def block() -> nn.Sequential:
            return nn.Sequential(
                Residual(
                    nn.Sequential(
                        nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), nn.GELU(), norm_layer(dim)
                    )
                ),
                nn.Conv2d(dim, dim, 1),
                nn.GELU(),
                norm_layer(dim),
            )

    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_classes)]
    return nn.Sequential(*embed, *(block() for _ in range(depth)), *head)


def _convmixer(
    name: str,
    dim: int,
    depth: int,
    default_size: int,
    norm: str,
    num_classes: int,
    kernel_size: int,
    patch_size: int,
    kn_dropout_p: float | None,
    input_size: int | None,
) -> nn.Module:
    refuse_kn_kwargs(name, norm, ("kn",), kn_dropout_p=kn_dropout_p)
    for arg, value in (("kernel_size", kernel_size), ("patch_size", patch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg}={value!r} must be a positive int")
    p = 0.05 if kn_dropout_p is None else kn_dropout_p
    # PyTorch's default init, as the reference code
    build: Callable[[], nn.Module] = lambda: convmixer_layers(  # noqa: E731
        dim, depth, kernel_size, patch_size, num_classes, norm, p
    )
    check_geometry(build, input_size or default_size, name)
    return build()


_NORMS = ("bn", "ln", "kn")


@register_model(family="convmixer", norms=_NORMS, default_norm="bn", input_size=224, test_input_size=14)
def convmixer_1536_20(
    norm: str,
    num_classes: int,
    kernel_size: int = 9,
    patch_size: int = 7,
    kn_dropout_p: float | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """ConvMixer-1536/20 (kernel 9, patch 7), 224 px, 51.6 M parameters."""
    return _convmixer(
        "convmixer_1536_20", 1536, 20, 224, norm, num_classes, kernel_size, patch_size, kn_dropout_p, input_size
    )


@register_model(family="convmixer", norms=_NORMS, default_norm="bn", input_size=224, test_input_size=14)
def convmixer_768_32(
    norm: str,
    num_classes: int,
    kernel_size: int = 7,
    patch_size: int = 7,
    kn_dropout_p: float | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """ConvMixer-768/32 (kernel 7, patch 7), 224 px, 21.1 M parameters."""
    return _convmixer(
        "convmixer_768_32", 768, 32, 224, norm, num_classes, kernel_size, patch_size, kn_dropout_p, input_size
    )


@register_model(family="convmixer", norms=_NORMS, default_norm="bn", input_size=32, test_input_size=16)
def convmixer_256_8(
    norm: str,
    num_classes: int,
    kernel_size: int = 5,
    patch_size: int = 2,
    kn_dropout_p: float | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """ConvMixer-256/8 for CIFAR (kernel 5, patch 2: the locuslab/convmixer-cifar10 setting), 32 px."""
    return _convmixer(
        "convmixer_256_8", 256, 8, 32, norm, num_classes, kernel_size, patch_size, kn_dropout_p, input_size
    )
