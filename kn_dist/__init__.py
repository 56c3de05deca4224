"""kn_dist: distributed training of KernelNorm vs. standard normalisation."""

__version__ = "0.1.0"
