"""Vision Transformer (Dosovitskiy et al., ICLR 2021) with LayerNorm or KernelNorm on token grids.

Models:
- `vit_cifar`: the small-dataset ViT baseline of Lee et al. 2021 (arXiv:2112.13492; code
  github.com/aanna0701/SPT_LSA_ViT, models/vit.py and create_model.py): patch 4, d 192, depth 9, 12
  heads, MLP 384, a qkv projection without bias, LayerNorm with PyTorch's default eps 1e-5, and
  stochastic depth 0.1 at every block (one DropPath shared by all blocks; their main.py `--sd 0.1`).
  Not matched: their initialisation (Xavier-normal linears, N(0, 1) position embeddings); ours is timm's.
- `vit_s_16`, `vit_b_16`: DeiT-S / ViT-B shapes; vit_b_16 with "ln" has exactly torchvision's parameter
  count (86,567,656 with 1000 classes).
- `vit_784_8`, `vit_784_16` and `knvit_s_8`, `knvit_s_16`: the seed authors' models (github.com/
  conor-brennan/kn-visiontransformer, models/vision_transformer.py and knvision_transformer.py), built on
  torchvision's ViT at 32 px: d 784 = 28², depth 16, 14 heads, MLP 3072, patch 8 or 16, torchvision's
  initialisation. "ln" is their LayerNorm `vit_s_8` / `vit_s_16` (renamed: our `vit_s_16` is the ImageNet
  ViT-S/16); "kn" is their `knvit_s_*`: a KNConv2d patch embedding (dropout 0.05, their KNConv2d default)
  and every LayerNorm replaced by KernelNorm2d(2, 2) (dropout 0.1) on the tokens reshaped to
  (N, L, 28, 28), the L tokens acting as channels (`KernelNormEmbedGrid`).

Norms of the other models (DESIGN.md §4):
- "ln": the published pre-LN ViT.
- "kn": KernelNorm over k×k windows of patch tokens on their (h, w) grid × all D channels, the class
  token normalised on its own (`KernelNormTokens`); k = 1 is per-token KernelNorm.
- "kn_embed": the seed authors' token norm alone: each token's embedding reshaped to the most nearly
  square a×b grid (28×28 only for D = 784), KernelNorm in k×k cells with the L tokens as channels; the
  patch embedding stays a plain conv. Their whole model is `knvit_s_8` / `knvit_s_16`.

Initialisation follows timm / DeiT (truncated normal 0.02 for linear layers, zero biases) except for
the seed models, and never touches norm layers, which may have no `.weight` (KernelNorm).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kn_dist.layers.kernel_norm_tokens import KernelNormEmbedGrid, KernelNormTokens
from kn_dist.models._options import KN, TransformerArgs, resolve_kn
from kn_dist.models._registry import register_alias, register_model

NormFactory = Callable[[int], nn.Module]  # dim -> norm module acting on (N, L, dim)


def token_norm_factory(
    norm: str, grid_size: tuple[int, int], kn: KN | None = None, *, num_prefix_tokens: int = 1, ln_eps: float = 1e-6
) -> NormFactory:
    """Turn a token-norm name into `dim -> module` (the only place the string is looked at).

    `kn`: the KernelNorm settings (default: 2×2 windows, dropout 0.05). Impossible KernelNorm geometry
    raises a ValueError here, before any layer is built.
    """
    kn = kn or KN(kernel_size=2, stride=None, dropout_p=0.05, head_dropout_p=0.0, eval_dropout=False)
    if norm == "ln":
        return lambda dim: nn.LayerNorm(dim, eps=ln_eps)
    if norm == "kn":
        kw = dict(kernel_size=kn.kernel_size, stride=kn.stride, dropout_p=kn.dropout_p, eval_dropout=kn.eval_dropout)
        KernelNormTokens(num_prefix_tokens=num_prefix_tokens, grid_size=grid_size, **kw)  # validate geometry now
        # the layers read the (square) grid off the sequence, so the model also runs at other input sizes
        return lambda dim: KernelNormTokens(num_prefix_tokens=num_prefix_tokens, **kw)
    if norm == "kn_embed":
        if kn.stride not in (None, kn.kernel_size):
            raise ValueError(f"kn_embed: kn_stride={kn.stride} must equal kn_kernel_size={kn.kernel_size}")
        return lambda dim: KernelNormEmbedGrid(dim, kn.kernel_size, kn.dropout_p, eval_dropout=kn.eval_dropout)
    raise ValueError(f"unknown token norm {norm!r}; valid: ln, kn, kn_embed")


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Multi-head self-attention; with `qkv_bias`, the same parameters as nn.MultiheadAttention."""

    def __init__(
        self, dim: int, num_heads: int, attention_dropout: float = 0.0, dropout: float = 0.0, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
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
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attention_dropout, dropout, qkv_bias)
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
    `embed_layer(in_channels, dim, patch, patch)` makes the patch projection (a conv, or a KNConv).
    Stochastic depth grows linearly from 0 to `drop_path_rate` over the blocks, or is the same at every
    block with `uniform_drop_path`.
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
        uniform_drop_path: bool = False,
        qkv_bias: bool = True,
        embed_layer: Callable[..., nn.Module] = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embed = embed_layer(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        if uniform_drop_path:
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_dim, norm_layer, dropout, attention_dropout, r, qkv_bias) for r in rates]
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


