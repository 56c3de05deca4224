"""What kn_dist knows about each dataset name: classes, native resolution, normalisation statistics.

Statistics are per-channel mean/std of the training images on the 0..1 scale:
- CIFAR-10/100: the values used by the CIFAR reference recipes (e.g. kuangliu/pytorch-cifar,
  weiaicunzai/pytorch-cifar100), computed over all 50k training images (our val split's 5k
  included: the published constants, a negligible leak of two numbers per channel).
- ImageNet-style folders: torchvision's ImageNet statistics (the usual choice for ImageFolder data).
- digits: computed over our 32x32 upscaled training split (1,167 images; see `sources.digits_arrays`
  and `writers.plan_splits`); grey, so the three channels share one value.
- synthetic: uniform-ish noise around class colours; mean 0.5, std 0.25 is close enough for benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kn_dist.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset name (`num_classes` is None where the data decides: imagefolder)."""

    name: str
    num_classes: int | None
    native_size: int | None  # side length of the stored images; None: variable (imagefolder)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_size: int | None
    val_size: int | None
    test_size: int | None


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 10, 32, (0.3060,) * 3, (0.3240,) * 3, 1167, 270, 360),
    "cifar10": DatasetSpec("cifar10", 10, 32, CIFAR10_MEAN, CIFAR10_STD, 45_000, 5_000, 10_000),
    "cifar100": DatasetSpec("cifar100", 100, 32, CIFAR100_MEAN, CIFAR100_STD, 45_000, 5_000, 10_000),
    "imagefolder": DatasetSpec("imagefolder", None, None, IMAGENET_MEAN, IMAGENET_STD, None, None, None),
    "synthetic": DatasetSpec("synthetic", 10, 32, (0.5,) * 3, (0.25,) * 3, None, None, None),
}


def spec(name: str) -> DatasetSpec:
    """The `DatasetSpec` of `name`; a UserError listing the valid names otherwise."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid datasets are: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_info(name: str) -> dict:
    """`{"num_classes", "image_size", "mean", "std", "train_size", "val_size", "test_size"}` for a dataset name.

    `num_classes` is None for imagefolder (it depends on the folders; `check_dataset` reads it from
    the .beton labels), `image_size` is the native stored side length (None: variable).
    """
    s = spec(name)
    return {
        "num_classes": s.num_classes,
        "image_size": s.native_size,
        "mean": list(s.mean),
        "std": list(s.std),
        "train_size": s.train_size,
        "val_size": s.val_size,
        "test_size": s.test_size,
    }
