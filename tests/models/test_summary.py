"""`kn-dist models` table: parameter counts and FLOPs against published figures."""

import pytest
import torch

from kn_dist.models import create_model
from kn_dist.models._registry import shape_probe
from kn_dist.models.summary import format_table, forward_flops


def _gflops(name: str, norm: str | None = None, size: int = 224) -> float:
    with torch.device("meta"):
        model = create_model(name, norm=norm)
    return forward_flops(shape_probe(model), size) / 1e9


# torchvision's model cards give GMACs ("_ops": resnet18 1.814, densenet121 2.834, convnext_tiny 4.456);
# FlopCounterMode counts 2 FLOPs per multiply-add.
@pytest.mark.parametrize("name, gmacs", [("resnet18", 1.814), ("densenet121", 2.834), ("convnext_tiny", 4.456)])
def test_flops_match_torchvision_model_cards(name, gmacs):
    assert _gflops(name) == pytest.approx(2 * gmacs, rel=0.01)


def test_knresnet18_has_twice_the_flops_of_resnet18_at_32px():
    # Issue 3: 2.22 vs 1.11 GFLOP at 32 px.
    assert _gflops("resnet18_cifar", "bn", 32) == pytest.approx(1.11, abs=0.01)
    assert _gflops("knresnet18_cifar", "kn", 32) == pytest.approx(2.22, abs=0.01)


def test_probe_flops_are_the_convolutions_of_the_real_kn_model():
    """The meta probe runs KNConv2d as its conv; the real layer also counts the few FLOPs of its
    statistics (1.4 % on ConvMixer-256/8), so the table's figure is the convolutions' share."""
    torch.manual_seed(0)
    real = forward_flops(create_model("convmixer_256_8", norm="kn"), 32) / 1e9
    probe = _gflops("convmixer_256_8", "kn", 32)
    assert probe == pytest.approx(_gflops("convmixer_256_8", "bn", 32), rel=1e-3)  # same convolutions
    assert probe <= real <= 1.05 * probe


def test_table_lists_every_norm_with_published_counts():
    table = format_table(family="densenet")
    lines = [line.split() for line in table.splitlines()]
    rows = {(r[0], r[2]): r for r in lines if r and r[0].startswith("densenet")}
    assert set(rows) == {
        ("densenet121", "bn*"),
        ("densenet121", "kn"),
        ("densenet_bc100", "bn*"),
        ("densenet_bc100", "kn"),
    }
    assert rows[("densenet121", "bn*")][5] == "7,978,856"  # torchvision
    assert float(rows[("densenet121", "bn*")][6]) == pytest.approx(5.67, abs=0.01)


def test_unknown_family_refused():
    with pytest.raises(ValueError, match="valid families are: .*resnet"):
        format_table(family="resnets")
