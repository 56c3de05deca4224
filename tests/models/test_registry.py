"""The registry's contract, and the KernelNorm arguments and geometry checks of the CNN families."""

import pytest
import torch
from torch import nn

from kn_dist.layers import KernelNorm2d, KNConv2d
from kn_dist.models import create_model, list_models, model_info, register_model


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_every_family_has_a_cifar_and_an_imagenet_model():
    for family in ("resnet", "densenet", "convnext", "convmixer"):
        sizes = {model_info(n).input_size for n in list_models(family)}
        assert sizes == {32, 224}, family


def test_duplicate_name_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_model(family="resnet", norms=("bn",), default_norm="bn", input_size=32)
        def resnet18(norm, num_classes):  # noqa: ARG001
            return nn.Identity()


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18_cifar"):
        create_model("resnet19")


def test_unsupported_norm_lists_valid_norms():
    with pytest.raises(ValueError, match="valid norms are: bn, kn"):
        create_model("densenet_bc100", norm="gn")


@pytest.mark.parametrize(
    "name, kwargs, valid",
    [
        ("resnet18_cifar", {"norm": "kn", "kn_dropout": 0.1}, "kn_dropout_p"),
        ("knresnet18_cifar", {"kn_dropout": 0.1}, "kn_dropout_p"),  # an alias takes its target's arguments
        ("convmixer_256_8", {"kernel": 3}, "kernel_size"),
        ("vit_cifar", {"drop_path": 0.1}, "drop_path_rate"),
    ],
)
def test_unknown_argument_lists_valid_arguments(name, kwargs, valid):
    unknown = next(k for k in kwargs if k != "norm")
    with pytest.raises(ValueError, match=f"no argument '{unknown}'; valid arguments are: .*{valid}"):
        create_model(name, **kwargs)


def test_entrypoint_must_declare_its_options():
    with pytest.raises(ValueError, match="declare its options"):

        @register_model(family="resnet", norms=("bn",), default_norm="bn", input_size=32)
        def toy_resnet(norm, num_classes, **kwargs):  # noqa: ARG001
            return nn.Identity()


@pytest.mark.parametrize("alias", [n for n in list_models() if model_info(n).alias_of is not None])
def test_alias_builds_its_target_with_its_norm(alias):
    info = model_info(alias)
    target = model_info(info.alias_of)
    assert (info.input_size, info.test_input_size, info.arguments) == (
        target.input_size,
        target.test_input_size,
        target.arguments,
    )
    a, b = _meta(alias, num_classes=7), _meta(info.alias_of, norm=info.default_norm, num_classes=7)
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_kernelnorm_argument_refused_without_kernelnorm():
    with pytest.raises(ValueError, match="kn_dropout_p apply only to norm 'kn'"):
        create_model("resnet18_cifar", norm="bn", kn_dropout_p=0.1)
    with pytest.raises(ValueError, match="kn_head_dropout_p"):
        create_model("convnext_cifar", norm="kn_down", kn_head_dropout_p=0.1)


def test_default_norm_is_the_published_one():
    expected = {"resnet18": "bn", "densenet121": "bn", "convnext_tiny": "ln", "convmixer_1536_20": "bn"}
    assert {n: model_info(n).default_norm for n in expected} == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in _meta("convnext_tiny").modules())


@pytest.mark.parametrize(
    "name, kwargs, layer",
    [
        # KNResNet-18's ImageNet geometry needs >= 96 px: at 64 px its last KNConv sees a 1x1 map.
        ("knresnet18", {"input_size": 64}, "features.final_conv"),
        # ConvNeXt-T at 16 px: 4x4 after the stem, 2x2, then the third 2x2/2 downsampler sees 1x1.
        ("convnext_tiny", {"norm": "kn_down", "input_size": 16}, "features.6.1"),
        # ConvMixer patch 7 on a 4 px input.
        ("convmixer_256_8", {"norm": "kn", "patch_size": 7, "input_size": 4}, "0"),
    ],
)
def test_impossible_geometry_refused_naming_the_layer(name, kwargs, layer):
    with pytest.raises(ValueError, match=f"layer '{layer}'.*input size {kwargs['input_size']}"):
        create_model(name, **kwargs)


@pytest.mark.parametrize(
    "name, norm, kwargs",
    [
        ("resnet18_cifar", "kn", {"kn_dropout_p": 0.1, "kn_head_dropout_p": 0.3}),
        ("densenet_bc100", "kn", {"kn_dropout_p": 0.1, "kn_head_dropout_p": 0.3}),
        ("convnext_cifar", "kn", {"kn_dropout_p": 0.2, "kn_head_dropout_p": 0.3}),
        ("convmixer_256_8", "kn", {"kn_dropout_p": 0.2}),
    ],
)
def test_kernelnorm_dropout_reaches_every_layer(name, norm, kwargs):
    model = _meta(name, norm=norm, **kwargs)
    convs = [m.dropout_p for m in model.modules() if isinstance(m, KNConv2d)]
    heads = [m.dropout_p for m in model.modules() if isinstance(m, KernelNorm2d)]
    assert convs and set(convs) == {kwargs["kn_dropout_p"]}
    assert set(heads) == ({kwargs["kn_head_dropout_p"]} if "kn_head_dropout_p" in kwargs else set())


def test_knresnet_paper_defaults():
    model = _meta("knresnet18_cifar")
    convs = [m for m in model.modules() if isinstance(m, KNConv2d)]
    assert {m.dropout_p for m in convs} == {0.05}
    assert [m.dropout_p for m in model.modules() if isinstance(m, KernelNorm2d)] == [0.25]
    # every KNConv except the 3x3 stem is 2x2 (the paper's kernel pairs)
    assert sorted({m.kernel_size for m in convs}) == [(2, 2), (3, 3)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 1


@pytest.mark.parametrize("name, norm", [("knresnet18_cifar", "kn"), ("densenet_bc100", "kn"), ("convnext_cifar", "kn")])
@pytest.mark.parametrize("k", [3, 4])
def test_kernelnorm_kernel_size_keeps_the_geometry(name, norm, k):
    """Odd and even kernels other than the default still give a valid 32 px model (real forward)."""
    torch.manual_seed(0)
    model = create_model(name, norm=norm, kn_kernel_size=k, num_classes=7).eval()
    assert any(isinstance(m, KNConv2d) and m.kernel_size == (k, k) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_convnext_kn_down_changes_only_the_downsamplers():
    """The authors' KN-ConvNeXt: 3 KNConvs (2x2/2), LayerNorms elsewhere; "kn" has no LayerNorm left."""
    kn_down = _meta("convnext_tiny", norm="kn_down")
    convs = [m for m in kn_down.modules() if isinstance(m, KNConv2d)]
    assert [(m.kernel_size, m.stride, m.dropout_p) for m in convs] == [((2, 2), (2, 2), 0.1)] * 3
    ln = [m for m in kn_down.modules() if isinstance(m, nn.LayerNorm)]
    assert len(ln) == 1 + 18 + 1  # stem, one per block, head
    assert not any(isinstance(m, nn.LayerNorm) for m in _meta("convnext_tiny", norm="kn").modules())
