"""Per-rank FFCV loaders: train (augmented, seeded), val and test (plain decode, exact counts).

Pipelines are explicit lists of FFCV operations (as in ffcv-imagenet / ffcv-cifar). Images are
normalised by our own operations, never with FFCV's `NormalizeImage`: on CPU a `NormalizeImage`
placed after `ToTensor` hangs in `Loader.__init__` (libffcv/ffcv#396). Both paths put
`augment.SeededAugment` (translate / flip / cutout as functions of (seed, epoch, sample index))
right after the decoder: on CPU it also converts to normalised float32; on GPU it stays uint8,
which goes to the device and is converted and normalised there. Only the image and label fields
are decoded; the `index` field (and any other) is switched off (pipeline `None`). With RandAugment &
co. configured, both paths end in the same `strong_augment.StrongAugment` op instead (uint8 in,
normalised float32 out, on the batch's device).
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kn_dist.config import DataConfig
from kn_dist.data import strong_augment
from kn_dist.data.augment import RepeatedPasses, SeededAugment, SeededLoader
from kn_dist.data.beton import Beton
from kn_dist.data.catalog import spec
from kn_dist.data.checks import check_data_for_workers, open_splits
from kn_dist.data.global_batch import GlobalOrder, accumulation_steps
from kn_dist.data.imagenet_pipeline import ScheduledLoader, eval_decoder, resolution_at, train_decoder
from kn_dist.errors import UserError

MAX_DEFAULT_WORKERS = 8


class Normalize(nn.Module):
    """(x - mean) / std per channel on a float NCHW batch of 0..255 values (GPU path; keeps the memory format)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def default_num_workers() -> int:
    """Loader threads when `data.num_workers` is unset: OMP_NUM_THREADS (Ray sets it to the CPUs of each
    worker), else the CPUs this process may use, capped at 8 — never every core of a shared node."""
    cores = len(os.sched_getaffinity(0))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    n = int(omp) if omp.isdigit() and int(omp) > 0 else min(cores, MAX_DEFAULT_WORKERS)
    return max(1, min(n, cores))


def _pipelines(data_cfg: DataConfig, beton: Beton, device: torch.device, channels_last: bool, train: bool, seed: int):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage

    s = spec(data_cfg.dataset)
    mean255 = tuple(255.0 * m for m in s.mean)
    if data_cfg.normalization == "unit":  # x / 255 only, as the KernelNorm paper trains its KN models
        mean, std = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    else:
        mean, std = mean255, tuple(255.0 * v for v in s.std)

    fixed = data_cfg.dataset != "imagefolder"
    # Cutout fills with the mean colour: DeVries & Taylor 2017 cut out after normalisation (0 = the mean).
    augment = {
        "pad": data_cfg.crop_padding if train and fixed else 0,
        "flip": train and data_cfg.hflip,
        "cutout": data_cfg.cutout if train else 0,
        "cutout_fill": tuple(float(round(m)) for m in mean255),
    }
    if fixed:
        image: list = [SimpleRGBImageDecoder()]
    elif train:  # variable resolution: seeded RandomResizedCrop inside the decoder (imagenet_pipeline)
        image = [train_decoder(data_cfg, seed)]
    else:  # centre crop of data.val_crop_ratio x the short side, at the evaluation side
        image = [eval_decoder(data_cfg)]
    label: list = [IntDecoder(), ToTensor()]
    if train and strong_augment.enabled(data_cfg):  # RandAugment & co.: one StrongAugment op on both paths
        image += strong_augment.pipeline_tail(data_cfg, seed, augment, mean, std, device, channels_last)
        if device.type == "cuda":
            label.append(ToDevice(device, non_blocking=True))
    elif uses_device_pipeline(data_cfg, device):  # ship uint8 (4x fewer bytes), convert and normalise on the GPU
        if augment["pad"] or augment["flip"] or augment["cutout"]:
            image.append(SeededAugment(seed, **augment))
        image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=channels_last)]
        image += [Convert(torch.float32), Normalize(mean, std, device)]
        label.append(ToDevice(device, non_blocking=True))
    else:
        image += [SeededAugment(seed, **augment, normalize=(mean, std), channels_last=channels_last), ToTensor()]
        if channels_last:
            image.append(ToTorchImage(channels_last=True))  # (B, H, W, C) -> NCHW view, channels_last format
    label.append(Squeeze(1))  # (B, 1) -> (B,)
    unused = {name: None for name in beton.fields if name not in ("image", "label")}  # e.g. the split `index`
    return {"image": image, "label": label, **unused}


