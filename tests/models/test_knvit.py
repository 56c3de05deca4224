"""The seed authors' ViTs (github.com/conor-brennan/kn-visiontransformer): vit_784_* and knvit_s_*.

Their models, as their code builds them, at 32 px: torchvision's VisionTransformer with hidden size
784 = 28², 16 layers, 14 heads, MLP 3072, patch 8 or 16. Their KN-ViT replaces the patch conv by a
KNConv2d (k = s = patch, dropout 0.05) and every LayerNorm by KernelNorm2d(2, 2) (dropout 0.1) applied to
the tokens reshaped to (N, L, 28, 28), the L tokens acting as channels.

References here are independent of our code: torchvision's VisionTransformer for the LayerNorm models
(their vit_s_* *is* that class), and for the KN-ViT a functional re-implementation written below from
that description (naive unfold statistics, explicit softmax attention). The weights are our model's
own tensors, so nothing is copied. These models have ~117 M parameters: counts use the meta device,
logits a batch of 2.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from kn_dist.models import create_model
from kn_dist.models.vit import VisionTransformer, token_norm_factory

DIM, DEPTH, HEADS, MLP, EPS = 784, 16, 14, 3072, 1e-5


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        # the seed's param_counter.py figures for their knvit_s_8 / knvit_s_16 with 10 and 100 classes
        ("knvit_s_8", 10, 116_693_466),
        ("knvit_s_8", 100, 116_764_116),
        ("knvit_s_16", 10, 117_135_642),
        ("knvit_s_16", 100, 117_206_292),
    ],
)
def test_knvit_parameter_counts_equal_theirs(name, num_classes, expected):
    with torch.device("meta"):
        assert _count(create_model(name, num_classes=num_classes)) == expected


def _torchvision_vit(patch: int, num_classes: int) -> torchvision.models.VisionTransformer:
    # their vit_s_8 / vit_s_16: torchvision's _vision_transformer(patch, 16, 14, 784, 3072, image_size=32)
    return torchvision.models.VisionTransformer(32, patch, DEPTH, HEADS, DIM, MLP, num_classes=num_classes)


@pytest.mark.parametrize("patch", [8, 16])
def test_layernorm_baseline_parameter_count_equals_torchvision(patch):
    with torch.device("meta"):
        ours, theirs = create_model(f"vit_784_{patch}", "ln", num_classes=100), _torchvision_vit(patch, 100)
    assert _count(ours) == _count(theirs)


def _to_torchvision(state: dict, depth: int = DEPTH) -> dict:
    """Our ViT state dict under torchvision's names (the same tensors)."""
    out = {
        "conv_proj.weight": state["patch_embed.weight"],
        "conv_proj.bias": state["patch_embed.bias"],
        "class_token": state["cls_token"],
        "encoder.pos_embedding": state["pos_embed"],
        "encoder.ln.weight": state["norm.weight"],
        "encoder.ln.bias": state["norm.bias"],
        "heads.head.weight": state["head.weight"],
        "heads.head.bias": state["head.bias"],
    }
    pairs = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "self_attention.out_proj": "attn.proj",
        "mlp.0": "mlp.0",
        "mlp.3": "mlp.3",
    }
    for i in range(depth):
        src, dst = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for theirs, ours in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{src}{theirs}.{kind}"] = state[f"{dst}{ours}.{kind}"]
        out[src + "self_attention.in_proj_weight"] = state[dst + "attn.qkv.weight"]
        out[src + "self_attention.in_proj_bias"] = state[dst + "attn.qkv.bias"]
    return out


