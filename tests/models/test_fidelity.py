"""Details of the published models that a parameter count cannot see (issue 15, items 1-3 and 5).

Each expected value is the published one, cited where it is asserted.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kn_dist.layers import KernelNorm2d
from kn_dist.models import create_model

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


# --- 1. ConvMixer-768/32 is the ReLU model -----------------------------------------------------------


@pytest.mark.parametrize("norm", ["bn", "ln", "kn"])
@pytest.mark.parametrize(
    "name, activation",
    # locuslab/convmixer README: "ConvMixer-768/32 here uses ReLU instead of GELU"; timm's
    # convmixer_768_32 has act_layer=nn.ReLU. The other two are the GELU models of the paper.
    [("convmixer_768_32", nn.ReLU), ("convmixer_1536_20", nn.GELU), ("convmixer_256_8", nn.GELU)],
)
def test_convmixer_activation_is_the_published_one(name, norm, activation):
    model = _meta(name, norm=norm)
    acts = [type(m) for m in model.modules() if isinstance(m, nn.ReLU | nn.GELU)]
    depth = int(name.split("_")[2])
    assert acts == [activation] * (1 + 2 * depth)  # the embedding, then depthwise and pointwise per block


# --- 2. Conformer: stem BatchNorm eps, and stochastic depth in the recipes ----------------------------


@pytest.mark.parametrize("name", ["conformer_tiny", "conformer_tiny_cifar"])
def test_conformer_batchnorm_eps_is_the_authors(name):
    model = _meta(name, norm="bn+ln")
    stem = [m for m in model.stem.modules() if isinstance(m, nn.BatchNorm2d)]
    rest = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and all(m is not s for s in stem)]
    # pengzhiliang/Conformer conformer.py: the stem is nn.BatchNorm2d(64) (PyTorch's default eps), the
    # ConvBlocks and FCUUp use partial(nn.BatchNorm2d, eps=1e-6)
    assert [m.eps for m in stem] == [nn.BatchNorm2d(1).eps] == [1e-5]
    assert rest and {m.eps for m in rest} == {1e-6}


def _conformer_recipes() -> list[Path]:
    recipes = sorted(EXPERIMENTS.glob("cifar*/conformer_tiny_cifar_*.yaml"))
    return [*recipes, EXPERIMENTS / "sweeps" / "conformer_cifar100.yaml"]


@pytest.mark.parametrize("path", _conformer_recipes(), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_conformer_recipes_train_with_the_authors_stochastic_depth(path):
    # pengzhiliang/Conformer main.py: --drop-path default 0.1
    model = yaml.safe_load(path.read_text())["model"]
    assert model["kwargs"]["drop_path_rate"] == 0.1


def test_conformer_drop_path_grows_linearly_to_the_rate():
    model = _meta("conformer_tiny_cifar", drop_path_rate=0.1)
    rates = [model.trans_1.drop_path_p] + [b.trans_block.drop_path_p for b in model.blocks]
    # the authors' rule: torch.linspace(0, drop_path_rate, depth)
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 12), rtol=0, atol=1e-7)


# --- 3. vit_cifar is Lee et al.'s ViT --------------------------------------------------------------

# aanna0701/SPT_LSA_ViT create_model.py: ViT(dim=192, mlp_dim_ratio=2, depth=9, heads=12, dim_head=16),
# patch 4 at 32 px; models/vit.py: to_qkv = nn.Linear(dim, 3 * inner_dim, bias=False), nn.LayerNorm(dim).
D, DEPTH, HEADS, PATCH, TOKENS = 192, 9, 12, 4, 64 + 1


def _lee_vit_parameters(num_classes: int) -> int:
    """Their layers' sizes: patch Linear(48, 192), pos (65, 192), cls, per block LN, qkv (no bias), out, LN,
    FF 192 -> 384 -> 192; head LN + Linear."""
    block = 2 * D + D * 3 * D + (D * D + D) + 2 * D + (D * 2 * D + 2 * D) + (2 * D * D + D)
    return (3 * PATCH * PATCH * D + D) + TOKENS * D + D + DEPTH * block + 2 * D + (D * num_classes + num_classes)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_vit_cifar_parameter_count_equals_lee_et_al(num_classes):
    assert sum(p.numel() for p in _meta("vit_cifar", num_classes=num_classes).parameters()) == _lee_vit_parameters(
        num_classes
    )


def test_vit_cifar_has_their_qkv_layernorm_and_stochastic_depth():
    model = _meta("vit_cifar")
    assert all(block.attn.qkv.bias is None for block in model.blocks)
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}  # nn.LayerNorm's default
    # their Transformer shares one DropPath(stochastic_depth) across all blocks; main.py --sd 0.1
    assert [block.drop_path_p for block in model.blocks] == [0.1] * DEPTH


def lee_vit_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """Their ViT.forward (eval, no SPT / LSA), written from models/vit.py, on our model's tensors."""
    n, c, h, w = x.shape
    # Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)') + Linear: the conv weight in (p1 p2 c) order
    patches = x.reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, 48)
    weight = state["patch_embed.weight"].permute(0, 2, 3, 1).reshape(D, 48)
    t = F.linear(patches, weight, state["patch_embed.bias"])
    t = torch.cat([state["cls_token"].expand(n, -1, -1), t], dim=1) + state["pos_embed"]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (D,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-5)
        q, k, v = (
            z.reshape(n, -1, HEADS, D // HEADS).transpose(1, 2)
            for z in (y @ state[b + "attn.qkv.weight"].T).chunk(3, -1)
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) * (D // HEADS) ** -0.5, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n, -1, D)
        t = F.linear(y, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"]) + t
        y = F.layer_norm(t, (D,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps=1e-5)
        y = F.linear(F.gelu(F.linear(y, state[b + "mlp.0.weight"], state[b + "mlp.0.bias"])), state[b + "mlp.3.weight"])
        t = y + state[b + "mlp.3.bias"] + t
    head = F.layer_norm(t[:, 0], (D,), state["norm.weight"], state["norm.bias"], eps=1e-5)  # mlp_head: LN, Linear
    return F.linear(head, state["head.weight"], state["head.bias"])


def test_vit_cifar_logits_equal_their_forward():
    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=10).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # LayerNorm starts at 1 / 0: give the affine real values too
                param.add_(torch.randn_like(param) * 0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), lee_vit_forward(model.state_dict(), x), atol=1e-5, rtol=1e-5)


# --- 5. KNResNet's head dropout follows kn_dropout_p -----------------------------------------------


@pytest.mark.parametrize(
    "kwargs, head",
    [
        # reza-nasirigerdeh/norm-torch knresnet.py: kn_dropout_p = min(5 * dropout_p, 0.25) for the final
        # KernelNorm2d1x1, in KNResNet-18, -34 and -50
        ({}, 0.25),  # the paper's dropout_p 0.05
        ({"kn_dropout_p": 0.02}, 0.1),
        ({"kn_dropout_p": 0.04}, 0.2),
        ({"kn_dropout_p": 0.1}, 0.25),
        ({"kn_dropout_p": 0.0}, 0.0),
        ({"kn_dropout_p": 0.02, "kn_head_dropout_p": 0.3}, 0.3),  # given explicitly: that value
    ],
)
@pytest.mark.parametrize("name", ["knresnet18_cifar", "knresnet50"])
def test_knresnet_head_dropout_follows_the_official_rule(name, kwargs, head):
    heads = [m.dropout_p for m in _meta(name, **kwargs).modules() if isinstance(m, KernelNorm2d)]
    assert len(heads) == 1 and math.isclose(heads[0], head, abs_tol=1e-12)
