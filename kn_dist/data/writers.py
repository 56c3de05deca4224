"""Datasets to FFCV .beton files: `train.beton`, `val.beton`, `test.beton` and `splits.json` per dataset.

Every file has three fields: `image` (RGBImageField), `label` (IntField) and `index` (IntField, the
sample's position in its source, see `kn_dist.data.splits`). Image folders are written the way
ffcv-imagenet's write_imagenet.py does: longest side at most `max_side` (OpenCV INTER_AREA), a share
`compress_probability` of the images as JPEG of `jpeg_quality` and the rest raw pixels (its
`write_mode=proportion`; ffcv-imagenet: 400 px, 10 % JPEG for ResNet-18, 500 px, 50 % for ResNet-50).
Which images are JPEG is a hash of their pixels, not FFCV's draw from np.random in each writer process,
so writing the same folder twice gives the same files. Writing is atomic and idempotent: a
file is written under a temporary name in the same directory, validated, then renamed, so a
complete file at the final name is never confused with an interrupted one; `splits.json` is
written last, and a directory holding it is reused as it is (delete the directory to rewrite).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import resizer
from ffcv.writer import DatasetWriter

from kn_dist.data.beton import open_beton
from kn_dist.data.catalog import spec
from kn_dist.data.sources import (
    CIFAR_ARCHIVES,
    SYNTHETIC_DEFAULT_SAMPLES,
    ArrayDataset,
    SyntheticDataset,
    cifar_arrays,
    default_cache_dir,
    digits_arrays,
    imagefolder_pools,
)
from kn_dist.data.splits import (
    CIFAR_VAL_FRACTION,
    DEFAULT_VAL_FRACTION,
    DIGITS_TEST_SIZE,
    DIGITS_VAL_SIZE,
    SPLIT_SEED,
    SPLITS,
    holdout_split,
    read_splits_file,
    split_record,
    verify_split_files,
    write_splits_file,
)
from kn_dist.errors import UserError

PROGRESS_BAR_FROM = 20_000  # images: smaller sets are written in seconds, without a progress bar


class SplitPaths(NamedTuple):
    """Absolute paths of a dataset's three split files."""

    train: Path
    val: Path
    test: Path


@dataclass(frozen=True)
class SplitPlan:
    """Which samples of `pool` (an indexable of (image, label)) one split holds."""

    pool: object
    source: str  # the pool's name: splits with the same source must be disjoint
    indices: np.ndarray  # sorted positions in the pool
    labels: np.ndarray


class _Subset:
    """(image, label, source index) of `pool[indices[i]]`: what `write_beton(..., with_index=True)` stores."""

    def __init__(self, pool, indices: np.ndarray):
        self.pool, self.indices = pool, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        image, label = self.pool[int(self.indices[i])]
        return image, label, int(self.indices[i])


