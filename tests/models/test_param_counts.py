"""Our baselines are the published models: parameter counts against torchvision and the papers.

Everything is built on the meta device (shapes only, no memory and no init), so even the 51 M
parameter ConvMixer costs only its Python construction.
"""

import pytest
import torch
import torchvision

from kn_dist.models import create_model


def _meta(build):
    with torch.device("meta"):
        return build()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "densenet121", "convnext_tiny"])
def test_matches_torchvision(name):
    """Same count, and the same state-dict keys and shapes: torchvision's weights load into ours."""
    ours = _meta(lambda: create_model(name, num_classes=1000))  # published norm (bn / bn / ln)
    reference = _meta(lambda: getattr(torchvision.models, name)(weights=None))
    assert _count(ours) == _count(reference)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes


# Nasirigerdeh et al., TMLR 2024: KNResNet sizes in millions (CIFAR-100 and ImageNet heads).
@pytest.mark.parametrize(
    "name, num_classes, millions",
    [
        ("knresnet18_cifar", 100, 11.216),
        ("knresnet34_cifar", 100, 21.323),
        ("knresnet50_cifar", 100, 23.682),
        ("knresnet18", 1000, 11.685),
        ("knresnet34", 1000, 21.793),
        ("knresnet50", 1000, 25.556),
    ],
)
def test_knresnet_matches_paper(name, num_classes, millions):
    count = _count(_meta(lambda: create_model(name, num_classes=num_classes)))
    assert count == pytest.approx(millions * 1e6, rel=1e-3)


def test_resnet_kn_is_knresnet():
    a = _meta(lambda: create_model("resnet18_cifar", norm="kn", num_classes=100))
    b = _meta(lambda: create_model("knresnet18_cifar", num_classes=100))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


# Trockman & Kolter (ConvMixer): 1536/20 51.63 M, 768/32 21.11 M (ImageNet heads);
# Huang et al. (DenseNet-BC, k = 12, depth 100): 0.8 M (CIFAR).
@pytest.mark.parametrize(
    "name, num_classes, millions, rel",
    [
        ("convmixer_1536_20", 1000, 51.63, 0.01),
        ("convmixer_768_32", 1000, 21.11, 0.01),
        ("densenet_bc100", 10, 0.8, 0.05),
    ],
)
def test_matches_published(name, num_classes, millions, rel):
    count = _count(_meta(lambda: create_model(name, num_classes=num_classes)))
    assert count == pytest.approx(millions * 1e6, rel=rel)


@pytest.mark.parametrize("name", ["convmixer_256_8", "convmixer_1536_20"])
def test_convmixer_norms_change_only_norm_parameters(name):
    """bn and ln carry 2 parameters per channel per norm; kn has none but adds nothing else."""
    bn, ln, kn = (_count(_meta(lambda n=n: create_model(name, norm=n))) for n in ("bn", "ln", "kn"))
    assert bn == ln
    dim, depth = {"convmixer_256_8": (256, 8), "convmixer_1536_20": (1536, 20)}[name]
    assert bn - kn == 2 * dim * (2 * depth + 1)