def init_torchvision_vit(model: VisionTransformer) -> None:
    """torchvision's ViT initialisation (the seed authors' models are torchvision's VisionTransformer).

    nn.MultiheadAttention: Xavier-uniform in-projection, nn.Linear's default out-projection, zero biases;
    MLPBlock: Xavier-uniform weights, N(0, 1e-6) biases; position embeddings N(0, 0.02) (BERT); class
    token and head zero. The patch projection (truncated normal, sqrt(1 / fan_in)) is already torchvision's.
    """
    for block in model.blocks:
        nn.init.xavier_uniform_(block.attn.qkv.weight)
        nn.init.zeros_(block.attn.qkv.bias)
        block.attn.proj.reset_parameters()
        nn.init.zeros_(block.attn.proj.bias)
        for linear in (block.mlp[0], block.mlp[3]):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)
    nn.init.normal_(model.pos_embed, std=0.02)
    for param in (model.cls_token, model.head.weight, model.head.bias):
        nn.init.zeros_(param)


@dataclass(frozen=True)
class _Arch:
    """A ViT shape and the details its publication fixes."""

    image_size: int  # the registered input size
    patch_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    ln_eps: float = 1e-6  # torchvision / timm; Lee et al. use nn.LayerNorm's default 1e-5
    drop_path_rate: float = 0.0  # used when the entrypoint's drop_path_rate is None
    uniform_drop_path: bool = False
    seed: bool = False  # the seed authors' model: "kn" = KNConv embedding + embedding-grid KernelNorm


