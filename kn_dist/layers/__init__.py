"""Normalisation layers: KernelNorm (Nasirigerdeh et al., TMLR 2024) and the norm factory."""

from kn_dist.layers.kernel_norm import KernelNorm2d, KNConv2d, dropout_keep_mask, kernel_norm_stats, kn_conv2d
from kn_dist.layers.kernel_norm_tokens import KernelNormTokens
from kn_dist.layers.norms import NORM_NAMES, LayerNorm2d, get_norm_layer

__all__ = [
    "NORM_NAMES",
    "KNConv2d",
    "KernelNorm2d",
    "KernelNormTokens",
    "LayerNorm2d",
    "dropout_keep_mask",
    "get_norm_layer",
    "kernel_norm_stats",
    "kn_conv2d",
]
