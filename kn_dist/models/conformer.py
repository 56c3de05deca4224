"""Conformer (Peng et al., "Conformer: Local Features Coupling Global Representations for Visual
Recognition", ICCV 2021): a ResNet-style CNN branch and a ViT branch that exchange features at every
stage through feature-coupling units (FCUDown: CNN map -> tokens, FCUUp: tokens -> CNN map).

Structure, widths and the published Ti / S shapes follow the authors' code (github.com/pengzhiliang/
Conformer, conformer.py / models.py); this is a re-implementation, not a copy. Training returns
(cnn_logits, transformer_logits) so the loss can be the mean of the two cross-entropies as in the
paper; eval returns their sum.

Norms (DESIGN.md §4):
- "bn+ln" (published): BatchNorm after every CNN-branch conv and the FCUUp projection (eps 1e-6 as the
  authors' ConvBlock / FCUUp; the stem's keeps PyTorch's default 1e-5, as their `self.bn1`), LayerNorm in
  the transformer branch and in FCUDown (per position, on the pooled map).
- "kn": every CNN-branch conv + BN and the FCUUp projection + BN become a KNConv2d with the conv's own
  geometry (KernelNorm of the conv's input, fused); the FCUDown LayerNorm becomes KernelNorm2d
  (k×k / k) on the pooled map before flattening; transformer LayerNorms become `KernelNormTokens`
  (k×k token windows, class token per token), as in the ViT "kn" variant.
- The CIFAR stem (3×3 stride 1, no max-pool) keeps 32×32 maps in stage 1, giving an 8×8 token grid.

The authors train with stochastic depth 0.1 (main.py `--drop-path 0.1`, linear over the blocks); the
model's `drop_path_rate` defaults to 0 as their model class does, and the shipped recipes set 0.1.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kn_dist.layers import LayerNorm2d
from kn_dist.models._options import KN, TransformerArgs, resolve_kn
from kn_dist.models._registry import register_model
from kn_dist.models.vit import Block, NormFactory, token_norm_factory

# (in_channels, out_channels, kernel_size, stride, padding, bias) -> conv followed by its norm
ConvNormFactory = Callable[..., nn.Module]


def conv_norm_factory(norm: str, kn: KN, *, bn_eps: float = 1e-6) -> ConvNormFactory:
    """CNN-branch conv + norm for a Conformer norm name (the only place the string is looked at)."""
    if norm == "bn+ln":

        def conv_bn(cin: int, cout: int, k: int, s: int = 1, p: int = 0, bias: bool = False) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, p, bias=bias), nn.BatchNorm2d(cout, eps=bn_eps))

        return conv_bn
    if norm == "kn":

        def kn_conv(cin: int, cout: int, k: int, s: int = 1, p: int = 0, bias: bool = False) -> nn.Module:
            # KNConv always has a bias: nothing after it re-centres the output (no BN beta)
            return kn.conv(cin, cout, k, s, p)

        return kn_conv
    raise ValueError(f"unknown Conformer norm {norm!r}; valid: bn+ln, kn")


class ConvBlock(nn.Module):
    """Bottleneck 1×1 → 3×3 (stride) → 1×1 (×4), ReLU after each conv + norm, residual add, ReLU.

    `x_t` (the FCUUp output) is added to the 3×3 conv's input; the 3×3 output `x2` is returned for
    FCUDown.
    """

    def __init__(self, cin: int, cout: int, stride: int, res_conv: bool, conv_norm: ConvNormFactory) -> None:
        super().__init__()
        med = cout // 4
        self.conv1 = conv_norm(cin, med, 1)
        self.conv2 = conv_norm(med, med, 3, stride, 1)
        self.conv3 = conv_norm(med, cout, 1)
        self.residual = conv_norm(cin, cout, 1, stride) if res_conv else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shortcut = x if self.residual is None else self.residual(x)
        x = self.act(self.conv1(x))
        x2 = self.act(self.conv2(x if x_t is None else x + x_t))
        return self.act(self.conv3(x2) + shortcut), x2


class FCUDown(nn.Module):
    """CNN map → tokens: 1×1 projection, average-pool to the token grid, norm on the map, GELU, flatten."""

    def __init__(self, cin: int, embed_dim: int, dw_stride: int, map_norm: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, embed_dim, 1)
        self.pool = nn.AvgPool2d(dw_stride, dw_stride)
        self.norm = map_norm
        self.act = nn.GELU()

    def forward(self, x: Tensor, x_t: Tensor) -> Tensor:
        x = self.act(self.norm(self.pool(self.proj(x))))  # (N, E, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, h·w, E)
        return torch.cat([x_t[:, :1], x], dim=1)  # keep the transformer's class token


class FCUUp(nn.Module):
    """Tokens → CNN map: drop the class token, 1×1 projection + norm, ReLU, nearest upsampling."""

    def __init__(self, embed_dim: int, cout: int, up_stride: int, conv_norm: ConvNormFactory) -> None:
        super().__init__()
        self.up_stride = up_stride
        self.proj = conv_norm(embed_dim, cout, 1, bias=True)
        self.act = nn.ReLU()

    def forward(self, x_t: Tensor, h: int, w: int) -> Tensor:
        n, _, e = x_t.shape
        x = x_t[:, 1:].transpose(1, 2).reshape(n, e, h, w)  # (N, E, h, w)
        x = self.act(self.proj(x))
        return F.interpolate(x, size=(h * self.up_stride, w * self.up_stride))


class ConvTransBlock(nn.Module):
    """One Conformer stage step: CNN bottleneck, FCUDown → transformer block, FCUUp → fusion bottleneck."""

    def __init__(
        self,
        cin: int,
        cout: int,
        res_conv: bool,
        stride: int,
        dw_stride: int,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float,
        last_fusion: bool,
        conv_norm: ConvNormFactory,
        token_norm: NormFactory,
        map_norm: NormFactory,
        drop_path_p: float,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        self.dw_stride = dw_stride
        self.cnn_block = ConvBlock(cin, cout, stride, res_conv, conv_norm)
        # the last fusion block halves the map once more (7×7 at 224 px), as in the authors' code
        self.fusion_block = ConvBlock(cout, cout, 2 if last_fusion else 1, last_fusion, conv_norm)
        self.squeeze_block = FCUDown(cout // 4, embed_dim, dw_stride, map_norm(embed_dim))
        self.expand_block = FCUUp(embed_dim, cout // 4, dw_stride, conv_norm)
        mlp_dim = int(embed_dim * mlp_ratio)
        self.trans_block = Block(embed_dim, num_heads, mlp_dim, token_norm, dropout, attention_dropout, drop_path_p)

    def forward(self, x: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        x, x2 = self.cnn_block(x)
        h, w = x2.shape[-2:]
        x_t = self.trans_block(self.squeeze_block(x2, x_t) + x_t)
        x, _ = self.fusion_block(x, self.expand_block(x_t, h // self.dw_stride, w // self.dw_stride))
        return x, x_t


class Conformer(nn.Module):
    """Conformer with a stem, 1 + depth-1 ConvTransBlocks in three stages, and two classifier heads."""

    def __init__(
        self,
        num_classes: int,
        stem_conv_norm: ConvNormFactory,
        conv_norm: ConvNormFactory,
        token_norm: NormFactory,
        final_token_norm: NormFactory,
        map_norm: NormFactory,
        *,
        patch_size: int = 16,
        channel_ratio: int = 4,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        cifar_stem: bool = False,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth % 3:
            raise ValueError(f"Conformer: depth={depth} must be a multiple of 3 (three stages)")
        stage_channels = [64 * channel_ratio, 128 * channel_ratio, 256 * channel_ratio]
        dw = patch_size // 4
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic-depth rule
        trans_kw = dict(dropout=dropout, attention_dropout=attention_dropout)

        if cifar_stem:  # 3×3 stride 1, no max-pool: stage 1 keeps the 32×32 input resolution
            self.stem = nn.Sequential(stem_conv_norm(3, 64, 3, 1, 1), nn.ReLU())
        else:  # ResNet stem: 7×7 stride 2 + 3×3 max-pool stride 2 (1/4 resolution)
            self.stem = nn.Sequential(stem_conv_norm(3, 64, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.conv_1 = ConvBlock(64, stage_channels[0], 1, True, conv_norm)
        self.trans_patch_conv = nn.Conv2d(64, embed_dim, dw, dw)
        self.trans_1 = Block(
            embed_dim, num_heads, int(embed_dim * mlp_ratio), token_norm, drop_path_p=dpr[0], **trans_kw
        )

        blocks = []
        per_stage = depth // 3
        for i in range(2, depth + 1):  # blocks 2..depth, numbered as in the paper's code
            stage = (i - 1) // per_stage  # 0, 1, 2
            first = i == stage * per_stage + 1 and stage > 0
            cin = stage_channels[stage - 1] if first else stage_channels[stage]
            blocks.append(
                ConvTransBlock(
                    cin,
                    stage_channels[stage],
                    res_conv=first,
                    stride=2 if first else 1,
                    dw_stride=dw // 2**stage,
                    embed_dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    last_fusion=i == depth,
                    conv_norm=conv_norm,
                    token_norm=token_norm,
                    map_norm=map_norm,
                    drop_path_p=dpr[i - 1],
                    **trans_kw,
                )
            )
        self.blocks = nn.ModuleList(blocks)

        self.trans_norm = final_token_norm(embed_dim)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.conv_cls_head = nn.Linear(stage_channels[2], num_classes)

        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x_base = self.stem(x)  # (N, 64, H/4, W/4), or (N, 64, H, W) with the CIFAR stem
        x, _ = self.conv_1(x_base)
        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)  # (N, h·w, E)
        x_t = self.trans_1(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x_t], dim=1))
        for block in self.blocks:
            x, x_t = block(x, x_t)
        conv_logits = self.conv_cls_head(x.mean(dim=(2, 3)))
        trans_logits = self.trans_cls_head(self.trans_norm(x_t)[:, 0])
        if self.training:
            return conv_logits, trans_logits
        return conv_logits + trans_logits


def _init_weights(m: nn.Module) -> None:
    """The authors' init: truncated normal 0.02 for linear layers, Kaiming (fan-out) for convs.

    Norm layers keep their defaults; KernelNorm layers have no weight to initialise.
    """
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):  # includes KNConv2d
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _conformer(
    name: str, norm: str, num_classes: int, channel_ratio: int, cifar_stem: bool, args: TransformerArgs
) -> Conformer:
    kn = resolve_kn(name, norm, args, ("kn",))
    input_size = (32 if cifar_stem else 224) if args.input_size is None else args.input_size
    stem_factor = 1 if cifar_stem else 4
    # the token grid is the stage-1 map / 4, and stages 2-3 halve the map twice: both need ÷ 4
    if input_size % (stem_factor * 4):
        raise ValueError(f"{name}: input_size={input_size} must be divisible by {stem_factor * 4}")
    grid = (input_size // stem_factor // 4,) * 2
    token = "kn" if norm == "kn" else "ln"
    token_norm = token_norm_factory(token, grid, kn)  # raises on impossible token geometry
    # the authors' final norm is nn.LayerNorm with the default eps 1e-5; block norms use 1e-6
    final_norm = token_norm_factory(token, grid, kn, ln_eps=1e-5)
    if norm == "kn":

        def map_norm(dim: int) -> nn.Module:
            # k×k / k KernelNorm keeps the h×w grid (token_norm_factory has checked that k divides it)
            return kn.norm(kn.kernel_size, kn.kernel_size)

    else:

        def map_norm(dim: int) -> nn.Module:
            return LayerNorm2d(dim, eps=1e-6)  # per-position LayerNorm, as the authors' LN on tokens

    stem_conv_norm = conv_norm_factory(norm, kn, bn_eps=1e-5)  # the stem's nn.BatchNorm2d(64): default eps
    return Conformer(
        num_classes, stem_conv_norm, conv_norm_factory(norm, kn), token_norm, final_norm, map_norm,
        channel_ratio=channel_ratio, cifar_stem=cifar_stem, dropout=args.dropout,
        attention_dropout=args.attention_dropout, drop_path_rate=args.drop_path_rate or 0.0,
    )  # fmt: skip


_NORMS = ("bn+ln", "kn")

# Every entrypoint takes `TransformerArgs` (None: the default in brackets):
#   input_size        square input resolution [registered size]; must divide by 16 (by 4 with the CIFAR stem)
#   kn_kernel_size    KernelNorm window on the token grid (transformer norms and FCUDown) [2]; CNN-branch
#                     KNConvs take the geometry of the conv they replace
#   kn_stride         must equal kn_kernel_size [= kernel]
#   kn_dropout_p      dropout on every KernelNorm's statistics [0.05]
#   kn_eval_dropout   keep that dropout on in eval, as the official KernelNorm code does [False]
#   dropout, attention_dropout, drop_path_rate   transformer-branch regularisers [0; the authors train with
#                     drop_path_rate 0.1]


@register_model(family="conformer", norms=_NORMS, default_norm="bn+ln", input_size=224, test_input_size=64)
def conformer_tiny(norm: str, num_classes: int, args: TransformerArgs) -> Conformer:
    """Conformer-Ti/16: channel ratio 1, embed 384, depth 12, 6 heads (23.5 M params published)."""
    return _conformer("conformer_tiny", norm, num_classes, 1, False, args)


@register_model(family="conformer", norms=_NORMS, default_norm="bn+ln", input_size=224, test_input_size=64)
def conformer_small(norm: str, num_classes: int, args: TransformerArgs) -> Conformer:
    """Conformer-S/16: channel ratio 4, embed 384, depth 12, 6 heads (37.7 M params published)."""
    return _conformer("conformer_small", norm, num_classes, 4, False, args)


@register_model(family="conformer", norms=_NORMS, default_norm="bn+ln", input_size=32)
def conformer_tiny_cifar(norm: str, num_classes: int, args: TransformerArgs) -> Conformer:
    """Conformer-Ti with the CIFAR stem (3×3 stride 1, no max-pool): 8×8 tokens at 32×32 input."""
    return _conformer("conformer_tiny_cifar", norm, num_classes, 1, True, args)
