"""KNConcatConv2d (a 1x1 KNConv2d on a concatenation, statistics merged from its parts) against references.

References: torch.var_mean of the concatenation for the merged statistics; the naive unfold KNConv2d of
test_kernel_norm.py, in float64, on the concatenation with the same keep mask, for outputs and for the
gradients of every part, also when several layers read overlapping concatenations of the same parts (a
DenseNet block), where autograd sums their gradients of a part's statistics before one pass.
"""

import pytest
import torch
from test_kernel_norm import naive_kn_conv
from torch import Tensor

from kn_dist.layers import KNConv2d, dropout_keep_mask
from kn_dist.layers.kn_concat import KNConcatConv2d, merge_stats, pixel_stats

P = 0.05


def _parts(dtype=torch.float64, seed=0, widths=(5, 3, 8), size=6, dead=False, offset=0.0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i, c in enumerate(widths):
        x = (torch.randn(3, c, size, size, generator=gen) * (1 + i) + i + offset).relu()
        if dead:
            x[:, :, 1:4, 1:4] = 0.0  # every channel of every part dead there, as ReLUs leave it
        parts.append(x.to(dtype).requires_grad_())
    return parts


def _stats(parts: list[Tensor]):
    stats = pixel_stats(parts[0])
    for x in parts[1:]:
        stats = merge_stats(stats, pixel_stats(x))
    return stats


def _layer(cin: int, cout: int, dtype, seed: int) -> KNConcatConv2d:
    torch.manual_seed(seed)
    layer = KNConcatConv2d(cin, cout, dropout_p=P).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def test_merged_statistics_equal_those_of_the_concatenation():
    parts = _parts(widths=(1, 7, 4, 12), offset=100.0)
    stats = _stats(parts)
    var, mean = torch.var_mean(torch.cat(parts, 1), dim=1, keepdim=True, correction=0)
    assert stats.count == 24
    torch.testing.assert_close(stats.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("drop", ["sparse draw", "dense mask", "none"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_equals_the_naive_kn_conv_on_the_concatenation(drop, channels_last):
    parts = _parts()
    if channels_last:
        parts = [p.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for p in parts]
    x = torch.cat(parts, 1)
    layer = _layer(x.shape[1], 4, torch.float64, 0).train(drop != "none")
    keep = None
    if drop == "sparse draw":  # the layer's own draw (flat indices on CPU); the same seed gives its mask
        torch.manual_seed(7)
        keep = dropout_keep_mask(x, P)
        torch.manual_seed(7)
        y = layer(x, _stats(parts))
    else:
        if drop == "dense mask":
            keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.2
            layer.dropout_p = 0.2
        y = layer(x, _stats(parts), keep_mask=keep)
    ref = naive_kn_conv(x, layer.weight, layer.bias, 1, 1, 0, 1, keep, layer.dropout_p if keep is not None else 0.0)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    inputs = [*parts, layer.weight, layer.bias]
    ours = torch.autograd.grad(y, inputs, grad)
    theirs = torch.autograd.grad(ref, inputs, grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dropout_p", [P, 0.3])  # 0.3: bool masks (the dense path) even on CPU
def test_layers_sharing_parts_get_the_gradients_of_the_naive_layers(dropout_p):
    """Two layers reading cat(x1, x2) and cat(x1, x2, x3), as consecutive DenseNet bottlenecks do."""
    parts = _parts(widths=(6, 4, 4))
    first, second = _layer(10, 5, torch.float64, 1), _layer(14, 3, torch.float64, 2)
    first.dropout_p = second.dropout_p = dropout_p
    x_a, x_b = torch.cat(parts[:2], 1), torch.cat(parts, 1)
    torch.manual_seed(11)
    keep_a, keep_b = dropout_keep_mask(x_a, dropout_p), dropout_keep_mask(x_b, dropout_p)
    torch.manual_seed(11)
    stats_a = _stats(parts[:2])
    y_a = first(x_a, stats_a)
    y_b = second(x_b, merge_stats(stats_a, pixel_stats(parts[2])))
    ref_a = naive_kn_conv(x_a, first.weight, first.bias, 1, 1, 0, 1, keep_a, dropout_p)
    ref_b = naive_kn_conv(x_b, second.weight, second.bias, 1, 1, 0, 1, keep_b, dropout_p)
    torch.testing.assert_close(y_a, ref_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_b, ref_b, rtol=1e-10, atol=1e-10)
    g_a, g_b = torch.randn_like(ref_a), torch.randn_like(ref_b)
    inputs = [*parts, first.weight, second.weight]
    ours = torch.autograd.grad((y_a * g_a).sum() + (y_b * g_b).sum(), inputs)
    theirs = torch.autograd.grad((ref_a * g_a).sum() + (ref_b * g_b).sum(), inputs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _relative_grad_error(parts64: list[Tensor], layer_fn, ref_fn) -> float:
    """Max |grad(fp32 layer) - grad(fp64 naive)| / max |grad(fp64 naive)| over all parts, same keep mask."""
    parts32 = [p.detach().float().requires_grad_() for p in parts64]
    x64 = torch.cat(parts64, 1)
    torch.manual_seed(5)
    keep = dropout_keep_mask(x64, P)
    ref = ref_fn(x64, keep)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref_g = torch.autograd.grad(ref, parts64, grad)
    torch.manual_seed(5)
    ours_g = torch.autograd.grad(layer_fn(parts32), parts32, grad.float())
    scale = max(g.abs().max() for g in ref_g)
    return max(((a.double() - b).abs().max() / scale).item() for a, b in zip(ours_g, ref_g, strict=True))


@pytest.mark.parametrize("case", ["dead patch", "large offset"])
def test_fp32_gradients_are_as_accurate_as_a_plain_kn_conv(case):
    """fp32 against fp64: dead patches (windows with no variance) within 1e-5 (issue 13, item 6); a large
    common offset within a small factor of a plain KNConv2d on the concatenation (both then subtract
    mu * sum(W) from a large conv output)."""
    parts = _parts(
        widths=(16, 12, 12, 12), size=8, dead=case == "dead patch", offset=0.0 if case == "dead patch" else 300.0
    )
    layer = _layer(52, 16, torch.float32, 3).train()
    plain = KNConv2d(52, 16, 1, dropout_p=P).train()
    plain.load_state_dict(layer.state_dict())

    def ref(x64, keep):
        return naive_kn_conv(x64, layer.weight.double(), layer.bias.double(), 1, 1, 0, 1, keep, P)

    ours = _relative_grad_error(parts, lambda ps: layer(torch.cat(ps, 1), _stats(ps)), ref)
    theirs = _relative_grad_error(parts, lambda ps: plain(torch.cat(ps, 1)), ref)
    assert ours <= max(1e-5, 3.0 * theirs), (ours, theirs)


def test_statistics_of_other_channels_are_refused():
    parts = _parts()
    layer = KNConcatConv2d(16, 4)
    with pytest.raises(ValueError, match="stats cover 11 channels but the input has 16"):
        layer(torch.cat(parts, 1), _stats(parts[1:]))
