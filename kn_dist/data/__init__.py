"""FFCV data pipeline: datasets to three split files (`write_dataset`), driver-side checks
(`check_dataset`, `check_data_for_workers`, `inspect_beton`, `inspect_dataset`) and per-rank loaders
(`loaders` = train + val, `eval_loader(split="test")` for final runs). See DESIGN.md §1, §6–8.

Modules: numba_cache (FFCV's import-time numba compiles cached on disk), catalog (dataset facts),
sources (where images come from), splits (which samples go to
train / val / test), writers, beton (reading/validating files), checks, augment (seeded
augmentation), randaugment + strong_augment (RandAugment / AutoAugment, colour jitter, random erasing,
seeded alike), imagenet_pipeline (seeded RandomResizedCrop decoding, centre-crop eval, progressive
resizing), global_batch (a global batch kept on any world size), loaders.
"""

# before any FFCV import: numba's compiles at FFCV's import come from disk, not ~3 s of CPU per process
from kn_dist.data import numba_cache  # noqa: F401, I001
from kn_dist.data.beton import inspect_beton, open_beton
from kn_dist.data.catalog import DATASETS, dataset_info
from kn_dist.data.checks import (
    check_data_for_workers,
    check_dataset,
    inspect_dataset,
    resolve_beton_paths,
    train_shard_size,
)
from kn_dist.data.loaders import default_num_workers, eval_loader, loaders, train_loader
from kn_dist.data.splits import SPLIT_SEED, SPLITS
from kn_dist.data.writers import SplitPaths, write_dataset, write_train_plus_val

__all__ = [
    "DATASETS",
    "SPLITS",
    "SPLIT_SEED",
    "SplitPaths",
    "check_data_for_workers",
    "check_dataset",
    "dataset_info",
    "default_num_workers",
    "eval_loader",
    "inspect_beton",
    "inspect_dataset",
    "loaders",
    "open_beton",
    "resolve_beton_paths",
    "train_loader",
    "train_shard_size",
    "write_dataset",
    "write_train_plus_val",
]
