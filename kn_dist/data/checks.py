"""Finding and checking a run's dataset on the driver, before any Ray worker starts.

Everything here reads only .beton headers and per-sample metadata (no image data), so the driver
can refuse bad input with one line (exit 2) instead of a Ray traceback after `max_failures` retries.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kn_dist.config import DataConfig
from kn_dist.data.beton import Beton, check_image_label_fields, open_beton
from kn_dist.data.catalog import spec
from kn_dist.data.splits import SPLITS, old_layout_message, read_splits_file, verify_split_files
from kn_dist.data.writers import SplitPaths, write_dataset
from kn_dist.errors import UserError


def _resolve(data_cfg: DataConfig) -> tuple[SplitPaths, dict[str, Beton]]:
    if (data_cfg.train_path is None) != (data_cfg.val_path is None):
        raise UserError("set both data.train_path and data.val_path, or neither (then data.root/data.dataset is used)")
    if data_cfg.test_path is not None and data_cfg.train_path is None:
        raise UserError("data.test_path needs data.train_path and data.val_path too (or none of the three)")
    if data_cfg.train_path is not None:
        given = (data_cfg.train_path, data_cfg.val_path, data_cfg.test_path)
        paths = SplitPaths(*(Path(p).resolve() if p is not None else None for p in given))
        return paths, {s: open_beton(p) for s, p in zip(SPLITS, paths, strict=True) if p is not None}
    out = Path(data_cfg.root).resolve() / data_cfg.dataset
    meta = read_splits_file(out)
    if meta is None:
        builtin = data_cfg.dataset in ("digits", "synthetic")
        if builtin or data_cfg.source_dir is not None:  # kn_dist can write it (also over an old two-file layout)
            write_dataset(
                data_cfg.dataset,
                out,
                source_dir=data_cfg.source_dir,
                image_size=data_cfg.image_size if builtin else None,
                val_fraction=data_cfg.val_fraction,
            )
            meta = read_splits_file(out)
        elif (out / "train.beton").exists() or (out / "val.beton").exists():
            raise UserError(old_layout_message(out, data_cfg.dataset))
        else:
            raise UserError(
                f"{str(out / 'train.beton')!r} does not exist; write it with `kn-dist data write {data_cfg.dataset} "
                f"--out {out}`"
                + (" --source DIR" if data_cfg.dataset == "imagefolder" else "")
                + " or set data.train_path / data.val_path"
            )
    fraction = data_cfg.val_fraction if data_cfg.dataset == "imagefolder" else None
    betons = verify_split_files(out, meta, data_cfg.dataset, val_fraction=fraction)
    return SplitPaths(*(out / f"{s}.beton" for s in SPLITS)), betons


def resolve_beton_paths(data_cfg: DataConfig) -> SplitPaths:
    """Absolute (train, val, test) .beton paths of `data_cfg`, writing them first where kn_dist can.

    Explicit `train_path`/`val_path` (and optionally `test_path`; test is None without it) win;
    otherwise the files are `<root>/<dataset>/{train,val,test}.beton` with `splits.json`, `root`
    taken relative to the current directory. Missing files are written for digits and synthetic
    (built in), and for cifar10/cifar100/imagefolder when `source_dir` is set; a directory from an
    older kn_dist (train.beton + val.beton, no splits.json: its val.beton is the test set) is
    rewritten the same way, and refused with one line where kn_dist cannot rewrite it. Call this
    on the driver and hand the absolute paths to the workers: Ray Train changes the workers' cwd.
    """
    return _resolve(data_cfg)[0]


def _constant_side(beton: Beton) -> int | None:
    hw = beton.resolutions()
    if (hw == hw[0]).all() and hw[0, 0] == hw[0, 1]:
        return int(hw[0, 0])
    return None


def open_splits(data_cfg: DataConfig, num_classes: int | None, input_size: int | None) -> tuple[dict, dict[str, Beton]]:
    paths, betons = _resolve(data_cfg)
    if input_size is not None and input_size != data_cfg.image_size:
        raise UserError(
            f"data.image_size is {data_cfg.image_size} but the model is built for {input_size}x{input_size} inputs; "
            f"set data.image_size={input_size} (and use a dataset written at that size) or pick another model"
        )
    top = 0
    for beton in betons.values():
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
    info = {
        "train_path": str(paths.train),
        "val_path": str(paths.val),
        "test_path": str(paths.test) if paths.test is not None else None,
        "num_classes": num_classes or spec(data_cfg.dataset).num_classes or top,
        "train_size": betons["train"].num_samples,
        "val_size": betons["val"].num_samples,
        "test_size": betons["test"].num_samples if "test" in betons else None,
        "image_size": data_cfg.image_size,
    }
    return info, betons


def check_dataset(
    data_cfg: DataConfig,
    num_classes: int | None = None,
    input_size: int | None = None,
    world_size: int | None = None,
) -> dict:
    """Validate the dataset of `data_cfg` against the model (and the worker count) before training.

    Checks: the split files are readable kn_dist .beton files (and, under data.root, match their
    splits.json); every label lies in [0, num_classes) (when given); fixed-resolution datasets (all
    but imagefolder) store images of exactly `data_cfg.image_size`; `data_cfg.image_size` equals
    the model's `input_size` (when given); with `world_size`, `check_data_for_workers`.
    Returns `{"train_path", "val_path", "test_path", "num_classes", "train_size", "val_size",
    "test_size", "image_size"}` with absolute paths (test_* None when explicit paths name no test
    file) and `num_classes` = the given value, else the dataset's, else max label + 1.
    """
    info, _ = open_splits(data_cfg, num_classes, input_size)
    if world_size is not None:
        check_data_for_workers(data_cfg, world_size, info)
    return info


def train_shard_size(n_train: int, world_size: int, order: str) -> int:
    """Samples per rank per epoch: FFCV's distributed random order pads to ceil(N / W) (DistributedSampler,
    drop_last=False); our quasi_random shards are the strided `rank::W` cut to N // W."""
    if world_size == 1:
        return n_train
    return math.ceil(n_train / world_size) if order == "random" else n_train // world_size


