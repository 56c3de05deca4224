"""Exponential moving average of a model's weights (Polyak & Juditsky 1992; the ConvNeXt recipe's
`--model_ema true --model_ema_eval true`, timm's ModelEma).

After every optimizer step, for every floating-point parameter and buffer (BatchNorm's running
statistics included, as timm's ModelEmaV3 does): ema <- decay * ema + (1 - decay) * model, as one
`torch._foreach_lerp_` per dtype; integer buffers (num_batches_tracked) are copied. The average starts
from the model it is built from. That is torch.optim.swa_utils.AveragedModel with
`get_ema_multi_avg_fn(decay)` and `use_buffers=True` whose first update is made at step 0
(tests/test_ema.py checks it against AveragedModel). Pure torch: no Ray, no MLflow.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma:
    """An EMA copy of `model` (same device and dtypes), in eval mode and without gradients; `update()` moves
    it towards `model` (the unwrapped module: not its DDP or compiled wrapper)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.source = float(decay), model
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the model's current weights (call after each optimizer step)."""
        ema_float, model_float = [], []
        for ema_v, model_v in zip(self._tensors(self.module), self._tensors(self.source), strict=True):
            if ema_v.is_floating_point():
                ema_float.append(ema_v)
                model_float.append(model_v.detach())
            else:
                ema_v.copy_(model_v)
        if ema_float:
            torch._foreach_lerp_(ema_float, model_float, 1.0 - self.decay)

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)

    def restart(self) -> None:
        """Start the average again from the model's current weights (a resume from a checkpoint without EMA)."""
        self.module.load_state_dict(self.source.state_dict())
