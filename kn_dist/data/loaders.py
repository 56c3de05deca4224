"""FFCV loaders for training and validation, and the checks the driver runs before training starts.

Pipelines are explicit lists of FFCV operations (as in ffcv-imagenet / ffcv-cifar). Images are
normalised by our own operations, never with FFCV's `NormalizeImage`: on CPU a `NormalizeImage`
placed after `ToTensor` hangs in `Loader.__init__` (libffcv/ffcv#396). CPU: a compiled
uint8 -> float32 augmenting and normalising op before `ToTensor`; GPU: FFCV's augmentations,
uint8 to the device, then torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kn_dist.config import DataConfig
from kn_dist.data.beton import Beton, check_image_label_fields, open_beton
from kn_dist.data.catalog import spec
from kn_dist.data.writers import write_dataset
from kn_dist.errors import UserError

# Validation centre crop for variable-resolution (ImageNet-style) data: resize-224-of-256 convention.
CENTER_CROP_RATIO = 224 / 256
MAX_DEFAULT_WORKERS = 8


class Normalize(nn.Module):
    """(x - mean) / std per channel on a float NCHW batch of 0..255 values (GPU path; keeps the memory format)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _augment_normalize_op(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    channels_last: bool,
    *,
    pad: int = 0,
    flip: bool = False,
    cutout: int = 0,
    cutout_fill: tuple[float, ...] = (0.0, 0.0, 0.0),
):
    """CPU path: one compiled FFCV operation from uint8 (B, H, W, C) to normalised float32 (B, C, H, W)
    (or (B, H, W, C) for channels_last, which ToTorchImage then views as NCHW without a copy), doing
    the training augmentations on the way.

    Per image: translate by (dy, dx) uniform in [-pad, pad] with zero fill (= RandomCrop(padding=pad)),
    then flip with probability 0.5, then cut out a `cutout` square (fully inside, as ffcv's Cutout) filled
    with `cutout_fill` — the same distribution as ffcv's RandomTranslate, RandomHorizontalFlip and Cutout
    in that order. Why fused: every FFCV operation is its own parallel region, and on a busy CPU each
    region and torch's permute-copy + float + normalise cost more than the decode itself (measured here:
    ~3k images/s with separate ops and torch normalisation, ~100k decode-only).
    """
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class AugmentNormalize(Operation):
        def generate_code(self):
            my_range = Compiler.get_iterator()
            shift = np.asarray(mean, dtype=np.float32)
            scale = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)
            fill = np.asarray(cutout_fill, dtype=np.float32)
            nhwc = channels_last

            def augment_normalize(images, dst):
                n, h, w, c = images.shape
                for i in my_range(n):
                    dy = np.random.randint(0, 2 * pad + 1) - pad if pad > 0 else 0
                    dx = np.random.randint(0, 2 * pad + 1) - pad if pad > 0 else 0
                    mirrored = flip and np.random.random() < 0.5
                    cy = np.random.randint(0, h - cutout + 1) if cutout > 0 else -h
                    cx = np.random.randint(0, w - cutout + 1) if cutout > 0 else -w
                    # channel-outer loops: NCHW output rows are written contiguously
                    for k in range(c):
                        g = scale[k]
                        outside = -shift[k] * g  # zero fill, normalised
                        cut_value = (fill[k] - shift[k]) * g
                        for y in range(h):
                            sy = y + dy
                            row_in = 0 <= sy < h
                            row_cut = cy <= y < cy + cutout
                            for x in range(w):
                                sx = (w - 1 - x if mirrored else x) + dx
                                if row_cut and cx <= x < cx + cutout:
                                    v = cut_value
                                elif row_in and 0 <= sx < w:
                                    v = (np.float32(images[i, sy, sx, k]) - shift[k]) * g
                                else:
                                    v = outside
                                if nhwc:
                                    dst[i, y, x, k] = v
                                else:
                                    dst[i, k, y, x] = v
                return dst[:n]

            augment_normalize.is_parallel = True
            return augment_normalize

        def declare_state_and_memory(self, previous_state):
            h, w, c = previous_state.shape
            shape = (h, w, c) if channels_last else (c, h, w)
            dtype = np.dtype("<f4")
            return replace(previous_state, shape=shape, dtype=dtype, jit_mode=True), AllocationQuery(shape, dtype)

    return AugmentNormalize()


