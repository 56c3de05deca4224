"""Vision Transformer (Dosovitskiy et al., ICLR 2021) with LayerNorm or KernelNorm on token grids.

Norms (DESIGN.md §4):
- "ln": the published pre-LN ViT (LayerNorm eps 1e-6 as in torchvision / timm).
- "kn": KernelNorm over k×k windows of patch tokens on their (h, w) grid × all D channels, the class
  token normalised on its own (`KernelNormTokens`); k = 1 is per-token KernelNorm.
- "kn_embed": the seed project's KN-ViT (each token's embedding reshaped to a 2-D grid, KernelNorm
  in 2×2 windows with the L tokens as channels, `KernelNormEmbedGrid`), kept as a comparison point.
  Its code was not found; this follows the project's description.

vit_b_16 with "ln" has exactly torchvision's parameter count (86,567,656 with 1000 classes).
Initialisation follows timm / DeiT (truncated normal 0.02 for linear layers, zero biases) and never
touches norm layers, which may have no `.weight` (KernelNorm).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kn_dist.layers.kernel_norm_tokens import KernelNormEmbedGrid, KernelNormTokens
from kn_dist.models._registry import refuse_kn_kwargs, register_model

NormFactory = Callable[[int], nn.Module]  # dim -> norm module acting on (N, L, dim)


def token_norm_factory(
    norm: str,
    grid_size: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    ln_eps: float = 1e-6,
    kn_kernel_size: int = 2,
    kn_stride: int | None = None,
    kn_dropout_p: float = 0.05,
    kn_eval_dropout: bool = False,
) -> NormFactory:
    """Turn a token-norm name into `dim -> module` (the only place the string is looked at).

    Impossible KernelNorm geometry raises a ValueError here, before any layer is built.
    """
    if norm == "ln":
        return lambda dim: nn.LayerNorm(dim, eps=ln_eps)
    if norm == "kn":
        kw = dict(kernel_size=kn_kernel_size, stride=kn_stride, dropout_p=kn_dropout_p, eval_dropout=kn_eval_dropout)
        KernelNormTokens(num_prefix_tokens=num_prefix_tokens, grid_size=grid_size, **kw)  # validate geometry now
        # the layers read the (square) grid off the sequence, so the model also runs at other input sizes
        return lambda dim: KernelNormTokens(num_prefix_tokens=num_prefix_tokens, **kw)
    if norm == "kn_embed":
        if kn_stride not in (None, kn_kernel_size):
            raise ValueError(f"kn_embed: kn_stride={kn_stride} must equal kn_kernel_size={kn_kernel_size}")
        return lambda dim: KernelNormEmbedGrid(dim, kn_kernel_size, kn_dropout_p, eval_dropout=kn_eval_dropout)
    raise ValueError(f"unknown token norm {norm!r}; valid: ln, kn, kn_embed")


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Multi-head self-attention; qkv + proj with biases (same parameters as nn.MultiheadAttention)."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, length, d = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, L, d_head)
        p = self.attention_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        x = x.transpose(1, 2).reshape(n, length, d)
        return self.drop(self.proj(x))


class Mlp(nn.Sequential):
    """Linear → GELU → Dropout → Linear → Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        norm_layer: NormFactory,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_p: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attention_dropout, dropout)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path_p = drop_path_p

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_p, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_p, self.training)


