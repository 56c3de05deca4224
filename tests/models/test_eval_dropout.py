"""KernelNorm's evaluation mode is a choice: `kn_eval_dropout=True` keeps the statistics dropout on in
eval() as the official code does (it calls F.dropout without `training=`), the default is deterministic.

Parametrised over the registry: every model x norm that uses KernelNorm. The default's determinism is
checked for every model by tests/models/test_registry_models.py (test_eval_deterministic); here, the
option must reach every KernelNorm layer and make two eval forwards of one input differ.
"""

import pytest
import torch
from torch import nn

from kn_dist.layers import KernelNorm2d, KernelNormTokens, KNConv2d
from kn_dist.layers.kernel_norm_tokens import KernelNormEmbedGrid
from kn_dist.models import create_model, list_models, model_info

KN_LAYERS = (KNConv2d, KernelNorm2d, KernelNormTokens, KernelNormEmbedGrid)


def _kn_cases():
    for name in list_models():
        info = model_info(name)
        if info.alias_of is not None:
            continue  # the same model as its target
        marks = [pytest.mark.slow] if info.input_size >= 128 else []
        for norm in info.norms:
            if norm.startswith("kn"):
                yield pytest.param(name, norm, id=f"{name}-{norm}", marks=marks)


@pytest.mark.parametrize("name, norm", list(_kn_cases()))
def test_eval_dropout_reaches_every_kernelnorm_layer(name, norm):
    info = model_info(name)
    size = info.test_input_size or info.input_size
    torch.manual_seed(0)
    model = create_model(name, norm=norm, num_classes=5, kn_eval_dropout=True).eval()
    layers = [m for m in model.modules() if isinstance(m, KN_LAYERS)]
    assert layers and all(m.eval_dropout for m in layers)
    for m in model.modules():
        # torchvision-style heads start at zero (every logit 0 whatever the features): give them weights
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.1)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = model(x), model(x)
    assert not torch.equal(first, second), "eval forwards are identical: the statistics dropout is off"


def test_eval_dropout_is_refused_without_kernelnorm():
    with pytest.raises(ValueError, match="kn_eval_dropout apply only to norm 'kn'"):
        create_model("resnet18_cifar", norm="bn", kn_eval_dropout=True)
    with pytest.raises(ValueError, match="kn_eval_dropout=.*true or false"):
        create_model("resnet18_cifar", norm="kn", kn_eval_dropout="yes")
