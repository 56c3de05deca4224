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
from kn_dist.models._registry import register_model

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
        return lambda dim: KernelNormTokens(num_prefix_tokens=num_prefix_tokens, grid_size=grid_size, **kw)
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
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


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
    """ViT with a class token, learned position embeddings and a linear head on the class token."""

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
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
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
        expected = self.grid_size[0] * self.patch_size
        if (height, width) != (expected, expected):
            raise ValueError(f"VisionTransformer: built for {expected}×{expected} inputs, got {height}×{width}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, h·w, D), row-major grid order
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)  # (N, 1 + h·w, D)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _vit(
    norm: str,
    num_classes: int,
    *,
    image_size: int,
    patch_size: int,
    dim: int,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    kn_kernel_size: int = 2,
    kn_stride: int | None = None,
    kn_dropout_p: float = 0.05,
    kn_eval_dropout: bool = False,
    **kwargs,
) -> VisionTransformer:
    if image_size % patch_size:
        raise ValueError(f"ViT: image_size={image_size} is not divisible by patch_size={patch_size}")
    grid = (image_size // patch_size, image_size // patch_size)
    norm_layer = token_norm_factory(
        norm,
        grid,
        kn_kernel_size=kn_kernel_size,
        kn_stride=kn_stride,
        kn_dropout_p=kn_dropout_p,
        kn_eval_dropout=kn_eval_dropout,
    )
    return VisionTransformer(image_size, patch_size, dim, depth, num_heads, mlp_dim, num_classes, norm_layer, **kwargs)


_NORMS = ("ln", "kn", "kn_embed")


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=32)
def vit_cifar(norm: str, num_classes: int, image_size: int = 32, **kwargs) -> VisionTransformer:
    """Small-dataset ViT (Lee et al. 2021, arXiv:2112.13492 baseline): patch 4, d 192, depth 9, 12 heads, mlp ×2."""
    return _vit(
        norm, num_classes, image_size=image_size, patch_size=4, dim=192, depth=9, num_heads=12, mlp_dim=384, **kwargs
    )


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=224)
def vit_s_16(norm: str, num_classes: int, image_size: int = 224, **kwargs) -> VisionTransformer:
    """ViT-S/16 (DeiT-S shape): d 384, depth 12, 6 heads, mlp 1536."""
    return _vit(
        norm, num_classes, image_size=image_size, patch_size=16, dim=384, depth=12, num_heads=6, mlp_dim=1536, **kwargs
    )


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=224)
def vit_b_16(norm: str, num_classes: int, image_size: int = 224, **kwargs) -> VisionTransformer:
    """ViT-B/16: d 768, depth 12, 12 heads, mlp 3072 (torchvision's parameter count with "ln")."""
    return _vit(
        norm, num_classes, image_size=image_size, patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072, **kwargs
    )
