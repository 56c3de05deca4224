"""mixup (Zhang et al., ICLR 2018) and cutmix (Yun et al., ICCV 2019) of a training batch, seeded per batch.

A batch is paired with itself rolled by one (image i with image i - 1), as torchvision's v2.MixUp and
v2.CutMix do; the mixed targets are lam * one_hot(y) + (1 - lam) * one_hot(y rolled). With both
alphas set, timm's Mixup switch decides per batch: mixed at all with probability `mix_prob`, then
cutmix with probability `mix_switch_prob`, else mixup; with one alpha set, that one. cutmix's box is
torchvision's: centre (r_x, r_y) uniform over the pixels, half-sides int(r W), int(r H) with
r = sqrt(1 - lam) / 2, clipped to the image, and lam corrected to the area actually kept.

The draws are a pure function of (seed, epoch, batch index, rank): SplitMix64 (as kn_dist.data.augment)
keyed by splitmix64(splitmix64(splitmix64(splitmix64(seed ^ MIX_STREAM) ^ epoch) ^ batch) ^ rank), slot j
= splitmix64(key + j * golden): 0 whether to mix, 1 the switch, 2 lam, 3 r_x, 4 r_y. lam =
F^-1(u) of Beta(alpha, alpha) at uniform u (scipy's betaincinv), so a run and its resume mix alike and
no RNG state is kept. Pure torch on whatever device the batch is on; no Ray, no FFCV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kn_dist.config import OptimConfig

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
MIX_STREAM = 0x6D69787570  # "mixup": keeps batch keys apart from the per-sample keys of the same seed
SLOT_APPLY, SLOT_SWITCH, SLOT_LAM, SLOT_X, SLOT_Y = range(5)


def _splitmix64(z: int) -> int:
    z = (z + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _uniform(key: int, slot: int) -> float:
    return (_splitmix64((key + slot * _GOLDEN) & _M64) >> 11) * 2.0**-53


@dataclass(frozen=True)
class Mix:
    """One batch's mixing: kind, the weight of each image's own label (cutmix: of the area it keeps),
    cutmix's box (x1, y1, x2, y2), and the draws behind them (the Beta variate, cutmix's centre)."""

    kind: Literal["none", "mixup", "cutmix"]
    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None
    beta: float = 1.0
    centre: tuple[int, int] | None = None  # (r_x, r_y)


def beta_quantile(u: float, alpha: float) -> float:
    """The u-quantile of Beta(alpha, alpha)."""
    from scipy.special import betaincinv

    return float(betaincinv(alpha, alpha, u))


def cutmix_box(lam: float, r_x: int, r_y: int, height: int, width: int) -> tuple[tuple[int, int, int, int], float]:
    """torchvision's CutMix box around (r_x, r_y) for weight lam, and the lam of the area actually kept."""
    r = 0.5 * math.sqrt(1.0 - lam)
    half_w, half_h = int(r * width), int(r * height)
    x1, y1 = max(r_x - half_w, 0), max(r_y - half_h, 0)
    x2, y2 = min(r_x + half_w, width), min(r_y + half_h, height)
    return (x1, y1, x2, y2), 1.0 - (x2 - x1) * (y2 - y1) / (width * height)


def draw(cfg: OptimConfig, seed: int, epoch: int, batch: int, rank: int, height: int, width: int) -> Mix:
    """The mixing of batch `batch` (0-based, within the epoch) of rank `rank` at 0-based `epoch`."""
    if not (cfg.mixup_alpha or cfg.cutmix_alpha):
        return Mix("none")
    key = _splitmix64((seed ^ MIX_STREAM) & _M64)
    for part in (epoch, batch, rank):
        key = _splitmix64(key ^ part)
    if _uniform(key, SLOT_APPLY) >= cfg.mix_prob:
        return Mix("none")
    if cfg.mixup_alpha and cfg.cutmix_alpha:
        cutmix = _uniform(key, SLOT_SWITCH) < cfg.mix_switch_prob
    else:
        cutmix = cfg.cutmix_alpha > 0
    lam = beta_quantile(_uniform(key, SLOT_LAM), cfg.cutmix_alpha if cutmix else cfg.mixup_alpha)
    if not cutmix:
        return Mix("mixup", lam, beta=lam)
    r_x, r_y = int(_uniform(key, SLOT_X) * width), int(_uniform(key, SLOT_Y) * height)
    box, kept = cutmix_box(lam, r_x, r_y, height, width)
    return Mix("cutmix", kept, box, beta=lam, centre=(r_x, r_y))


def mix_images(images: torch.Tensor, mix: Mix) -> torch.Tensor:
    """The mixed (N, C, H, W) batch; image i is paired with image i - 1 (the batch rolled by one)."""
    if mix.kind == "none":
        return images
    rolled = images.roll(1, 0)
    if mix.kind == "mixup":
        return rolled.mul_(1.0 - mix.lam).add_(images.mul(mix.lam))
    x1, y1, x2, y2 = mix.box
    out = images.clone()
    out[..., y1:y2, x1:x2] = rolled[..., y1:y2, x1:x2]
    return out


def mix_targets(labels: torch.Tensor, mix: Mix, num_classes: int) -> torch.Tensor:
    """(N, num_classes) float32 targets lam * one_hot(y) + (1 - lam) * one_hot(y rolled by one)."""
    one_hot = F.one_hot(labels, num_classes).float()
    return one_hot.roll(1, 0).mul_(1.0 - mix.lam).add_(one_hot.mul(mix.lam))


class BatchMixer:
    """Mixes the batches of one rank: `mixer.epoch = e` (0-based), then `mixer(images, batch)` per batch;
    `mix_targets(labels, mix, classes)` gives the targets once the number of classes is known."""

    def __init__(self, cfg: OptimConfig, seed: int, rank: int) -> None:
        self.cfg, self.seed, self.rank, self.epoch = cfg, seed, rank, 0

    def __call__(self, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, Mix]:
        mix = draw(self.cfg, self.seed, self.epoch, batch, self.rank, images.shape[-2], images.shape[-1])
        return mix_images(images, mix), mix
