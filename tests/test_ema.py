"""kn_dist.ema.ModelEma against torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn and use_buffers
(the EMA of parameters and buffers; its first update copies, so it is updated once at step 0), over real SGD
steps of a model with BatchNorm running statistics."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kn_dist.ema import ModelEma


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)
    )


def test_ema_equals_averaged_model_with_the_ema_multi_avg_fn():
    decay = 0.9
    model = _model()
    ema = ModelEma(model, decay)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    reference.update_parameters(model)  # W_0^EMA = W_0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y = torch.randn(8, 3, 10, 10, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update()
        reference.update_parameters(model)
    ours, theirs = ema.module.state_dict(), reference.module.state_dict()
    moved = 0
    for key, value in ours.items():
        if value.is_floating_point():  # parameters and BN running mean / var
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-7)
            moved += not torch.equal(value, model.state_dict()[key])
        else:  # num_batches_tracked: copied (timm's ModelEmaV3), not averaged
            assert torch.equal(value, model.state_dict()[key])
    assert moved >= 6  # the average really lags the trained weights
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_state_round_trip_and_restart():
    model = _model()
    ema = ModelEma(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    other = ModelEma(_model(), 0.5)
    other.load_state_dict(saved)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in saved.items())
    ema.restart()
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in model.state_dict().items())