def resolve_beton_paths(data_cfg: DataConfig) -> tuple[Path, Path]:
    """Absolute (train, val) .beton paths of `data_cfg`, writing them first where kn_dist can.

    Explicit `train_path`/`val_path` win; otherwise the files are `<root>/<dataset>/{train,val}.beton`,
    `root` taken relative to the current directory. Missing files are written for digits and
    synthetic (built in), and for cifar10/cifar100/imagefolder when `source_dir` is set; otherwise a
    UserError says which command writes them. Call this on the driver and hand the absolute paths to
    the workers (e.g. set `data_cfg.train_path`/`val_path`): Ray Train changes the workers' cwd.
    """
    if (data_cfg.train_path is None) != (data_cfg.val_path is None):
        raise UserError("set both data.train_path and data.val_path, or neither (then data.root/data.dataset is used)")
    if data_cfg.train_path is not None:
        paths = (Path(data_cfg.train_path).resolve(), Path(data_cfg.val_path).resolve())
        for path in paths:
            open_beton(path)
        return paths
    out = Path(data_cfg.root).resolve() / data_cfg.dataset
    train, val = out / "train.beton", out / "val.beton"
    if train.exists() and val.exists():
        return train, val
    builtin = data_cfg.dataset in ("digits", "synthetic")
    if not builtin and data_cfg.source_dir is None:
        raise UserError(
            f"{str(train)!r} does not exist; write it with `kn-dist data write {data_cfg.dataset} --out {out}`"
            + (" --source DIR" if data_cfg.dataset == "imagefolder" else "")
            + " or set data.train_path / data.val_path"
        )
    image_size = data_cfg.image_size if builtin else None
    return write_dataset(data_cfg.dataset, out, source_dir=data_cfg.source_dir, image_size=image_size)


def _constant_side(beton: Beton) -> int | None:
    hw = beton.resolutions()
    if (hw == hw[0]).all() and hw[0, 0] == hw[0, 1]:
        return int(hw[0, 0])
    return None


def check_dataset(data_cfg: DataConfig, num_classes: int | None = None, input_size: int | None = None) -> dict:
    """Validate the dataset of `data_cfg` against the model before training; UserError on any mismatch.

    Checks: both files are readable kn_dist .beton files; every label lies in [0, num_classes) (when
    given); fixed-resolution datasets (all but imagefolder) store images of exactly
    `data_cfg.image_size`; `data_cfg.image_size` equals the model's `input_size` (when given).
    Returns `{"train_path", "val_path", "num_classes", "train_size", "val_size", "image_size"}` with
    absolute paths and `num_classes` = the given value, else the dataset's, else max label + 1.
    """
    paths = resolve_beton_paths(data_cfg)
    if input_size is not None and input_size != data_cfg.image_size:
        raise UserError(
            f"data.image_size is {data_cfg.image_size} but the model is built for {input_size}x{input_size} inputs; "
            f"set data.image_size={input_size} (and use a dataset written at that size) or pick another model"
        )
    betons = [open_beton(p) for p in paths]
    top = 0
    for beton in betons:
        check_image_label_fields(beton)
        labels = beton.labels()
        lo, hi = int(labels.min()), int(labels.max())
        top = max(top, hi + 1)
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            raise UserError(
                f"{str(beton.path)!r} has labels in [{lo}, {hi}] but the model has {num_classes} classes; "
                f"labels must lie in [0, {num_classes}) (set model num_classes to at least {hi + 1})"
            )
        if data_cfg.dataset != "imagefolder" and _constant_side(beton) != data_cfg.image_size:
            hw = beton.resolutions()
            found = f"{hw[0, 0]}x{hw[0, 1]}" if (hw == hw[0]).all() else "mixed resolutions"
            raise UserError(
                f"{str(beton.path)!r} holds {found} images but data.image_size is {data_cfg.image_size}; "
                f"set data.image_size to the stored size or rewrite the dataset at {data_cfg.image_size}"
            )
    return {
        "train_path": str(paths[0]),
        "val_path": str(paths[1]),
        "num_classes": num_classes or spec(data_cfg.dataset).num_classes or top,
        "train_size": betons[0].num_samples,
        "val_size": betons[1].num_samples,
        "image_size": data_cfg.image_size,
    }


