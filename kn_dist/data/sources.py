"""Where each dataset's images come from: in-memory arrays, CIFAR pickles, image folders, generated noise.

Each function returns a pool of samples (an indexable of (uint8 HWC RGB image, int label)) and its
labels; `kn_dist.data.writers` decides which pool positions go to which split.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from kn_dist.errors import UserError

SYNTHETIC_DEFAULT_SAMPLES = 10_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
CIFAR_ARCHIVES = {  # python-version archives, https://www.cs.toronto.edu/~kriz/cifar.html
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", "eb9058c3a382ffc7106e4002c42a8d85"),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


class ArrayDataset:
    """Indexable (uint8 HWC image, int label) pairs, the form `DatasetWriter.from_indexed_dataset` reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class FileDataset:
    """(uint8 HWC RGB image, label) read from image files with PIL on demand (imagefolder)."""

    def __init__(self, files: list[Path], labels: list[int]):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        with Image.open(self.files[i]) as img:
            return np.asarray(img.convert("RGB")), self.labels[i]


# ---------------------------------------------------------------- digits


def digits_arrays(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as (images, labels): uint8 RGB `image_size`² in sklearn's order.

    Pixels 0..16 are scaled to 0..255, upscaled bilinearly (PIL) and repeated over 3 channels. The
    same arrays on every machine (the data ships inside scikit-learn).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    up = np.stack([np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BILINEAR)) for g in grey])
    return np.repeat(up[..., None], 3, axis=3), digits.target.astype(np.int64)  # (N, S, S, 3), (N,)


# ---------------------------------------------------------------- cifar


def _cifar_dir(name: str, cache: Path) -> Path:
    """The extracted python-version CIFAR folder under `cache`, extracting or downloading it if needed."""
    archive, folder, md5 = CIFAR_ARCHIVES[name]
    if (cache / folder).is_dir():
        return cache / folder
    if not (cache / archive).is_file():
        how = (
            f"download {CIFAR_URL}{archive} elsewhere and place it in {str(cache)!r} "
            f"(or pass --source DIR / data.source_dir holding it)"
        )
        if os.environ.get("KN_DIST_OFFLINE") == "1":
            raise UserError(f"{name}: {archive} is not in {str(cache)!r} and KN_DIST_OFFLINE=1 forbids download; {how}")
        from torchvision.datasets.utils import download_url

        try:
            download_url(CIFAR_URL + archive, str(cache), filename=archive, md5=md5)
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
    """CIFAR-10/100 as (x_train, y_train, x_test, y_test) uint8 HWC, from the python-version archive in `cache`.

    The archive is downloaded into `cache` when missing (unless KN_DIST_OFFLINE=1). Training images
    are data_batch_1..5 concatenated in that order (CIFAR-100: `train`), the 100 fine labels for CIFAR-100.
    """
    folder = _cifar_dir(name, Path(cache))
    if name == "cifar10":
        parts = [_read_cifar_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
        x_test, y_test = _read_cifar_batch(folder / "test_batch", "labels")
    else:
        parts = [_read_cifar_batch(folder / "train", "fine_labels")]
        x_test, y_test = _read_cifar_batch(folder / "test", "fine_labels")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, x_test, y_test


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


def imagefolder_pools(source: Path) -> dict[str, FileDataset]:
    """The class-folder trees under `source`: {"train": ..., and "val" / "test" where those folders exist}.

    Classes are the sorted folder names of train/; val/ and test/ may hold only train classes.
    """
    if not (source / "train").is_dir() or not ((source / "val").is_dir() or (source / "test").is_dir()):
        raise UserError(
            f"imagefolder source {str(source)!r} must hold train/<class>/* and val/<class>/* or test/<class>/* "
            "(ImageNet layout)"
        )
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"imagefolder {str(source / 'train')!r} has no class folders")
    pools = {}
    for split in ("train", "val", "test"):
        if not (source / split).is_dir():
            continue
        extra = sorted({p.name for p in (source / split).iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise UserError(f"imagefolder {str(source)!r}: {split} classes {extra} are not train classes")
        files, labels = folder_samples(source / split, classes)
        if not files:
            raise UserError(f"imagefolder {str(source / split)!r} holds no image files ({sorted(IMAGE_SUFFIXES)})")
        pools[split] = FileDataset(files, labels)
    return pools


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


def default_cache_dir() -> Path:
    """Where CIFAR archives are downloaded when no --source is given: $XDG_CACHE_HOME/kn_dist (~/.cache/kn_dist)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kn_dist"