def init_transformer_weights(m: nn.Module) -> None:
    """timm / DeiT initialisation for linear layers; norms keep their own (KernelNorm has no weight)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT with a class token, learned position embeddings and a linear head on the class token.

    Built for `image_size` (the position-embedding grid); other square sizes divisible by the patch
    resample the position embeddings, so ImageNet-size models can also run small inputs.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        num_classes: int,
        norm_layer: NormFactory,
        in_channels: int = 3,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_dim, norm_layer, dropout, attention_dropout, r) for r in rates]
        )
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, num_classes)

        self.apply(init_transformer_weights)
        fan_in = in_channels * patch_size * patch_size  # torchvision: patch projection like a linear layer
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        n, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"VisionTransformer: input {height}×{width} is not divisible by the patch size {self.patch_size}"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, h·w, D), row-major grid order
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)  # (N, 1 + h·w, D)
        x = self.pos_drop(x + self._pos_embed(height // self.patch_size, width // self.patch_size))
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])

    def _pos_embed(self, h: int, w: int) -> Tensor:
        """Position embeddings for an h×w grid: bicubic resampling of the built-for grid's when they differ.

        This is how ViTs are evaluated / fine-tuned at other resolutions (Dosovitskiy et al. 2021, §3.2).
        """
        if (h, w) == self.grid_size:
            return self.pos_embed
        gh, gw = self.grid_size
        grid = self.pos_embed[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + h·w, D)


def _vit(
    name: str,
    norm: str,
    num_classes: int,
    arch: tuple[int, int, int, int, int, int],
    input_size: int | None,
    kn_kernel_size: int | None,
    kn_stride: int | None,
    kn_dropout_p: float | None,
    kn_eval_dropout: bool | None,
    dropout: float,
    attention_dropout: float,
    drop_path_rate: float,
) -> VisionTransformer:
    """Build a ViT from arch = (default input size, patch, dim, depth, heads, mlp_dim)."""
    kn = dict(
        kn_kernel_size=kn_kernel_size, kn_stride=kn_stride, kn_dropout_p=kn_dropout_p, kn_eval_dropout=kn_eval_dropout
    )
    refuse_kn_kwargs(name, norm, ("kn", "kn_embed"), **kn)
    default_size, patch_size, dim, depth, num_heads, mlp_dim = arch
    input_size = default_size if input_size is None else input_size
    if input_size % patch_size:
        raise ValueError(f"{name}: input_size={input_size} is not divisible by the patch size {patch_size}")
    grid = (input_size // patch_size, input_size // patch_size)
    norm_layer = token_norm_factory(
        norm,
        grid,
        kn_kernel_size=2 if kn_kernel_size is None else kn_kernel_size,
        kn_stride=kn_stride,
        kn_dropout_p=0.05 if kn_dropout_p is None else kn_dropout_p,
        kn_eval_dropout=bool(kn_eval_dropout),
    )
    return VisionTransformer(
        input_size, patch_size, dim, depth, num_heads, mlp_dim, num_classes, norm_layer,
        dropout=dropout, attention_dropout=attention_dropout, drop_path_rate=drop_path_rate,
    )  # fmt: skip


_NORMS = ("ln", "kn", "kn_embed")

# Every entrypoint takes the same options (None: the default in brackets):
#   input_size        square input resolution [registered size]; sets the token grid and position embeddings
#   kn_kernel_size    KernelNorm window, in tokens for "kn", in embedding-grid cells for "kn_embed" [2]
#   kn_stride         must equal kn_kernel_size (non-overlapping windows keep the sequence) [= kernel]
#   kn_dropout_p      dropout on the KernelNorm statistics [0.05, KNConv's paper value]
#   kn_eval_dropout   keep that dropout on in eval, as the official KernelNorm code does [False]
#   dropout, attention_dropout, drop_path_rate   usual ViT regularisers [0]


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=32)
def vit_cifar(
    norm: str,
    num_classes: int,
    input_size: int | None = None,
    kn_kernel_size: int | None = None,
    kn_stride: int | None = None,
    kn_dropout_p: float | None = None,
    kn_eval_dropout: bool | None = None,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """Small-dataset ViT (Lee et al. 2021, arXiv:2112.13492, baseline): patch 4, d 192, depth 9, 12 heads, mlp ×2."""
    arch = (32, 4, 192, 9, 12, 384)
    return _vit(
        "vit_cifar", norm, num_classes, arch, input_size, kn_kernel_size, kn_stride, kn_dropout_p, kn_eval_dropout,
        dropout, attention_dropout, drop_path_rate,
    )  # fmt: skip


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=224, test_input_size=64)
def vit_s_16(
    norm: str,
    num_classes: int,
    input_size: int | None = None,
    kn_kernel_size: int | None = None,
    kn_stride: int | None = None,
    kn_dropout_p: float | None = None,
    kn_eval_dropout: bool | None = None,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """ViT-S/16 (DeiT-S shape): d 384, depth 12, 6 heads, mlp 1536."""
    arch = (224, 16, 384, 12, 6, 1536)
    return _vit(
        "vit_s_16", norm, num_classes, arch, input_size, kn_kernel_size, kn_stride, kn_dropout_p, kn_eval_dropout,
        dropout, attention_dropout, drop_path_rate,
    )  # fmt: skip


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=224, test_input_size=64)
def vit_b_16(
    norm: str,
    num_classes: int,
    input_size: int | None = None,
    kn_kernel_size: int | None = None,
    kn_stride: int | None = None,
    kn_dropout_p: float | None = None,
    kn_eval_dropout: bool | None = None,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """ViT-B/16: d 768, depth 12, 12 heads, mlp 3072 (torchvision's parameter count with "ln")."""
    arch = (224, 16, 768, 12, 12, 3072)
    return _vit(
        "vit_b_16", norm, num_classes, arch, input_size, kn_kernel_size, kn_stride, kn_dropout_p, kn_eval_dropout,
        dropout, attention_dropout, drop_path_rate,
    )  # fmt: skip