def default_num_workers() -> int:
    """Loader threads when `data.num_workers` is unset: OMP_NUM_THREADS (Ray sets it to the CPUs of each
    worker), else the CPUs this process may use, capped at 8 — never every core of a shared node."""
    cores = len(os.sched_getaffinity(0))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    n = int(omp) if omp.isdigit() and int(omp) > 0 else min(cores, MAX_DEFAULT_WORKERS)
    return max(1, min(n, cores))


def _pipelines(data_cfg: DataConfig, device: torch.device, channels_last: bool, train: bool) -> dict:
    from ffcv.fields.decoders import (
        CenterCropRGBImageDecoder,
        IntDecoder,
        RandomResizedCropRGBImageDecoder,
        SimpleRGBImageDecoder,
    )
    from ffcv.transforms import (
        Convert,
        Cutout,
        RandomHorizontalFlip,
        RandomTranslate,
        Squeeze,
        ToDevice,
        ToTensor,
        ToTorchImage,
    )

    s = spec(data_cfg.dataset)
    size = data_cfg.image_size
    mean255 = tuple(255.0 * m for m in s.mean)
    if data_cfg.normalization == "unit":  # x / 255 only, as the KernelNorm paper trains its KN models
        mean, std = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    else:
        mean, std = mean255, tuple(255.0 * v for v in s.std)

    fixed = data_cfg.dataset != "imagefolder"
    pad = data_cfg.crop_padding if train and fixed else 0
    flip = train and data_cfg.hflip
    cutout = data_cfg.cutout if train else 0
    # Cutout fills with the mean colour: DeVries & Taylor 2017 cut out after normalisation (0 = the mean).
    cut_fill = tuple(float(round(m)) for m in mean255)
    if fixed:
        image: list = [SimpleRGBImageDecoder()]
    elif train:  # variable resolution: ImageNet-style crops inside the decoder
        image = [RandomResizedCropRGBImageDecoder((size, size))]
    else:
        image = [CenterCropRGBImageDecoder((size, size), ratio=CENTER_CROP_RATIO)]
    label: list = [IntDecoder(), ToTensor()]
    if device.type == "cuda":  # ship uint8 (4x fewer bytes), convert and normalise on the GPU (as ffcv-cifar)
        if pad:  # same distribution as torchvision RandomCrop(size, padding=pad) with its zero fill
            image.append(RandomTranslate(padding=pad, fill=(0, 0, 0)))
        if flip:
            image.append(RandomHorizontalFlip())
        if cutout:
            image.append(Cutout(cutout, fill=tuple(int(v) for v in cut_fill)))
        image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=channels_last)]
        image += [Convert(torch.float32), Normalize(mean, std, device)]
        label.append(ToDevice(device, non_blocking=True))
    else:
        op = _augment_normalize_op(mean, std, channels_last, pad=pad, flip=flip, cutout=cutout, cutout_fill=cut_fill)
        image += [op, ToTensor()]
        if channels_last:
            image.append(ToTorchImage(channels_last=True))  # (B, H, W, C) -> NCHW view, channels_last format
    label.append(Squeeze(1))  # (B, 1) -> (B,)
    return {"image": image, "label": label}


