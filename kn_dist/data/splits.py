"""The study's three splits (DESIGN.md §8): which source samples go to train, val and test.

`val` is held out from the training data, stratified by class, with the fixed seed `SPLIT_SEED`;
`test` is the dataset's own test split (digits, which has none, holds out its own). Sweep trials
train on train and are scored on val; only final runs open test.

Every split file stores each sample's index in its source (the `index` field) and the directory
holds `splits.json` (`SPLITS_FILE`) with the seed, sizes, class counts and a SHA-256 of each sorted
index list, so disjointness and stability can be checked from the files alone. `splits.json` is
written last: a directory without it is incomplete or from an older kn_dist (two files, where
val.beton was the test set) and is never read as a three-split dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from kn_dist.data.beton import Beton, open_beton
from kn_dist.errors import UserError

SPLITS = ("train", "val", "test")
SPLITS_FILE = "splits.json"
SPLITS_FORMAT = 1
# One seed for every dataset's held-out split, fixed so "written once" also means "the same
# everywhere". np.random.RandomState is used because NumPy freezes its stream (NEP 19): the same
# permutation on every machine and NumPy version.
SPLIT_SEED = 0

DIGITS_TEST_SIZE = 360  # of 1,797: 20 %, the size of the old (pre-three-split) digits val split
DIGITS_VAL_SIZE = 270  # of the remaining 1,437: 15 % of the whole; leaves 1,167 to train on
CIFAR_VAL_FRACTION = 0.1  # 5,000 of the 50,000 training images (500 / class CIFAR-10, 50 / class CIFAR-100)
DEFAULT_VAL_FRACTION = 0.1  # imagefolder without its own val/ folder: share of train/ held out


def class_quotas(labels: np.ndarray, n_holdout: int) -> np.ndarray:
    """Per-class holdout counts summing to `n_holdout`, each within 1 of `n_holdout * n_c / N`.

    Largest-remainder rounding of the exact proportional quotas; ties go to the lower class id.
    """
    counts = np.bincount(labels)
    exact = counts * (n_holdout / len(labels))
    quotas = np.floor(exact).astype(np.int64)
    short = n_holdout - int(quotas.sum())
    # stable sort on -remainder: equal remainders keep class order
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:short]] += 1
    return quotas


def holdout_split(labels: np.ndarray, n_holdout: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) sorted int64 positions into `labels`: a stratified random holdout of `n_holdout`.

    Class c gives `class_quotas(labels, n_holdout)[c]` samples: the first ones of class c in the order
    `np.random.RandomState(seed).permutation(len(labels))`. Deterministic on every machine.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if not 0 < n_holdout < n:
        raise UserError(f"cannot hold out {n_holdout} of {n} samples; the held-out split needs 1..{n - 1}")
    if labels.min() < 0:
        raise UserError(f"labels must be non-negative class ids, found {int(labels.min())}")
    quotas = class_quotas(labels, n_holdout)
    perm = np.random.RandomState(seed).permutation(n)
    shuffled = labels[perm]
    # rank of each permuted sample within its class (0 = first of its class in the permutation)
    rank = np.empty(n, dtype=np.int64)
    for c in np.flatnonzero(quotas):
        members = np.flatnonzero(shuffled == c)
        rank[members] = np.arange(len(members))
    take = np.zeros(n, dtype=bool)
    take[perm] = np.where(quotas[shuffled] > 0, rank < quotas[shuffled], False)
    held = np.flatnonzero(take)
    return np.flatnonzero(~take), held


def index_sha256(indices: np.ndarray) -> str:
    """SHA-256 of the sorted indices as little-endian int64: the fingerprint recorded in splits.json."""
    return hashlib.sha256(np.sort(np.asarray(indices, dtype="<i8")).tobytes()).hexdigest()


def split_record(file: str, source: str, indices: np.ndarray, labels: np.ndarray) -> dict:
    """One split's entry in splits.json."""
    return {
        "file": file,
        "source": source,
        "num_samples": len(indices),
        "index_sha256": index_sha256(indices),
        "class_counts": np.bincount(np.asarray(labels, dtype=np.int64)).tolist(),
    }


def write_splits_file(out: Path, meta: dict) -> Path:
    """Write `out/splits.json` atomically (it marks the directory complete)."""
    path = out / SPLITS_FILE
    tmp = path.with_name(f".{SPLITS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": SPLITS_FORMAT, **meta}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_splits_file(out: Path) -> dict | None:
    """The parsed `out/splits.json`, None when absent; UserError when unreadable or of another format."""
    path = out / SPLITS_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{str(path)!r} is not readable JSON ({err}); delete the directory and rewrite it") from None
    if not isinstance(meta, dict) or meta.get("format") != SPLITS_FORMAT or set(meta.get("splits", {})) != set(SPLITS):
        raise UserError(
            f"{str(path)!r} is not a kn_dist split record of format {SPLITS_FORMAT}; "
            "delete the directory and rewrite it"
        )
    return meta


def verify_split_files(out: Path, meta: dict, dataset: str, *, val_fraction: float | None = None) -> dict[str, Beton]:
    """Open the three files `meta` (splits.json) names and check them against it; UserError on a mismatch.

    Checks: the record is for `dataset`; each file holds the recorded number of samples and indices
    (SHA-256); splits drawn from one source share no index; and, when `val_fraction` is given and val
    was carved from train, that it is the fraction recorded.
    """
    where = str(out / SPLITS_FILE)
    rewrite = "delete the directory and rewrite it with `kn-dist data write`"
    if meta.get("dataset") != dataset:
        raise UserError(f"{where!r} records dataset {meta.get('dataset')!r}, not {dataset!r}; {rewrite}")
    betons: dict[str, Beton] = {}
    for split in SPLITS:
        record = meta["splits"][split]
        beton = open_beton(out / record["file"])
        if (
            beton.fields.get("index") != "IntField"
            or beton.num_samples != record["num_samples"]
            or index_sha256(beton.labels("index")) != record["index_sha256"]
        ):
            raise UserError(f"{str(beton.path)!r} does not hold the {split} split recorded in {where!r}; {rewrite}")
        betons[split] = beton
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            same = meta["splits"][a]["source"] == meta["splits"][b]["source"]
            shared = np.intersect1d(betons[a].labels("index"), betons[b].labels("index")) if same else []
            if len(shared):
                raise UserError(f"{where!r}: the {a} and {b} splits share {len(shared)} samples; {rewrite}")
    recorded = meta.get("val_fraction")
    if val_fraction is not None and recorded is not None and abs(recorded - val_fraction) > 1e-12:
        raise UserError(
            f"{str(out)!r} holds a val split of fraction {recorded} of train/, not data.val_fraction {val_fraction}; "
            f"set data.val_fraction={recorded} or delete the directory to rewrite it"
        )
    return betons


def old_layout_message(out: Path, dataset: str) -> str:
    """The one line for a directory written before the three splits existed."""
    how = f"`kn-dist data write {dataset} --out {out}`" + (" --source DIR" if dataset == "imagefolder" else "")
    return (
        f"{str(out)!r} holds train.beton/val.beton from an older kn_dist without a held-out validation split "
        f"(its val.beton is the test set); rewrite it with {how}, which writes train/val/test.beton"
    )
