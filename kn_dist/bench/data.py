"""Data-loading benchmark (issue 5): FFCV train loader vs. what a PyTorch user would otherwise write.

Same images, same augmentations, same worker count, measured side by side with interleaved repeats
(medians; the machine is shared, so single runs are noisy). JIT compilation and worker start-up are
excluded by a warm-up epoch on each side.

(a) 32x32 CIFAR-style: torchvision's CIFAR10 `__getitem__` (in-memory uint8 -> PIL -> RandomCrop(32,
    padding=4), RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader, vs `kn_dist.data.loaders`.
(b) 224x224 from JPEG files: `ImageFolder` + PIL decode + RandomResizedCrop(224) + flip + ToTensor +
    Normalize, vs `kn_dist.data.loaders` on the same files written as a JPEG .beton.
(c) as (a) with torchvision's RandAugment(2, 9) after the flip (PIL ops per image in the DataLoader workers), vs
    `kn_dist.data.loaders` with `data.randaugment_ops: 2` (kn_dist.data.strong_augment: batched torch ops).
ratio = FFCV images/s over the PyTorch loader's; target: >= 8 for (a), >= 3 for (b) (issue 5), >= 3 for (c)
(issue 25).
(d) ImageNet per core (kn_dist.bench.data_imagenet, issue 26): 512 px JPEGs, decode + seeded RandomResizedCrop(224)
    + flip on one loader thread vs FFCV's published per-vCPU figure; target >= 1.0.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kn_dist.bench.data_imagenet import case_imagenet_per_core
from kn_dist.config import DataConfig
from kn_dist.data import loaders, write_dataset
from kn_dist.data.catalog import DATASETS, IMAGENET_MEAN, IMAGENET_STD
from kn_dist.data.sources import ArrayDataset
from kn_dist.data.writers import write_beton

NUM_WORKERS = 2  # the same for both sides; what a 2-core CI box has


class CifarStyle(Dataset):
    """torchvision.datasets.CIFAR10's __getitem__ on in-memory uint8 images (HWC)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _epoch_rate(loader) -> float:
    """Images per second for one full pass, touching every batch."""
    start, count = time.perf_counter(), 0
    for x, _ in loader:
        count += x.shape[0]
    return count / (time.perf_counter() - start)


def _compare(ffcv_loader, torch_loader, repeats: int) -> dict:
    _epoch_rate(ffcv_loader), _epoch_rate(torch_loader)  # warm-up: JIT compile, worker start-up, page cache
    ffcv_rates, torch_rates = [], []
    for _ in range(repeats):  # interleaved so both sides see the same background load
        ffcv_rates.append(_epoch_rate(ffcv_loader))
        torch_rates.append(_epoch_rate(torch_loader))
    ffcv, base = statistics.median(ffcv_rates), statistics.median(torch_rates)
    return {
        "ffcv_images_per_s": round(ffcv, 1),
        "torch_images_per_s": round(base, 1),
        "ffcv_runs": [round(r, 1) for r in ffcv_rates],
        "torch_runs": [round(r, 1) for r in torch_rates],
        "ratio": round(ffcv / base, 2),
    }


def _case_cifar(tmp: Path, n: int, repeats: int, batch: int, randaugment: int = 0) -> dict:
    """Case (a); `randaugment` > 0 adds RandAugment(randaugment, 9) after the flip on both sides (case (c))."""
    import torchvision.transforms as T

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    path = tmp / "cifar32.beton"
    if not path.exists():
        write_beton(path, ArrayDataset(images, labels))
    cfg = DataConfig(
        dataset="cifar10",
        train_path=str(path),
        val_path=str(path),
        batch_size=batch,
        num_workers=NUM_WORKERS,
        randaugment_ops=randaugment,
    )
    ffcv_train, _ = loaders(cfg, 0, 1, torch.device("cpu"))
    spec = DATASETS["cifar10"]
    strong = [T.RandAugment(num_ops=randaugment, magnitude=9)] if randaugment else []
    transform = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *strong, T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    )
    torch_train = DataLoader(
        CifarStyle(images, labels, transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=NUM_WORKERS,
        persistent_workers=True,
    )
    return {
        "name": "cifar32_randomcrop_flip" + (f"_randaugment{randaugment}" if randaugment else ""),
        "images": n,
        "batch_size": batch,
        **_compare(ffcv_train, torch_train, repeats),
    }


def _jpeg_folder(root: Path, n: int) -> None:
    """`n` JPEG photos-like images (smooth colour fields + grain), 256x192, 10 class folders, quality 90."""
    rng = np.random.default_rng(1)
    for i in range(n):
        folder = root / "train" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((256, 192), Image.BICUBIC)
        grain = rng.normal(0, 8, size=(192, 256, 3))
        img = np.clip(np.asarray(small, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "val").mkdir(exist_ok=True)
    for cls in range(10):  # the writer needs a test split (val/ is it); one image per class is enough here
        src = root / "train" / f"class{cls}"
        (root / "val" / src.name).mkdir(exist_ok=True)
        first = sorted(src.iterdir())[0]
        (root / "val" / src.name / first.name).write_bytes(first.read_bytes())


def _case_jpeg(tmp: Path, n: int, repeats: int, batch: int) -> dict:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    src = tmp / "jpeg_src"
    _jpeg_folder(src, n)
    train, val, _ = write_dataset("imagefolder", tmp / "jpeg_beton", source_dir=src, max_side=256, jpeg_quality=90)
    cfg = DataConfig(
        dataset="imagefolder",
        train_path=str(train),
        val_path=str(val),
        image_size=224,
        batch_size=batch,
        num_workers=NUM_WORKERS,
    )
    ffcv_train, _ = loaders(cfg, 0, 1, torch.device("cpu"))
    transform = T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    torch_train = DataLoader(
        ImageFolder(str(src / "train"), transform=transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=NUM_WORKERS,
        persistent_workers=True,
    )
    return {
        "name": "jpeg224_randomresizedcrop_flip",
        "images": n,
        "batch_size": batch,
        **_compare(ffcv_train, torch_train, repeats),
    }


def run(quick: bool = False) -> dict:
    """Both cases; `quick` uses fewer images and one repeat (a smoke check, not a measurement)."""
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="kn_dist_bench_data_") as tmp:
        cifar = _case_cifar(Path(tmp), 5_000 if quick else 20_000, repeats, batch=512)
        strong = _case_cifar(Path(tmp), 5_000 if quick else 20_000, repeats, batch=512, randaugment=2)
        jpeg = _case_jpeg(Path(tmp), 256 if quick else 1_024, repeats, batch=64)
        imagenet = case_imagenet_per_core(Path(tmp), 128 if quick else 1_024, repeats)
    cifar["target"], strong["target"], jpeg["target"] = 8.0, 3.0, 3.0
    common = {"num_workers": NUM_WORKERS, "device": "cpu", "torch_threads": torch.get_num_threads()}
    cases = [{**cifar, **common}, {**strong, **common}, {**jpeg, **common}, {**imagenet, "device": "cpu"}]
    return {"cases": cases}
