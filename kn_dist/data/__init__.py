"""FFCV data pipeline: datasets to .beton (`write_dataset`), checks (`inspect_beton`, `check_dataset`)
and per-rank train/val loaders (`loaders`). See DESIGN.md §1, §6, §7 and issue 5.

Modules: catalog (dataset facts), beton (reading/validating files), writers, loaders.
"""

from kn_dist.data.beton import inspect_beton, open_beton
from kn_dist.data.catalog import DATASETS, dataset_info
from kn_dist.data.loaders import check_dataset, default_num_workers, loaders, resolve_beton_paths
from kn_dist.data.writers import write_dataset

__all__ = [
    "DATASETS",
    "check_dataset",
    "dataset_info",
    "default_num_workers",
    "inspect_beton",
    "loaders",
    "open_beton",
    "resolve_beton_paths",
    "write_dataset",
]
