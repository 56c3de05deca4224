"""Conformer: published parameter counts, the two-head contract, the CIFAR stem and the KN plumbing."""

import pytest
import torch
from torch import nn

from kn_dist.layers import KernelNorm2d, KernelNormTokens, KNConv2d
from kn_dist.models import create_model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,published", [("conformer_tiny", 23.5e6), ("conformer_small", 37.7e6)])
def test_published_parameter_counts(name, published):
    with torch.device("meta"):  # counts only
        model = create_model(name, "bn+ln", num_classes=1000)
    # Peng et al. 2021, Table 1: Conformer-Ti 23.5 M, Conformer-S 37.7 M
    assert abs(num_params(model) - published) / published < 0.01


@pytest.fixture(scope="module")
def kn_cifar():
    torch.manual_seed(0)
    return create_model("conformer_tiny_cifar", "kn", num_classes=10, kn_dropout_p=0.0)


def test_train_returns_both_heads_and_eval_returns_their_sum(kn_cifar):
    x = torch.randn(2, 3, 32, 32)
    kn_cifar.train()  # without dropout the kn model computes the same in train and eval
    with torch.no_grad():
        cnn, trans = kn_cifar(x)
        kn_cifar.eval()
        both = kn_cifar(x)
    assert cnn.shape == trans.shape == (2, 10)
    assert not torch.allclose(cnn, trans)
    torch.testing.assert_close(both, cnn + trans, atol=1e-5, rtol=1e-5)


def test_cifar_stem_gives_an_8x8_token_grid_and_kn_everywhere(kn_cifar):
    seen = []
    hook = kn_cifar.trans_1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    kn_cifar.eval()
    with torch.no_grad():
        kn_cifar(torch.randn(1, 3, 32, 32))
    hook.remove()
    assert seen == [torch.Size([1, 1 + 8 * 8, 384])]
    modules = list(kn_cifar.modules())
    assert not any(isinstance(m, nn.BatchNorm2d | nn.LayerNorm) for m in modules)
    token_norms = [m for m in modules if isinstance(m, KernelNormTokens)]
    assert len(token_norms) == 2 * 12 + 1 and all(m.kernel_size == 2 for m in token_norms)
    assert sum(isinstance(m, KernelNorm2d) for m in modules) == 11  # one FCUDown per ConvTransBlock
    # every CNN-branch conv is a KNConv; the plain convs are the FCUDown projections and the patch conv
    plain = [m for m in modules if type(m) is nn.Conv2d]
    assert len(plain) == 11 + 1
    assert sum(isinstance(m, KNConv2d) for m in modules) > 50


def test_published_norms_in_bn_ln_variant():
    torch.manual_seed(1)
    model = create_model("conformer_tiny_cifar", "bn+ln")
    modules = list(model.modules())
    assert not any(isinstance(m, KNConv2d | KernelNorm2d | KernelNormTokens) for m in modules)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules) > 50
    assert sum(isinstance(m, nn.LayerNorm) for m in modules) == 2 * 12 + 1 + 11  # blocks, final, FCUDown


@pytest.mark.slow
def test_imagenet_stem_runs_at_reduced_size():
    torch.manual_seed(2)
    model = create_model("conformer_tiny", "kn", num_classes=5, input_size=64).eval()  # 4×4 token grid
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(norm="kn", kn_kernel_size=3), "kernel_size=3"),
        (dict(norm="kn", kn_dropout_p=-0.1), "dropout_p=-0.1"),
        (dict(norm="bn+ln", input_size=30), "input_size=30"),
        (dict(norm="bn+ln", kn_dropout_p=0.1), r"kn_dropout_p.*not norm .bn\+ln."),
    ],
)
def test_impossible_geometry_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("conformer_tiny_cifar", **kwargs)