def _randomise_zero_init(model: torch.nn.Module) -> None:
    """torchvision initialises the head and class token to zero; give them values so logits carry the features."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in (model.head.weight, model.head.bias, model.cls_token):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def test_small_layernorm_vit_equals_torchvision_with_the_same_weights():
    torch.manual_seed(0)
    ours = VisionTransformer(32, 8, 64, 2, 4, 96, 7, token_norm_factory("ln", (4, 4))).eval()
    _randomise_zero_init(ours)
    with torch.device("meta"):
        theirs = torchvision.models.VisionTransformer(32, 8, 2, 4, 64, 96, num_classes=7)
    theirs.load_state_dict(_to_torchvision(ours.state_dict(), depth=2), strict=True, assign=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_layernorm_baseline_equals_torchvision_with_the_same_weights():
    torch.manual_seed(0)
    ours = create_model("vit_784_16", "ln", num_classes=10).eval()
    _randomise_zero_init(ours)
    with torch.device("meta"):
        theirs = _torchvision_vit(16, 10)
    theirs.load_state_dict(_to_torchvision(ours.state_dict()), strict=True, assign=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Their KN-ViT, written from the description above


def _normalise(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """(t - mean) / sqrt(biased var + eps) over `dims`: one KernelNorm unit per remaining index."""
    mean = t.mean(dim=dims, keepdim=True)
    var = ((t - mean) ** 2).mean(dim=dims, keepdim=True)
    return (t - mean) / torch.sqrt(var + EPS)


def _kn_conv_patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int) -> torch.Tensor:
    """KNConv2d(3, D, p, stride p): each p×p patch of all 3 channels is a unit, normalised, then projected."""
    n, c, h, w = x.shape
    patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, h/p, w/p, 3, p, p)
    patches = _normalise(patches, (3, 4, 5))
    tokens = torch.einsum("nijcab,dcab->nijd", patches, weight) + bias  # (N, h/p, w/p, D), row-major grid
    return tokens.reshape(n, -1, weight.shape[0])


def _embedding_grid_kernel_norm(x: torch.Tensor) -> torch.Tensor:
    """KernelNorm2d(2, 2) on x (N, L, D) viewed as (N, L, 28, 28): a unit is a 2×2 cell of all L tokens."""
    n, length, d = x.shape
    side = math.isqrt(d)
    grid = x.reshape(n, length, side // 2, 2, side // 2, 2)
    return _normalise(grid, (1, 3, 5)).reshape(n, length, d)


def _attention(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    n, length, d = x.shape
    qkv = F.linear(x, state[prefix + "qkv.weight"], state[prefix + "qkv.bias"])  # [q | k | v], as in_proj
    q, k, v = (t.reshape(n, length, HEADS, d // HEADS).transpose(1, 2) for t in qkv.split(d, dim=-1))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // HEADS), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, length, d)
    return F.linear(out, state[prefix + "proj.weight"], state[prefix + "proj.bias"])


def seed_knvit_forward(state: dict, x: torch.Tensor, patch: int) -> torch.Tensor:
    """Their KNVisionTransformer.forward in eval mode with KernelNorm dropout 0."""
    tokens = _kn_conv_patch_embed(x, state["patch_embed.weight"], state["patch_embed.bias"], patch)
    h = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), tokens], dim=1) + state["pos_embed"]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = h + _attention(_embedding_grid_kernel_norm(h), state, b + "attn.")
        y = _embedding_grid_kernel_norm(h)
        y = F.linear(F.gelu(F.linear(y, state[b + "mlp.0.weight"], state[b + "mlp.0.bias"])), state[b + "mlp.3.weight"])
        h = h + y + state[b + "mlp.3.bias"]
    h = _embedding_grid_kernel_norm(h)
    return F.linear(h[:, 0], state["head.weight"], state["head.bias"])


@pytest.mark.slow
@pytest.mark.parametrize("patch", [8, 16])
def test_knvit_logits_equal_a_reimplementation_of_theirs(patch):
    torch.manual_seed(0)
    ours = create_model(f"knvit_s_{patch}", num_classes=10, kn_dropout_p=0.0).eval()
    _randomise_zero_init(ours)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = seed_knvit_forward(ours.state_dict(), x, patch)
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)


def test_knvit_is_vit_784_with_kernelnorm_and_their_dropouts():
    with torch.device("meta"):
        alias, model = create_model("knvit_s_8"), create_model("vit_784_8", "kn")
    assert [type(m) for m in alias.modules()] == [type(m) for m in model.modules()]
    names = {type(m).__name__ for m in model.modules()}
    assert "LayerNorm" not in names and type(model.patch_embed).__name__ == "KNConv2d"
    token_norms = [m for m in model.modules() if type(m).__name__ == "KernelNormEmbedGrid"]
    assert len(token_norms) == 2 * DEPTH + 1
    # their layers' defaults: KernelNorm2d dropout 0.1 on a 28×28 grid in 2×2 cells, KNConv2d dropout 0.05
    assert {(m.grid, m.kernel_size, m.dropout_p) for m in token_norms} == {((28, 28), 2, 0.1)}
    assert model.patch_embed.dropout_p == 0.05