def check_data_for_workers(data_cfg: DataConfig, world_size: int, info: dict | None = None) -> None:
    """UserError (one sentence naming the value and what is valid) for data settings that would only fail
    inside the Ray workers: a train batch larger than a rank's shard (drop_last: 0 steps), a cutout or
    crop padding not smaller than the image, fewer val or test samples than workers. `info`: the result
    of `check_dataset` (read again when None)."""
    if world_size < 1:
        raise UserError(f"the number of workers must be at least 1, got {world_size}")
    info = info if info is not None else check_dataset(data_cfg)
    shard = train_shard_size(info["train_size"], world_size, data_cfg.order)
    if shard < data_cfg.batch_size:
        raise UserError(
            f"data.batch_size {data_cfg.batch_size} is larger than the {shard} training samples each of {world_size} "
            f"worker(s) reads per epoch ({info['train_size']} in all), which gives 0 steps with drop_last; "
            f"set data.batch_size to at most {shard} or use fewer workers"
        )
    size = data_cfg.image_size
    if data_cfg.cutout >= size:
        raise UserError(
            f"data.cutout {data_cfg.cutout} must be smaller than data.image_size {size} "
            f"(the square lies inside the image); set it to 1..{size - 1}, or 0 to turn cutout off"
        )
    if data_cfg.dataset != "imagefolder" and data_cfg.crop_padding >= size:
        raise UserError(
            f"data.crop_padding {data_cfg.crop_padding} must be smaller than data.image_size {size} "
            f"(a larger shift can move the whole image out of view); set it to 0..{size - 1}"
        )
    for split in ("val", "test"):
        n = info[f"{split}_size"]
        if n is not None and n < world_size:
            raise UserError(
                f"the {split} split has {n} samples, fewer than the {world_size} workers that each evaluate a "
                f"share of it; use at most {n} workers (scaling.num_workers) or a larger {split} split"
            )


def inspect_dataset(directory: str | Path) -> dict:
    """Each split of a dataset directory (from splits.json and the files): size, source, class balance."""
    out = Path(directory).resolve()
    meta = read_splits_file(out)
    if meta is None:
        if (out / "train.beton").exists() or (out / "val.beton").exists():
            raise UserError(old_layout_message(out, out.name))
        raise UserError(f"{str(out)!r} holds no splits.json; write the dataset with `kn-dist data write`")
    betons = verify_split_files(out, meta, meta.get("dataset"))
    info: dict = {"path": str(out), "dataset": meta["dataset"], "split_seed": meta["split_seed"]}
    info["val_fraction"] = meta.get("val_fraction")
    info["splits"] = {}
    for split, beton in betons.items():
        counts = np.bincount(beton.labels())
        hw = beton.resolutions()
        info["splits"][split] = {
            "file": str(beton.path),
            "num_samples": beton.num_samples,
            "source": meta["splits"][split]["source"],
            "classes": int((counts > 0).sum()),
            "per_class_min": int(counts[counts > 0].min()),
            "per_class_max": int(counts.max()),
            "resolution": f"{hw[0, 0]}x{hw[0, 1]}" if (hw == hw[0]).all() else "variable",
            "index_sha256": meta["splits"][split]["index_sha256"],
        }
    return info
