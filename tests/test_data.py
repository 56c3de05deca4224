"""kn_dist.data against independent references: scikit-learn's digits, the published CIFAR pickle layout,
FFCV's own Reader and DistributedSampler, the arrays we wrote and a plain-Python reference of the
augmentation stream (tests/data/test_augment.py). Real .beton files, real FFCV loaders.

Each FFCV loader JIT-compiles on its first epoch (seconds each), so loaders are built once per module
and only the ones the evidence needs are iterated.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import to_uint8_hwc
from PIL import Image

from kn_dist import cli
from kn_dist.config import DataConfig
from kn_dist.data import (
    check_dataset,
    eval_loader,
    inspect_beton,
    loaders,
    resolve_beton_paths,
    train_loader,
    write_dataset,
)
from kn_dist.data.catalog import DATASETS
from kn_dist.data.sources import digits_arrays
from kn_dist.errors import UserError

CPU = torch.device("cpu")
# numba's dispatcher finalizer raises a KeyError at garbage collection for FFCV's compiled imdecode
# (harmless, printed by pytest as an unraisable-exception warning); keep the output readable.
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


# ------------------------------------------------------------------ digits: the built-in dataset

# SHA-256 of each split's sorted source indices (little-endian int64), pinned when the split was made:
# the same files on every machine (scikit-learn ships the digits; the split uses RandomState(0)).
DIGITS_SHA256 = {
    "train": "2f26cfdcbd95f4a70cd3f2f39a1be79e1d3d74cfe6b347fe4fc519c146af7592",
    "val": "8068c827137fcc91972cac597a02fb0e0b1cf62b29e12fba7807087e10ee2082",
    "test": "d971ab24951548c14ce285629ba8e8f79ee0f2e4f37ca8e360ffc14c4d5a40e3",
}


def _read(path: Path) -> dict[str, np.ndarray]:
    """FFCV's own Reader: labels, source indices, and the raw image bytes of every sample."""
    from ffcv.reader import Reader

    meta = Reader(str(path)).metadata  # fields in file order: f0 image, f1 label, f2 index
    images = np.stack(
        [
            np.fromfile(path, dtype=np.uint8, count=int(h) * int(w) * 3, offset=int(ptr)).reshape(h, w, 3)
            for h, w, ptr in zip(meta["f0"]["height"], meta["f0"]["width"], meta["f0"]["data_ptr"], strict=True)
        ]
    )
    return {"label": np.asarray(meta["f1"]), "index": np.asarray(meta["f2"]), "image": images}


