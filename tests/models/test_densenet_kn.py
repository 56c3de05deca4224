"""The KN DenseNet, whose 1x1 KNConvs take their statistics from the block's parts, against the same network
computed the plain way: ReLU on each concatenation, then KNConv2d on it (DESIGN.md §4).

The reference is written here from the model's own modules called as plain KNConv2d layers (KNConv2d is
checked against the naive unfold reference in tests/layers). Both draw their dropout masks from the same
generator in the same order, so in float64 outputs and every parameter's gradient must agree to rounding.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kn_dist.layers import KNConv2d
from kn_dist.models import create_model


def plain_forward(model: nn.Module, x: Tensor) -> Tensor:
    """DenseNet-BC with norm="kn", every KNConv2d run on the ReLU'd concatenation it reads."""
    f = model.features
    x = f.conv0(x)
    for i in (1, 2, 3):
        features = [x]
        for layer in getattr(f, f"denseblock{i}").values():
            h = KNConv2d.forward(layer.conv1, torch.relu(torch.cat(features, 1)))
            features.append(layer.conv2(layer.relu2(h)))
        x = torch.cat(features, 1)
        if i < 3:
            transition = getattr(f, f"transition{i}")
            x = transition.pool(KNConv2d.forward(transition.conv, torch.relu(x)))
    x = torch.relu(f.norm5(x))
    return model.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dropout_p", [0.05, 0.3])  # CPU: flat-index drops at 0.05, bool masks at 0.3 (GPU's form)
def test_kn_densenet_equals_the_plain_computation(dropout_p, device):
    torch.manual_seed(0)
    model = create_model("densenet_bc100", norm="kn", num_classes=10, kn_dropout_p=dropout_p)
    model = model.to(device, torch.float64).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, device=device)
    params = list(model.parameters())
    results = []
    for forward in (model, lambda inp: plain_forward(model, inp)):
        torch.manual_seed(1)
        y = forward(x)
        results.append((y, torch.autograd.grad(y.square().sum(), params)))
    (y, grads), (y_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for p, g, g_ref in zip(params, grads, grads_ref, strict=True):
        torch.testing.assert_close(
            g, g_ref, rtol=1e-9, atol=1e-12 * max(1.0, g_ref.abs().max().item()), msg=str(p.shape)
        )


def test_kn_densenet_keeps_the_plain_state_dict_keys():
    """Checkpoints of the KN DenseNet keep torchvision-style names: conv1 / conv2 per layer, transitionN.conv."""
    keys = set(create_model("densenet_bc100", norm="kn", num_classes=10).state_dict())
    assert {"features.denseblock1.denselayer1.conv1.weight", "features.denseblock1.denselayer1.conv2.bias"} <= keys
    assert {"features.transition2.conv.weight", "features.conv0.weight", "classifier.weight"} <= keys
    assert not any(".relu" in k or ".norm1" in k for k in keys)
