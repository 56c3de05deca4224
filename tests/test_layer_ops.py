"""The GPU cost model of `kn-dist bench layers` (kn_dist/bench/layer_ops.py; issue 24, item 5).

The counter against hand-counted steps (an elementwise op and a sum, their backward; Conv2d + BatchNorm2d:
torch's two kernels each way), and KNConv2d's GPU code path against the targets the bench states.
"""

from __future__ import annotations

import torch
from torch import nn

from kn_dist.bench import layer_ops
from kn_dist.bench.layer_ops import OpCounter, count_step


def test_counter_counts_kernels_and_bytes_not_views():
    x = torch.ones(4, 8)
    with OpCounter() as c:
        y = (x * 2.0).view(32).t()  # mul: one kernel; view and t: metadata only
        y.sum()
    assert c.ops == 2 and c.names == {"mul": 1, "sum": 1}
    assert c.bytes == (32 + 32) * 4 + (32 * 4 + 4) and c.fp64_ops == 0


def test_conv_bn_is_torchs_two_kernels_each_way():
    conv_bn = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    c = count_step(conv_bn, x, torch.randn(2, 4, 8, 8), "conv_bn")
    for kernel in ("convolution", "native_batch_norm", "convolution_backward", "native_batch_norm_backward"):
        assert c.names.get(kernel) == 1, c.names


def test_kn_conv_gpu_path_meets_the_stated_targets():
    cases = layer_ops.cases("conv3x3_c64_32x32", 64, 32, 3, 1, 1, 1, batch=8)  # `bench layers --quick`
    failed = [(c["name"], c["ratio"], c["target"]) for c in cases if not c["met"]]
    assert not failed, failed
    assert cases[0]["kn_gpu_ops"] < cases[0]["kn_cpu_ops"]  # avg_pool2d kernels instead of prefix sums
