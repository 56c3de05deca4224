"""Datasets to FFCV .beton files: `train.beton` and `val.beton` under one directory per dataset.

Every file has two fields, `image` (RGBImageField) and `label` (IntField). Writing is atomic and
idempotent: a file is written under a temporary name in the same directory, validated, then
renamed, so a complete file at the final name is never confused with an interrupted one, and an
existing complete file is reused (delete it to rewrite).
"""

from __future__ import annotations

import os
import pickle
import tarfile
import uuid
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from PIL import Image

from kn_dist.data.beton import open_beton
from kn_dist.data.catalog import spec
from kn_dist.errors import UserError

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
SYNTHETIC_DEFAULT_SAMPLES = 10_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
_CIFAR = {  # python-version archives, https://www.cs.toronto.edu/~kriz/cifar.html
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", "eb9058c3a382ffc7106e4002c42a8d85"),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


class _ArrayDataset:
    """Indexable (uint8 HWC image, int label) pairs, the form `DatasetWriter.from_indexed_dataset` reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class _FileDataset:
    """(uint8 HWC RGB image, label) read from image files with PIL on demand (imagefolder)."""

    def __init__(self, files: list[Path], labels: list[int]):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        with Image.open(self.files[i]) as img:
            return np.asarray(img.convert("RGB")), self.labels[i]


def _writer_procs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def write_beton(
    path: str | Path, dataset, *, jpeg: bool = False, max_side: int | None = None, quality: int = 90
) -> Path:
    """Write an indexable dataset of (uint8 HWC RGB, int) to `path` atomically; reuse a complete file."""
    path = Path(path).resolve()
    if path.exists():
        open_beton(path)  # a damaged file at the final name is an error, never silently overwritten
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    field = RGBImageField(write_mode="jpg" if jpeg else "raw", max_resolution=max_side, jpeg_quality=quality)
    # ffcv's default 8 MiB pages waste most of a small raw set (one partly filled page per writer
    # process); 2 MiB (ffcv's minimum) still holds any image up to ~800x800 raw.
    page_size = (1 << 21) if not jpeg and max_side is None else (1 << 23)
    try:
        writer = DatasetWriter(
            str(tmp), {"image": field, "label": IntField()}, page_size=page_size, num_workers=_writer_procs()
        )
        writer.from_indexed_dataset(dataset)
        open_beton(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see no file or the complete one
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- digits


def digits_arrays(image_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as (x_train, y_train, x_val, y_val), uint8 RGB `image_size`².

    Pixels 0..16 are scaled to 0..255, upscaled bilinearly (PIL) and repeated over 3 channels. The
    split is stratified by class, 20 % validation, `train_test_split(..., random_state=0)`: 1,437
    training and 360 validation images, the same on every machine.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    up = np.stack([np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BILINEAR)) for g in grey])
    rgb = np.repeat(up[..., None], 3, axis=3)  # (N, S, S, 3)
    idx = np.arange(len(rgb))
    tr, va = train_test_split(
        idx, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    tr, va = np.sort(tr), np.sort(va)
    return rgb[tr], digits.target[tr].astype(np.int64), rgb[va], digits.target[va].astype(np.int64)


# ---------------------------------------------------------------- cifar


def _cifar_dir(name: str, cache: Path) -> Path:
    """The extracted python-version CIFAR folder under `cache`, extracting or downloading it if needed."""
    archive, folder, md5 = _CIFAR[name]
    if (cache / folder).is_dir():
        return cache / folder
    if not (cache / archive).is_file():
        how = (
            f"download {_CIFAR_URL}{archive} elsewhere and place it in {str(cache)!r} "
            f"(or pass --source DIR / data.source_dir holding it)"
        )
        if os.environ.get("KN_DIST_OFFLINE") == "1":
            raise UserError(f"{name}: {archive} is not in {str(cache)!r} and KN_DIST_OFFLINE=1 forbids download; {how}")
        from torchvision.datasets.utils import download_url

        try:
            download_url(_CIFAR_URL + archive, str(cache), filename=archive, md5=md5)
        except Exception as err:  # URLError, socket timeouts, md5 mismatch: all mean "no usable download"
            (cache / archive).unlink(missing_ok=True)
            raise UserError(f"{name}: could not download {archive} ({type(err).__name__}: {err}); {how}") from None
    try:
        with tarfile.open(cache / archive) as tar:
            tar.extractall(cache, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"{name}: {str(cache / archive)!r} is not a readable tar.gz archive ({err})") from None
    if not (cache / folder).is_dir():
        raise UserError(f"{name}: {str(cache / archive)!r} does not contain the folder {folder!r}")
    return cache / folder


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"CIFAR batch file {str(path)!r} is missing; the extracted archive is incomplete")
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")  # noqa: S301 - the published CIFAR format is a pickle
    data = np.asarray(batch["data"], dtype=np.uint8)  # (N, 3072): R plane, G plane, B plane, row-major
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return np.ascontiguousarray(images), np.asarray(batch[label_key], dtype=np.int64)


def cifar_arrays(name: str, cache: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10/100 as (x_train, y_train, x_val, y_val) uint8 HWC, from the python-version archive in `cache`.

    The archive is downloaded into `cache` when missing (unless KN_DIST_OFFLINE=1); the official test
    set is the validation split. CIFAR-100 uses the 100 fine labels.
    """
    folder = _cifar_dir(name, Path(cache))
    if name == "cifar10":
        parts = [_read_cifar_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
        x_val, y_val = _read_cifar_batch(folder / "test_batch", "labels")
    else:
        parts = [_read_cifar_batch(folder / "train", "fine_labels")]
        x_val, y_val = _read_cifar_batch(folder / "test", "fine_labels")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, x_val, y_val


# ---------------------------------------------------------------- imagefolder / synthetic


def folder_samples(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image files under root/<class>/ (recursively, sorted) with the index of their class in `classes`."""
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files += found
        labels += [label] * len(found)
    return files, labels


def _imagefolder_splits(source: Path) -> tuple[_FileDataset, _FileDataset]:
    if not (source / "train").is_dir() or not (source / "val").is_dir():
        raise UserError(
            f"imagefolder source {str(source)!r} must hold train/<class>/*.jpg and val/<class>/*.jpg (ImageNet layout)"
        )
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    extra = sorted({p.name for p in (source / "val").iterdir() if p.is_dir()} - set(classes))
    if not classes or extra:
        raise UserError(
            f"imagefolder {str(source)!r}: val classes {extra} are not train classes"
            if extra
            else f"imagefolder {str(source / 'train')!r} has no class folders"
        )
    splits = []
    for split in ("train", "val"):
        files, labels = folder_samples(source / split, classes)
        if not files:
            raise UserError(f"imagefolder {str(source / split)!r} holds no image files ({sorted(IMAGE_SUFFIXES)})")
        splits.append(_FileDataset(files, labels))
    return splits[0], splits[1]


class SyntheticDataset:
    """`num_samples` uint8 HWC images of side `image_size`: noise around one colour per class (10 classes).

    Images are generated per index from (seed, index), so a 224-px set never sits in memory at once.
    """

    def __init__(self, num_samples: int, image_size: int, seed: int = 0):
        self.size, self.seed = image_size, seed
        self.labels = np.random.default_rng(seed).integers(0, 10, size=num_samples)
        self.colours = np.random.default_rng(1234).integers(40, 216, size=(10, 3))  # fixed class colours

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        noise = np.random.default_rng((self.seed, i)).integers(-40, 41, size=(self.size, self.size, 3))
        label = int(self.labels[i])
        return np.clip(self.colours[label] + noise, 0, 255).astype(np.uint8), label


# ---------------------------------------------------------------- entry point


def default_cache_dir() -> Path:
    """Where CIFAR archives are downloaded when no --source is given: $XDG_CACHE_HOME/kn_dist (~/.cache/kn_dist)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kn_dist"


def write_dataset(
    name: str,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    max_side: int = 256,
    jpeg_quality: int = 90,
    num_samples: int | None = None,
    image_size: int | None = None,
) -> tuple[Path, Path]:
    """Write `<out_dir>/train.beton` and `<out_dir>/val.beton` for dataset `name`; return their absolute paths.

    - digits: scikit-learn's digits upscaled to `image_size` (default 32), raw pixels, fixed split
      (see `digits_arrays`).
    - cifar10 / cifar100: raw 32x32 pixels from the python-version archive in `source_dir` (default
      `default_cache_dir()`), downloaded there when missing.
    - imagefolder: `source_dir/{train,val}/<class>/*`, JPEG at `jpeg_quality`, longest side at most
      `max_side`; classes are the sorted train folder names.
    - synthetic: `num_samples` training images (default 10,000) and a fifth as many validation images of
      side `image_size` (default 32); raw up to 64 px, JPEG above (keeps 224 px sets small).

    Files already complete are reused, so this is cheap to call again.
    """
    spec(name)
    out = Path(out_dir).resolve()
    train, val = out / "train.beton", out / "val.beton"
    if image_size is not None and (image_size < 1 or name not in ("digits", "synthetic")):
        raise UserError(f"image size {image_size}: only digits and synthetic take one, and it must be positive")
    if num_samples is not None and name != "synthetic":
        raise UserError(f"--num-samples applies to the synthetic dataset only, not {name!r}")
    if train.exists() and val.exists():
        for path in (train, val):
            open_beton(path)
        return train, val
    if name == "digits":
        x_tr, y_tr, x_va, y_va = digits_arrays(image_size or 32)
        write_beton(train, _ArrayDataset(x_tr, y_tr))
        write_beton(val, _ArrayDataset(x_va, y_va))
    elif name in _CIFAR:
        x_tr, y_tr, x_va, y_va = cifar_arrays(name, Path(source_dir) if source_dir else default_cache_dir())
        write_beton(train, _ArrayDataset(x_tr, y_tr))
        write_beton(val, _ArrayDataset(x_va, y_va))
    elif name == "imagefolder":
        if source_dir is None:
            raise UserError("imagefolder needs --source DIR (data.source_dir) holding train/<class>/ and val/<class>/")
        if not 1 <= jpeg_quality <= 100 or max_side < 1:
            raise UserError(f"JPEG quality must be 1..100 and max side positive, got {jpeg_quality} and {max_side}")
        tr, va = _imagefolder_splits(Path(source_dir))
        write_beton(train, tr, jpeg=True, max_side=max_side, quality=jpeg_quality)
        write_beton(val, va, jpeg=True, max_side=max_side, quality=jpeg_quality)
    else:  # synthetic
        n, size = num_samples or SYNTHETIC_DEFAULT_SAMPLES, image_size or 32
        if n < 1:
            raise UserError(f"synthetic dataset needs at least 1 sample, got {n}")
        for path, count, seed in ((train, n, 0), (val, max(1, n // 5), 1)):
            write_beton(path, SyntheticDataset(count, size, seed), jpeg=size > 64)
    return train, val