@pytest.fixture(scope="module")
def digits_cfg(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("data")
    return DataConfig(dataset="digits", root=str(root), batch_size=64, num_workers=2)


def test_resolve_writes_digits_once_with_absolute_paths(digits_cfg, monkeypatch):
    monkeypatch.chdir(Path(digits_cfg.root).parent)
    relative = digits_cfg.model_copy(update={"root": Path(digits_cfg.root).name})
    train, val, test = resolve_beton_paths(relative)
    assert train.is_absolute() and train == Path(digits_cfg.root) / "digits" / "train.beton"
    assert val.is_file() and test.is_file() and (train.parent / "splits.json").is_file()
    mtimes = [p.stat().st_mtime_ns for p in (train, val, test)]
    assert tuple(write_dataset("digits", train.parent)) == (train, val, test)  # reused, not rewritten
    assert [p.stat().st_mtime_ns for p in (train, val, test)] == mtimes


def test_digits_splits_are_disjoint_stratified_pinned_and_match_scikit_learn(digits_cfg):
    from sklearn.datasets import load_digits

    target = load_digits().target
    images, _ = digits_arrays(32)
    files = dict(zip(("train", "val", "test"), resolve_beton_paths(digits_cfg), strict=True))
    splits = {name: _read(path) for name, path in files.items()}
    sizes = {name: len(s["index"]) for name, s in splits.items()}
    assert sizes == {"train": 1167, "val": 270, "test": 360}
    spec = DATASETS["digits"]
    assert (spec.train_size, spec.val_size, spec.test_size) == (1167, 270, 360)
    every = np.concatenate([s["index"] for s in splits.values()])
    assert np.array_equal(np.sort(every), np.arange(1797))  # disjoint and complete
    for name, s in splits.items():
        assert np.array_equal(s["label"], target[s["index"]])  # labels are scikit-learn's
        assert np.array_equal(s["image"], images[s["index"]])  # raw pixels, bit-exact
        sha = hashlib.sha256(np.sort(s["index"]).astype("<i8").tobytes()).hexdigest()
        assert sha == DIGITS_SHA256[name], f"the {name} split changed"
    # stratified: test 360 of 1,797, then val 270 of the remaining 1,437, each class within 1 sample
    assert np.all(np.abs(np.bincount(splits["test"]["label"]) - 360 / 1797 * np.bincount(target)) < 1)
    rest = np.bincount(target) - np.bincount(splits["test"]["label"])
    assert np.all(np.abs(np.bincount(splits["val"]["label"]) - 270 / 1437 * rest) < 1)
    recorded = json.loads((files["train"].parent / "splits.json").read_text())
    assert recorded["split_seed"] == 0 and {k: v["num_samples"] for k, v in recorded["splits"].items()} == sizes


def test_digits_written_twice_are_identical(digits_cfg, tmp_path):
    again = write_dataset("digits", tmp_path / "digits")
    first = resolve_beton_paths(digits_cfg)
    for a, b in zip(first, again, strict=True):
        x, y = _read(a), _read(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_raw_round_trip_is_bit_exact_through_the_val_and_test_loaders(digits_cfg):
    images, labels = digits_arrays(32)
    spec = DATASETS["digits"]
    for split in ("val", "test"):
        loader = eval_loader(digits_cfg, 0, 1, CPU, split=split)
        xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader], strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        index = _read(Path(loader.fname))["index"]
        assert x.dtype == torch.float32 and x.shape == (len(index), 3, 32, 32) and y.dtype == torch.int64
        assert abs(float(x.mean())) < 0.15  # mean/std normalisation actually applied
        got = to_uint8_hwc(x, [255 * m for m in spec.mean], [255 * s for s in spec.std])
        assert np.array_equal(got, images[index]) and np.array_equal(y.numpy(), labels[index])


def test_check_dataset_refuses_bad_labels_and_resolutions(digits_cfg):
    info = check_dataset(digits_cfg, num_classes=10, input_size=32, world_size=2)
    assert info["num_classes"] == 10 and Path(info["train_path"]).is_absolute() and Path(info["test_path"]).is_file()
    assert (info["train_size"], info["val_size"], info["test_size"]) == (1167, 270, 360)
    with pytest.raises(UserError, match=r"labels in \[0, 9\].*5 classes"):
        check_dataset(digits_cfg, num_classes=5)
    with pytest.raises(UserError, match="built for 224x224"):
        check_dataset(digits_cfg, input_size=224)
    with pytest.raises(UserError, match="holds 32x32 images but data.image_size is 64"):
        check_dataset(digits_cfg.model_copy(update={"image_size": 64}))


# ------------------------------------------------------------------ JPEG / imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """An ImageNet-layout folder (train/, val/) of PNG digits, 32x32, classes "c0".."c2": 8 train and
    4 val images per class. Returns (root, val/ images, val/ labels)."""
    root = tmp_path_factory.mktemp("folder")
    images, labels = digits_arrays(32)
    keep_va = []
    for cls in range(3):
        members = np.flatnonzero(labels == cls)
        for split, chosen in (("train", members[:8]), ("val", members[8:12])):
            (root / split / f"c{cls}").mkdir(parents=True)
            for k, i in enumerate(chosen):
                Image.fromarray(images[i]).save(root / split / f"c{cls}" / f"{k:03d}.png")
                if split == "val":
                    keep_va.append((images[i], cls))
    return root, np.stack([a for a, _ in keep_va]), np.array([c for _, c in keep_va])


def test_imagefolder_split_roles(folder, tmp_path):
    from kn_dist.data.writers import plan_splits

    root, _, y_val_folder = folder
    plans, fraction = plan_splits("imagefolder", source_dir=root, num_samples=None, image_size=None, val_fraction=0.25)
    # ImageNet layout: val/ is the test split; val is a stratified quarter of train/ (2 of 8 per class)
    assert fraction == 0.25 and plans["test"].source == "val/" and np.array_equal(plans["test"].labels, y_val_folder)
    assert plans["val"].source == plans["train"].source == "train/"
    assert np.bincount(plans["val"].labels).tolist() == [2, 2, 2] and len(plans["train"].indices) == 18
    assert not set(plans["val"].indices) & set(plans["train"].indices)
    # with a test/ folder, test/ is the test split and val/ the val split as they are
    both = tmp_path / "both"
    both.mkdir()
    for split in ("train", "val", "test"):
        (both / split).symlink_to(root / ("val" if split == "test" else split), target_is_directory=True)
    plans, fraction = plan_splits("imagefolder", source_dir=both, num_samples=None, image_size=None, val_fraction=0.25)
    assert fraction is None and [plans[s].source for s in ("train", "val", "test")] == ["train/", "val/", "test/"]
    assert len(plans["train"].indices) == 24 and len(plans["val"].indices) == 12


@pytest.mark.slow
def test_jpeg_round_trip_within_psnr(folder, tmp_path):
    root, x_test, y_test = folder
    train, val, test = write_dataset("imagefolder", tmp_path / "out", source_dir=root, max_side=32, jpeg_quality=90)
    info = inspect_beton(test)
    assert info["image"]["jpeg_samples"] == 12 and info["num_samples"] == 12
    assert inspect_beton(val)["num_samples"] == 2  # round(10 % of the 24 train images), stratified
    # Read the JPEG test split through the plain (fixed-resolution) eval pipeline: decode only.
    cfg = DataConfig(
        dataset="digits", train_path=str(train), val_path=str(val), test_path=str(test), normalization="unit"
    )
    loader = eval_loader(cfg.model_copy(update={"batch_size": 2}), 0, 1, CPU, split="test")
    x, y = map(torch.cat, zip(*[(a.clone(), b.clone()) for a, b in loader], strict=True))
    assert np.array_equal(y.numpy(), y_test)  # classes = sorted folder names, files in sorted order
    got = to_uint8_hwc(x, [0.0] * 3, [255.0] * 3).astype(np.float64)
    mse = ((got - x_test.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
    assert psnr.min() >= 30.0, f"JPEG quality 90 should stay above 30 dB PSNR, got {psnr.min():.1f}"
    assert not np.array_equal(got, x_test)  # it really is lossy JPEG, not raw


@pytest.mark.slow
def test_imagefolder_pipeline_crops_to_image_size_with_cutout(folder, tmp_path):
    root, _, _ = folder
    cfg = DataConfig(
        dataset="imagefolder",
        source_dir=str(root),
        root=str(tmp_path),
        image_size=24,
        batch_size=8,
        cutout=6,
        val_fraction=0.25,
    )
    assert check_dataset(cfg)["num_classes"] == 3  # from the labels: imagefolder has no fixed class count
    train, val = loaders(cfg, 0, 1, CPU)
    (xt, yt), (xv, _) = next(iter(train)), next(iter(val))
    assert xt.shape == (8, 3, 24, 24) and xv.shape == (6, 3, 24, 24) and yt.max() < 3
    # every training image has one 6x6 square of the mean colour (normalised: round(255 m) / 255 - m) / s)
    spec = DATASETS["imagefolder"]
    fill = torch.tensor([(round(255 * m) - 255 * m) / (255 * s) for m, s in zip(spec.mean, spec.std, strict=True)])
    is_fill = (xt - fill.view(1, 3, 1, 1)).abs().amax(dim=1) < 1e-5  # (B, H, W)
    windows = is_fill.float().unfold(1, 6, 1).unfold(2, 6, 1).amin(dim=(-1, -2))  # (B, 19, 19)
    assert bool((windows.amax(dim=(1, 2)) == 1).all())
    with pytest.raises(UserError, match=r"fraction 0.25 of train/, not data.val_fraction 0.1"):
        check_dataset(cfg.model_copy(update={"val_fraction": 0.1}))  # written once: never silently re-split


# ------------------------------------------------------------------ CIFAR files and bad files


def _cifar_tarball(dest: Path, rng: np.random.Generator, per_batch: int = 20) -> dict[str, tuple[np.ndarray, list]]:
    """A tiny cifar-10-python.tar.gz in the published layout: pickled dicts, data (N, 3072) R|G|B planes."""
    batches = {}
    with tarfile.open(dest / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            batch = {"data": data, "labels": (np.arange(per_batch) % 10).tolist()}
            blob = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            batches[name] = (data, batch["labels"])
    return batches


def test_cifar_splits_from_supplied_archive_are_raw_exact(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    batches = _cifar_tarball(src, np.random.default_rng(1))
    paths = write_dataset("cifar10", tmp_path / "out", source_dir=src)
    splits = {name: _read(path) for name, path in zip(("train", "val", "test"), paths, strict=True)}

    def planes_to_hwc(data: np.ndarray) -> np.ndarray:
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    # test = the official test batch, in order; train + val = the 100 training images (5 x 20), disjoint
    data, labels = batches["test_batch"]
    assert np.array_equal(splits["test"]["label"], labels) and np.array_equal(splits["test"]["index"], np.arange(20))
    assert np.array_equal(splits["test"]["image"], planes_to_hwc(data))
    train_images = planes_to_hwc(np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]))
    train_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    for name in ("train", "val"):
        index = splits[name]["index"]
        assert np.array_equal(splits[name]["image"], train_images[index])
        assert np.array_equal(splits[name]["label"], train_labels[index])
    assert np.array_equal(np.sort(np.concatenate([splits["train"]["index"], splits["val"]["index"]])), np.arange(100))
    # val = 10 % of the training images (5,000 of 50,000 on the real archive), one per class here
    assert np.bincount(splits["val"]["label"]).tolist() == [1] * 10


def test_cifar_offline_says_how_to_supply_files(tmp_path, monkeypatch):
    monkeypatch.setenv("KN_DIST_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cifar-100-python\.tar\.gz.*kriz/cifar-100-python\.tar\.gz.*--source"):
        write_dataset("cifar100", tmp_path / "out", source_dir=tmp_path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, digits_cfg) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    good = resolve_beton_paths(digits_cfg)[1].read_bytes()
    files = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "truncated_tail": good[:-10],
        "random": np.random.default_rng(0).integers(0, 256, size=1 << 20, dtype=np.uint8).tobytes(),
        "text": b"this is a CSV file, not a beton\n" * 100,
    }
    for name, blob in files.items():
        (root / f"{name}.beton").write_bytes(blob)
    return {name: root / f"{name}.beton" for name in [*files, "missing"]}


@pytest.mark.parametrize("kind", ["empty", "truncated", "truncated_tail", "random", "text", "missing"])
def test_bad_files_give_one_clear_sentence(bad_files, kind, capsys):
    path = bad_files[kind]
    with pytest.raises(UserError, match=re.escape(str(path))):
        inspect_beton(path)
    cfg = DataConfig(dataset="digits", train_path=str(path), val_path=str(path))
    with pytest.raises(UserError, match=re.escape(str(path))):
        loaders(cfg, 0, 1, CPU)
    assert cli.main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kn-dist: error: ") and err.count("\n") == 1 and str(path) in err


def test_partial_file_at_final_name_is_not_reused(bad_files, tmp_path):
    out = tmp_path / "digits"
    out.mkdir()
    (out / "train.beton").write_bytes(bad_files["truncated"].read_bytes())
    with pytest.raises(UserError, match="truncated"):
        write_dataset("digits", out)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # no temp file left behind


# ------------------------------------------------------------------ GPU path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batches_on_device_channels_last(digits_cfg):
    train, _ = loaders(digits_cfg, 0, 1, torch.device("cuda:0"), channels_last=True)
    x, y = next(iter(train))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (64, 3, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_and_cpu_paths_draw_the_same_augmentations(digits_cfg):
    cfg = digits_cfg.model_copy(update={"cutout": 8})
    batches = {}
    for device in (CPU, torch.device("cuda:0")):
        loader = train_loader(cfg, 0, 1, device, seed=11)
        loader.next_epoch = 3
        batches[device.type] = [(x.cpu(), y.cpu()) for x, y in loader][:4]
    for (xc, yc), (xg, yg) in zip(batches["cpu"], batches["cuda"], strict=True):
        assert torch.equal(yc, yg)
        torch.testing.assert_close(xg, xc, rtol=0, atol=1e-5)  # normalised in torch vs the CPU kernel