def _writer_procs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def jpeg_draw(image: np.ndarray) -> float:
    """A number in [0, 1) fixed by the image's pixels: the image is stored as JPEG when it is below the
    compress probability (BLAKE2b of the bytes, 64 bits)."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _encode_share(field: RGBImageField, probability: float, destination, image, malloc) -> None:
    # Resize as FFCV does, then store as JPEG or raw by `jpeg_draw` (RGBImageField.encode of a field of
    # that mode; the file still records a plain RGBImageField, so any FFCV reader decodes it).
    image = resizer(np.asarray(image), field.max_resolution)
    mode = "jpg" if jpeg_draw(image) < probability else "raw"
    RGBImageField(write_mode=mode, jpeg_quality=field.jpeg_quality).encode(destination, image, malloc)


def image_field(max_side: int | None, quality: int, compress_probability: float) -> RGBImageField:
    """The image field: all JPEG (probability 1), all raw (0), or that share of JPEG chosen by `jpeg_draw`."""
    if compress_probability in (0.0, 1.0):
        mode = "jpg" if compress_probability == 1.0 else "raw"
        return RGBImageField(write_mode=mode, max_resolution=max_side, jpeg_quality=quality)
    field = RGBImageField(write_mode="proportion", max_resolution=max_side, jpeg_quality=quality)
    # An instance attribute, not a subclass: FFCV's writer records a field's type by its exact class.
    field.encode = functools.partial(_encode_share, field, compress_probability)
    return field


def write_beton(
    path: str | Path,
    dataset,
    *,
    jpeg: bool = False,
    max_side: int | None = None,
    quality: int = 90,
    with_index: bool = False,
    compress_probability: float | None = None,
) -> Path:
    """Write an indexable dataset of (uint8 HWC RGB, int[, int index]) to `path` atomically (replacing it).

    Images are JPEG (`jpeg`) or raw; `compress_probability` (0..1) overrides that with a share of JPEG.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    probability = (1.0 if jpeg else 0.0) if compress_probability is None else float(compress_probability)
    jpeg = probability > 0
    field = image_field(max_side, quality, probability)
    fields = {"image": field, "label": IntField()} | ({"index": IntField()} if with_index else {})
    # ffcv's default 8 MiB pages waste most of a small raw set (one partly filled page per writer
    # process); 2 MiB (ffcv's minimum) still holds any image up to ~800x800 raw.
    page_size = (1 << 21) if not jpeg and max_side is None else (1 << 23)
    # FFCV's progress bar (tqdm on stderr) only where a write takes a while: a study on digits prints its own
    # lines (kn_dist.tune_console), a CIFAR or ImageNet write keeps its bar.
    bar = contextlib.nullcontext() if len(dataset) >= PROGRESS_BAR_FROM else contextlib.redirect_stderr(io.StringIO())
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=_writer_procs())
        with bar:
            writer.from_indexed_dataset(dataset)
        open_beton(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see no file or the complete one
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _three_way(pool, labels: np.ndarray, source: str, n_test: int, n_val: int) -> dict[str, SplitPlan]:
    """Stratified test, then stratified val from the rest, then train = what is left: all from one pool."""
    rest, test = holdout_split(labels, n_test)
    keep, val = holdout_split(labels[rest], n_val)
    picks = {"train": rest[keep], "val": rest[val], "test": test}
    return {s: SplitPlan(pool, source, idx, labels[idx]) for s, idx in picks.items()}


def _train_val(pool, labels: np.ndarray, source: str, fraction: float) -> dict[str, SplitPlan]:
    n_val = max(1, round(fraction * len(labels)))
    if n_val >= len(labels):
        raise UserError(f"{source}: {len(labels)} training samples are too few to hold out a fraction {fraction}")
    train, val = holdout_split(labels, n_val)
    return {"train": SplitPlan(pool, source, train, labels[train]), "val": SplitPlan(pool, source, val, labels[val])}


def _whole(pool, labels: np.ndarray, source: str) -> SplitPlan:
    return SplitPlan(pool, source, np.arange(len(labels)), labels)


def plan_splits(
    name: str,
    *,
    source_dir: str | Path | None,
    num_samples: int | None,
    image_size: int | None,
    val_fraction: float,
) -> tuple[dict[str, SplitPlan], float | None]:
    """The three splits of dataset `name` and the val fraction used (None: val is not carved from train).

    - digits: scikit-learn's 1,797 images; test = 360 (stratified), val = 270 of the remaining 1,437
      (stratified), train = the other 1,167. One source, so all three are disjoint by index.
    - cifar10 / cifar100: val = 5,000 of the 50,000 training images (stratified: 500 per class for
      CIFAR-10, 50 for CIFAR-100), train = the other 45,000; test = the official 10,000 test images.
    - imagefolder: with train/ and val/ only (ImageNet), val/ is the *test* split (what papers report)
      and val is a stratified `val_fraction` of train/; a test/ folder is the test split, and then a
      val/ folder beside it is the val split as it is (no fraction carved from train/).
    - synthetic: one generated pool of num_samples + 2 * (num_samples // 5); test and val are
      num_samples // 5 each (at least 1, stratified), train exactly num_samples.
    Every held-out split uses `holdout_split` with `SPLIT_SEED`.
    """
    if name == "digits":
        images, labels = digits_arrays(image_size or 32)
        pool = ArrayDataset(images, labels)
        return _three_way(pool, labels, "sklearn.datasets.load_digits", DIGITS_TEST_SIZE, DIGITS_VAL_SIZE), None
    if name in CIFAR_ARCHIVES:
        x_tr, y_tr, x_te, y_te = cifar_arrays(name, Path(source_dir) if source_dir else default_cache_dir())
        plans = _train_val(ArrayDataset(x_tr, y_tr), y_tr, f"{name} training images", CIFAR_VAL_FRACTION)
        return plans | {"test": _whole(ArrayDataset(x_te, y_te), y_te, f"{name} test images")}, None
    if name == "imagefolder":
        pools = imagefolder_pools(Path(source_dir))
        labels = {split: np.asarray(pool.labels, dtype=np.int64) for split, pool in pools.items()}
        if "test" in pools and "val" in pools:
            plans = {s: _whole(pools[s], labels[s], f"{s}/") for s in SPLITS}
            return plans, None
        test = "test" if "test" in pools else "val"
        plans = _train_val(pools["train"], labels["train"], "train/", val_fraction)
        return plans | {"test": _whole(pools[test], labels[test], f"{test}/")}, val_fraction
    n, size = num_samples or SYNTHETIC_DEFAULT_SAMPLES, image_size or 32  # synthetic
    if n < 1:
        raise UserError(f"synthetic dataset needs at least 1 sample, got {n}")
    held = max(1, n // 5)
    pool = SyntheticDataset(n + 2 * held, size, seed=0)
    return _three_way(pool, np.asarray(pool.labels, dtype=np.int64), "synthetic pool", held, held), None


def _holds(path: Path, plan: SplitPlan) -> bool:
    """Whether `path` is a complete file of exactly this split (reused after an interrupted write)."""
    if not path.exists():
        return False
    beton = open_beton(path)  # a damaged file at the final name is an error, never silently overwritten
    return (
        beton.fields.get("index") == IntField.__name__
        and np.array_equal(beton.labels("index"), plan.indices)
        and np.array_equal(beton.labels(), plan.labels)
    )


def write_dataset(
    name: str,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    max_side: int = 256,
    jpeg_quality: int = 90,
    num_samples: int | None = None,
    image_size: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    compress_probability: float = 1.0,
) -> SplitPaths:
    """Write `<out_dir>/{train,val,test}.beton` and `splits.json` for dataset `name` (see `plan_splits`).

    digits, cifar: raw pixels (digits upscaled to `image_size`, default 32; CIFAR from the archive in
    `source_dir`, default `default_cache_dir()`, downloaded there when missing). imagefolder: longest
    side at most `max_side`, a share `compress_probability` as JPEG at `jpeg_quality` (1: all JPEG, the
    default; 0: all raw) and the rest raw, recorded in splits.json (`encoding`); classes are the sorted
    train folder names.
    synthetic: side `image_size` (default 32), raw up to 64 px, JPEG above.

    A directory with `splits.json` is reused (cheap to call again). One without it (an interrupted
    write, or an older kn_dist's two files whose val.beton was the test set) is rewritten; files that
    already hold exactly their split are kept.
    """
    spec(name)
    out = Path(out_dir).resolve()
    paths = SplitPaths(*(out / f"{split}.beton" for split in SPLITS))
    if image_size is not None and (image_size < 1 or name not in ("digits", "synthetic")):
        raise UserError(f"image size {image_size}: only digits and synthetic take one, and it must be positive")
    if compress_probability != 1.0 and name != "imagefolder":
        raise UserError(f"--compress-probability applies to imagefolder only, not {name!r} (stored raw or as written)")
    if num_samples is not None and name != "synthetic":
        raise UserError(f"--num-samples applies to the synthetic dataset only, not {name!r}")
    if not 0 < val_fraction < 1:
        raise UserError(f"val fraction {val_fraction} must lie strictly between 0 and 1")
    encoding = None
    if name == "imagefolder":
        encoding = {"max_side": max_side, "jpeg_quality": jpeg_quality, "compress_probability": compress_probability}
    meta = read_splits_file(out)
    if meta is not None:
        verify_split_files(out, meta, name, val_fraction=val_fraction if name == "imagefolder" else None)
        if encoding is not None and meta.get("encoding", encoding) != encoding:
            raise UserError(
                f"{str(out)!r} was written with {meta['encoding']}, not {encoding}; delete the directory to "
                "rewrite it with these options"
            )
        return paths
    for path in paths:
        if path.exists():
            open_beton(path)  # damaged files are reported, not overwritten
    if name == "imagefolder":
        if source_dir is None:
            raise UserError("imagefolder needs --source DIR (data.source_dir) holding train/<class>/ and val/<class>/")
        if not 1 <= jpeg_quality <= 100 or max_side < 1 or not 0 <= compress_probability <= 1:
            raise UserError(
                f"JPEG quality must be 1..100, max side positive and compress probability in [0, 1], got "
                f"{jpeg_quality}, {max_side} and {compress_probability}"
            )
    plans, used_fraction = plan_splits(
        name, source_dir=source_dir, num_samples=num_samples, image_size=image_size, val_fraction=val_fraction
    )
    jpeg = name == "imagefolder" or (name == "synthetic" and (image_size or 32) > 64)
    opts = {"jpeg": jpeg, "max_side": max_side if name == "imagefolder" else None, "quality": jpeg_quality}
    if name == "imagefolder":
        opts["compress_probability"] = compress_probability
    for split, path in zip(SPLITS, paths, strict=True):
        plan = plans[split]
        if not _holds(path, plan):
            write_beton(path, _Subset(plan.pool, plan.indices), with_index=True, **opts)
    records = {s: split_record(f"{s}.beton", p.source, p.indices, p.labels) for s, p in plans.items()}
    meta = {"dataset": name, "split_seed": SPLIT_SEED, "val_fraction": used_fraction, "splits": records}
    if encoding is not None:
        meta["encoding"] = encoding
    write_splits_file(out, meta)
    return paths


class _Concat:
    """Two indexable datasets one after the other."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int):
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


def write_train_plus_val(
    name: str,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    image_size: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    max_side: int = 256,
    jpeg_quality: int = 90,
    compress_probability: float = 1.0,
) -> Path:
    """`<out_dir>/trainval.beton`: the train and val splits together, for final runs that train on both
    (a study's `final_train_on: train+val`). The test split stays out. Written once, then reused; an
    imagefolder directory already written keeps its own encoding (splits.json), and `image_size` applies
    to digits and synthetic only (an image folder's images keep their size)."""
    path = Path(out_dir).resolve() / "trainval.beton"
    if path.exists():
        open_beton(path)
        return path
    encoding = {"max_side": max_side, "jpeg_quality": jpeg_quality, "compress_probability": compress_probability}
    if name == "imagefolder":
        image_size = None
        encoding = (read_splits_file(Path(out_dir).resolve()) or {}).get("encoding", encoding)
        max_side, jpeg_quality = encoding["max_side"], encoding["jpeg_quality"]
        compress_probability = encoding["compress_probability"]
    write_dataset(
        name,
        out_dir,
        source_dir=source_dir,
        image_size=image_size,
        val_fraction=val_fraction,
        **(encoding if name == "imagefolder" else {}),
    )
    plans, _ = plan_splits(
        name, source_dir=source_dir, num_samples=None, image_size=image_size, val_fraction=val_fraction
    )
    union = _Concat(
        _Subset(plans["train"].pool, plans["train"].indices), _Subset(plans["val"].pool, plans["val"].indices)
    )
    jpeg = name == "imagefolder" or (name == "synthetic" and (image_size or 32) > 64)
    return write_beton(
        path,
        union,
        jpeg=jpeg,
        max_side=max_side if name == "imagefolder" else None,
        quality=jpeg_quality,
        with_index=True,
        compress_probability=compress_probability if name == "imagefolder" else None,
    )