def uses_device_pipeline(data_cfg: DataConfig, device: torch.device) -> bool:
    """Whether the pipelines take the GPU branch (uint8 to `device`, converted and normalised there, as
    ffcv-cifar): on CUDA unless `data.device_pipeline` says otherwise; "on" selects it on a CPU too, where the
    CPU-only machines that build kn_dist check it (tests/data/test_device_pipeline.py). The RandAugment & co.
    tail (`strong_augment.pipeline_tail`) follows the device alone."""
    return data_cfg.device_pipeline == "on" or (data_cfg.device_pipeline == "auto" and device.type == "cuda")


def _require_group(rank: int, world_size: int) -> None:
    if world_size > 1 and not (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() == world_size
        and dist.get_rank() == rank
    ):
        raise RuntimeError(f"loaders(rank={rank}, world_size={world_size}) needs the matching process group first")


def _common(data_cfg: DataConfig) -> dict:
    import numba

    workers = data_cfg.num_workers or default_num_workers()
    workers = min(workers, numba.config.NUMBA_NUM_THREADS)  # FFCV sets numba's thread count to this
    return {"num_workers": workers, "os_cache": data_cfg.os_cache, "batches_ahead": data_cfg.batches_ahead}


def train_loader(
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    *,
    seed: int = 0,
    channels_last: bool = False,
    global_batch: int | None = None,
) -> SeededLoader | RepeatedPasses:
    """The training Loader of this rank. Batches are (float32 NCHW images, int64 labels) on `device`.

    Decode, random translate by up to `crop_padding` px (= RandomCrop with zero padding) or, for
    imagefolder, RandomResizedCrop; horizontal flip; optional cutout; drop_last. Translate, flip and
    cutout are functions of (seed, epoch, sample index) (`kn_dist.data.augment`): set
    `loader.next_epoch = e` to get epoch e's batches exactly. With world_size > 1 and order "random",
    FFCV's `distributed=True` shards like PyTorch's DistributedSampler (seeded by `seed`, reshuffled
    every epoch, the last shard padded with repeats so every rank runs the same number of steps).
    QUASI_RANDOM has no distributed mode in FFCV, so there each rank reads the fixed strided shard
    `rank::world_size` cut to N // world_size. With `global_batch` (scaling.global_batch_size), the order is
    `GlobalOrder` instead: one permutation for every world size, so every optimizer step holds the same
    samples on any number of workers (kn_dist.data.global_batch), and `loader.accumulation` is the number of
    batches per optimizer step on this world size. imagefolder: the side of each epoch's crops follows
    data.progressive (`loader.current_resolution`); `loader.epoch_facts()` records side, world and accumulation.

    RandAugment / AutoAugment, colour jitter and random erasing (`kn_dist.data.strong_augment`) follow
    when configured, seeded the same way; `data.repeated_augmentation` > 1 makes an epoch that many
    passes (`augment.RepeatedPasses`).
    """
    from ffcv.loader import OrderOption

    _require_group(rank, world_size)
    info, betons = open_splits(data_cfg, None, None)
    check_data_for_workers(data_cfg, world_size, info)
    n_train = info["train_size"]
    quasi = data_cfg.order == "quasi_random"
    order: dict = {"order": OrderOption.QUASI_RANDOM if quasi else OrderOption.RANDOM, "seed": seed}
    if world_size > 1 and quasi:
        order["indices"] = np.arange(rank, n_train, world_size, dtype=np.uint64)[: n_train // world_size]
    elif world_size > 1:
        order["distributed"] = True
    traversal = None
    if global_batch is not None:
        traversal = GlobalOrder(n_train, seed, global_batch, rank, world_size)
        order = {"order": OrderOption.SEQUENTIAL, "seed": seed}  # built by FFCV, replaced by `traversal`
    passes = data_cfg.repeated_augmentation  # FFCV epoch p of training epoch e is passes * e + p
    loader = ScheduledLoader(
        info["train_path"],
        batch_size=data_cfg.batch_size,
        drop_last=True,
        pipelines=_pipelines(data_cfg, betons["train"], device, channels_last, train=True, seed=seed),
        resolution=lambda ffcv_epoch: resolution_at(ffcv_epoch // passes, data_cfg),  # fixed size: image_size
        traversal=traversal,
        world_size=world_size,
        accumulation=accumulation_steps(global_batch, data_cfg.batch_size, world_size),
        **order,
        **_common(data_cfg),
    )
    return RepeatedPasses(loader, data_cfg.repeated_augmentation) if data_cfg.repeated_augmentation > 1 else loader


def eval_loader(
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    *,
    split: Literal["val", "test"] = "val",
    channels_last: bool = False,
) -> SeededLoader:
    """The val (or test) Loader of this rank: plain decode (imagefolder: centre crop of data.val_crop_ratio),
    sequential order, no drop_last, NOT FFCV-distributed.

    Each rank reads the strided shard `rank::world_size` with no padding, so the shards are disjoint
    and cover the split exactly once (33 samples on 2 ranks: 17 + 16): sum correct counts and sample
    counts over ranks (one all_reduce after the loop) for exact accuracy. `loader.indices` holds this
    rank's sample ids and `len(loader.indices)` its true count; ranks may run different numbers of
    batches, so do no collective per batch (evaluate the unwrapped module, not the DDP wrapper).
    Build the test loader only where test is meant to be opened (final runs, once, at the end).
    """
    from ffcv.loader import OrderOption

    if split not in ("val", "test"):
        raise UserError(f"split {split!r} has no evaluation loader; use 'val' or 'test'")
    _require_group(rank, world_size)
    info, betons = open_splits(data_cfg, None, None)
    if info[f"{split}_path"] is None:
        raise UserError(f"no {split} split: set data.{split}_path beside data.train_path, or use data.root")
    check_data_for_workers(data_cfg, world_size, info)
    return SeededLoader(
        info[f"{split}_path"],
        batch_size=data_cfg.val_batch_size or data_cfg.batch_size,
        order=OrderOption.SEQUENTIAL,
        indices=np.arange(rank, info[f"{split}_size"], world_size, dtype=np.uint64),
        drop_last=False,
        pipelines=_pipelines(data_cfg, betons[split], device, channels_last, train=False, seed=0),
        **_common(data_cfg),
    )


def loaders(
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    *,
    seed: int = 0,
    channels_last: bool = False,
) -> tuple[SeededLoader | RepeatedPasses, SeededLoader]:
    """(train, val) Loaders for this rank: `train_loader` and `eval_loader(split="val")` (see both).

    Normalisation: per-dataset mean/std, or /255 only (`data_cfg.normalization == "unit"`). With
    world_size > 1 the process group must already exist (FFCV's sampler reads it); this function
    never creates one. Each Loader JIT-compiles its decoders on first iteration: build once per worker.
    """
    train = train_loader(data_cfg, rank, world_size, device, seed=seed, channels_last=channels_last)
    return train, eval_loader(data_cfg, rank, world_size, device, split="val", channels_last=channels_last)
