"""ViT: published parameter counts, equality with torchvision's ViT, and the KernelNorm plumbing."""

import pytest
import torch
import torchvision
from torch import nn

from kn_dist.layers import KernelNormTokens
from kn_dist.layers.kernel_norm_tokens import KernelNormEmbedGrid
from kn_dist.models import create_model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vit_b_16_has_torchvision_parameter_count():
    with torch.device("meta"):  # counts only: no memory, no init cost
        ours = create_model("vit_b_16", "ln", num_classes=1000)
        reference = torchvision.models.vit_b_16()
    assert num_params(ours) == num_params(reference) == 86_567_656


def test_vit_s_16_has_deit_small_parameter_count():
    with torch.device("meta"):
        ours = create_model("vit_s_16", "ln", num_classes=1000)
    # DeiT-S / timm vit_small_patch16_224: 22,050,664 parameters (22 M in Touvron et al. 2021, Table 1)
    assert num_params(ours) == 22_050_664


# Equality with torchvision's ViT (same weights): tests/models/test_knvit.py, at a small and the seed's size.


def test_kn_variants_use_their_token_norms_only():
    kn = create_model("vit_cifar", "kn", kn_kernel_size=2, kn_dropout_p=0.1)
    norms = [m for m in kn.modules() if isinstance(m, KernelNormTokens)]
    assert len(norms) == 2 * 9 + 1  # two per block + the final norm
    assert all(m.kernel_size == 2 and m.dropout_p == 0.1 and m.num_prefix_tokens == 1 for m in norms)
    assert not any(isinstance(m, nn.LayerNorm) for m in kn.modules())
    emb = create_model("vit_cifar", "kn_embed")
    assert sum(isinstance(m, KernelNormEmbedGrid) for m in emb.modules()) == 19
    assert not any(isinstance(m, nn.LayerNorm | KernelNormTokens) for m in emb.modules())


def test_kn_kernel_one_is_layernorm_without_affine():
    torch.manual_seed(1)
    kn = create_model("vit_cifar", "kn", kn_kernel_size=1, kn_dropout_p=0.0).eval()
    ln = create_model("vit_cifar", "ln").eval()
    state = {k: v for k, v in ln.state_dict().items() if "norm" not in k}
    kn.load_state_dict(state, strict=True)
    # both eps are 1e-5 (vit_cifar's LayerNorm keeps Lee et al.'s nn.LayerNorm default); LN's affine is 1 / 0 at init
    assert {m.eps for m in kn.modules() if isinstance(m, KernelNormTokens)} == {1e-5}
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(kn(x), ln(x), atol=1e-5, rtol=1e-5)


def test_other_input_sizes_resample_position_embeddings():
    torch.manual_seed(2)
    model = create_model("vit_s_16", "kn", num_classes=5, input_size=64).eval()  # built for a 4×4 grid
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)  # 2×2 grid: resampled embeddings
    with pytest.raises(ValueError, match="kernel_size=2"):
        model(torch.randn(1, 3, 48, 48))  # 3×3 token grid: 2×2 windows do not tile it
    with pytest.raises(ValueError, match="patch size 16"):
        model(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(norm="kn", kn_kernel_size=3), "kernel_size=3"),
        (dict(norm="kn", kn_kernel_size=2, kn_stride=1), "stride=1"),
        (dict(norm="kn", kn_dropout_p=1.5), "dropout_p=1.5"),
        (dict(norm="kn_embed", kn_kernel_size=5), "divisible by 5"),
        (dict(norm="ln", input_size=30), "input_size=30"),
        (dict(norm="ln", kn_kernel_size=2), "kn_kernel_size.*not norm .ln."),
    ],
)
def test_impossible_geometry_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("vit_cifar", **kwargs)
