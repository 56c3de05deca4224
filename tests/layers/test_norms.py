"""The norm factory and LayerNorm2d against hand-computed references."""

import pytest
import torch
from torch import nn

from kn_dist.layers import KernelNorm2d, LayerNorm2d, get_norm_layer


def test_layer_norm_2d_normalises_each_position_over_channels():
    torch.manual_seed(0)
    layer = LayerNorm2d(6)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    x = torch.randn(2, 6, 5, 4) * 3 + 2
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * layer.weight[:, None, None] + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.eps == 1e-6 and layer.weight.shape == (6,)


def test_factory_builds_the_named_layers():
    c = 64
    assert isinstance(get_norm_layer("bn")(c), nn.BatchNorm2d)
    gn = get_norm_layer("gn")(c)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32 and gn.num_channels == c
    assert get_norm_layer("gn", num_groups=8)(c).num_groups == 8
    ln = get_norm_layer("ln")(c)  # the paper's "LayerNorm": one group over (C, H, W)
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1
    assert isinstance(get_norm_layer("ln2d")(c), LayerNorm2d)
    assert isinstance(get_norm_layer("none")(c), nn.Identity)
    kn = get_norm_layer("kn", dropout_p=0.25)(c)
    assert isinstance(kn, KernelNorm2d) and kn.kernel_size == (1, 1) and kn.dropout_p == 0.25
    assert get_norm_layer("kn", kernel_size=2, stride=2)(c).kernel_size == (2, 2)


def test_factory_kn_default_keeps_shape_and_normalises_each_position():
    x = torch.randn(3, 16, 7, 5) + 4
    out = get_norm_layer("kn")(16).eval()(x)
    assert out.shape == x.shape
    expected = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_factory_gn_ln_match_definitions():
    x = torch.randn(2, 8, 3, 3) * 2 + 1
    out = get_norm_layer("ln")(8)(x)
    flat = x.view(2, -1)
    expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected.view_as(x), atol=1e-5, rtol=1e-5)


def test_factory_errors_name_the_value():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'.*bn, gn, ln, ln2d, kn, none"):
        get_norm_layer("batchnorm")
    with pytest.raises(ValueError, match="dropout_p=1.5"):
        get_norm_layer("kn", dropout_p=1.5)