def loaders(
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    *,
    seed: int = 0,
    channels_last: bool = False,
):
    """(train, val) FFCV Loaders for this rank. Batches are (float32 NCHW images, int64 labels) on `device`.

    Train: decode, random translate by up to `crop_padding` px (= RandomCrop with zero padding) or,
    for imagefolder, RandomResizedCrop; horizontal flip; optional cutout; drop_last. With
    world_size > 1 and order "random", FFCV's `distributed=True` shards it like PyTorch's
    DistributedSampler (seeded by `seed`, reshuffled every epoch, the last shard padded with
    repeats so every rank runs the same number of steps). QUASI_RANDOM has no distributed mode in
    FFCV, so there each rank reads the fixed strided shard `rank::world_size` truncated to N // world_size.

    Val: plain decode (imagefolder: centre crop of ratio 224/256), sequential order, no drop_last,
    NOT FFCV-distributed. Each rank reads the strided shard `rank::world_size` with no padding, so the
    shards are disjoint and cover the set exactly once: sum correct counts and sample counts over
    ranks (one all_reduce after the loop) for exact accuracy. `val.indices` holds this rank's sample
    ids and `len(val.indices)` its true count; ranks may run different numbers of val batches, so do
    no collective per batch (evaluate the unwrapped module, not the DDP wrapper).

    Normalisation: per-dataset mean/std, or /255 only (`data_cfg.normalization == "unit"`), in torch.
    With world_size > 1 the process group must already exist (FFCV's sampler reads it); this function
    never creates one. Each Loader JIT-compiles its pipeline on first iteration: build once per worker.
    """
    from ffcv.loader import Loader, OrderOption

    if world_size > 1 and not (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() == world_size
        and dist.get_rank() == rank
    ):
        raise RuntimeError(f"loaders(rank={rank}, world_size={world_size}) needs the matching process group first")
    info = check_dataset(data_cfg)
    n_train, n_val = info["train_size"], info["val_size"]
    if n_train // world_size < data_cfg.batch_size:
        raise UserError(
            f"the training set has {n_train} samples, fewer than batch_size {data_cfg.batch_size} per each of "
            f"{world_size} workers; lower data.batch_size"
        )
    if data_cfg.cutout > data_cfg.image_size:
        raise UserError(f"data.cutout {data_cfg.cutout} is larger than data.image_size {data_cfg.image_size}")
    if n_val < world_size:
        raise UserError(f"the validation set has {n_val} samples, fewer than the {world_size} workers")
    workers = data_cfg.num_workers or default_num_workers()
    import numba

    workers = min(workers, numba.config.NUMBA_NUM_THREADS)  # FFCV sets numba's thread count to this
    common = {"num_workers": workers, "os_cache": data_cfg.os_cache, "batches_ahead": data_cfg.batches_ahead}

    quasi = data_cfg.order == "quasi_random"
    train_kw: dict = {"order": OrderOption.QUASI_RANDOM if quasi else OrderOption.RANDOM, "seed": seed}
    if world_size > 1 and quasi:
        train_kw["indices"] = np.arange(rank, n_train, world_size, dtype=np.uint64)[: n_train // world_size]
    elif world_size > 1:
        train_kw["distributed"] = True
    train = Loader(
        info["train_path"],
        batch_size=data_cfg.batch_size,
        drop_last=True,
        pipelines=_pipelines(data_cfg, device, channels_last, train=True),
        **train_kw,
        **common,
    )
    val = Loader(
        info["val_path"],
        batch_size=data_cfg.val_batch_size or data_cfg.batch_size,
        order=OrderOption.SEQUENTIAL,
        indices=np.arange(rank, n_val, world_size, dtype=np.uint64),
        drop_last=False,
        pipelines=_pipelines(data_cfg, device, channels_last, train=False),
        **common,
    )
    return train, val