def _vit(name: str, norm: str, num_classes: int, arch: _Arch, args: TransformerArgs) -> VisionTransformer:
    # the seed's KernelNorm2d default dropout is 0.1; KNConv's paper value 0.05 otherwise
    kn = resolve_kn(
        name, norm, args, ("kn",) if arch.seed else ("kn", "kn_embed"), dropout_p=0.1 if arch.seed else 0.05
    )
    input_size = arch.image_size if args.input_size is None else args.input_size
    if input_size % arch.patch_size:
        raise ValueError(f"{name}: input_size={input_size} is not divisible by the patch size {arch.patch_size}")
    grid = (input_size // arch.patch_size,) * 2
    seed_kn = arch.seed and norm == "kn"
    norm_layer = token_norm_factory("kn_embed" if seed_kn else norm, grid, kn, ln_eps=arch.ln_eps)
    # the seed's KNConv2d patch embedding keeps its layer default, dropout 0.05
    embed = replace(kn, dropout_p=0.05).conv if seed_kn else nn.Conv2d
    model = VisionTransformer(
        input_size, arch.patch_size, arch.dim, arch.depth, arch.num_heads, arch.mlp_dim, num_classes, norm_layer,
        dropout=args.dropout, attention_dropout=args.attention_dropout,
        drop_path_rate=arch.drop_path_rate if args.drop_path_rate is None else args.drop_path_rate,
        uniform_drop_path=arch.uniform_drop_path, qkv_bias=arch.qkv_bias, embed_layer=embed,
    )  # fmt: skip
    if arch.seed:
        init_torchvision_vit(model)
    return model


_NORMS = ("ln", "kn", "kn_embed")

# Every entrypoint takes `TransformerArgs` (None: the default in brackets):
#   input_size        square input resolution [registered size]; sets the token grid and position embeddings
#   kn_kernel_size    KernelNorm window, in tokens for "kn", in embedding-grid cells for "kn_embed" and the
#                     seed models' "kn" [2]
#   kn_stride         must equal kn_kernel_size (non-overlapping windows keep the sequence) [= kernel]
#   kn_dropout_p      dropout on the token KernelNorm statistics [0.05, KNConv's paper value; seed models 0.1]
#   kn_eval_dropout   keep KernelNorm's dropout on in eval, as the official code does [False]
#   dropout, attention_dropout   [0]; drop_path_rate: stochastic depth [vit_cifar 0.1, others 0]


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=32)
def vit_cifar(norm: str, num_classes: int, args: TransformerArgs) -> VisionTransformer:
    """Lee et al.'s small-dataset ViT: patch 4, d 192, depth 9, 12 heads, mlp 384, no qkv bias, drop path 0.1."""
    arch = _Arch(32, 4, 192, 9, 12, 384, qkv_bias=False, ln_eps=1e-5, drop_path_rate=0.1, uniform_drop_path=True)
    return _vit("vit_cifar", norm, num_classes, arch, args)


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=224, test_input_size=64)
def vit_s_16(norm: str, num_classes: int, args: TransformerArgs) -> VisionTransformer:
    """ViT-S/16 (DeiT-S shape): d 384, depth 12, 6 heads, mlp 1536."""
    return _vit("vit_s_16", norm, num_classes, _Arch(224, 16, 384, 12, 6, 1536), args)


@register_model(family="vit", norms=_NORMS, default_norm="ln", input_size=224, test_input_size=64)
def vit_b_16(norm: str, num_classes: int, args: TransformerArgs) -> VisionTransformer:
    """ViT-B/16: d 768, depth 12, 12 heads, mlp 3072 (torchvision's parameter count with "ln")."""
    return _vit("vit_b_16", norm, num_classes, _Arch(224, 16, 768, 12, 12, 3072), args)


# The seed authors' models (module docstring): 116.7 M / 117.1 M parameters with 10 classes.
_SEED_8 = _Arch(32, 8, 784, 16, 14, 3072, seed=True)
_SEED_16 = _Arch(32, 16, 784, 16, 14, 3072, seed=True)


@register_model(family="vit", norms=("ln", "kn"), default_norm="ln", input_size=32)
def vit_784_8(norm: str, num_classes: int, args: TransformerArgs) -> VisionTransformer:
    """The seed authors' ViT, patch 8 at 32 px: their vit_s_8 ("ln") and knvit_s_8 ("kn")."""
    return _vit("vit_784_8", norm, num_classes, _SEED_8, args)


@register_model(family="vit", norms=("ln", "kn"), default_norm="ln", input_size=32)
def vit_784_16(norm: str, num_classes: int, args: TransformerArgs) -> VisionTransformer:
    """The seed authors' ViT, patch 16 at 32 px: their vit_s_16 ("ln") and knvit_s_16 ("kn")."""
    return _vit("vit_784_16", norm, num_classes, _SEED_16, args)


register_alias("knvit_s_8", "vit_784_8", "kn", "The seed authors' KN-ViT-S/8, = vit_784_8(norm='kn').")
register_alias("knvit_s_16", "vit_784_16", "kn", "The seed authors' KN-ViT-S/16, = vit_784_16(norm='kn').")
