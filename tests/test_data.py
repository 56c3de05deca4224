"""kn_dist.data against independent references: scikit-learn's digits, the published CIFAR pickle layout,
FFCV's own Reader and DistributedSampler, and the arrays we wrote. Real .beton files, real FFCV loaders.

Each FFCV loader JIT-compiles on its first epoch (seconds each), so loaders are built once per module
and only the ones the evidence needs are iterated.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from kn_dist import cli
from kn_dist.config import DataConfig
from kn_dist.data import check_dataset, inspect_beton, loaders, resolve_beton_paths, write_dataset
from kn_dist.data.catalog import DATASETS
from kn_dist.data.writers import _ArrayDataset, digits_arrays, write_beton
from kn_dist.errors import UserError

CPU = torch.device("cpu")
# numba's dispatcher finalizer raises a KeyError at garbage collection for FFCV's compiled imdecode
# (harmless, printed by pytest as an unraisable-exception warning); keep the output readable.
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int):
    """A real (fake-backend) process group saying "rank r of w" in this one process: what FFCV's
    distributed sampler reads when the loader is built, without spawning processes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _to_uint8_hwc(batch: torch.Tensor, mean255, std255) -> np.ndarray:
    """Undo Normalize: (N, 3, H, W) float -> (N, H, W, 3) uint8 (exact when the pixels were exact)."""
    mean = torch.tensor(mean255).view(1, 3, 1, 1)
    std = torch.tensor(std255).view(1, 3, 1, 1)
    return (batch * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------ digits: the built-in dataset


@pytest.fixture(scope="module")
def digits_cfg(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("data")
    return DataConfig(dataset="digits", root=str(root), batch_size=64, num_workers=2)


def test_resolve_writes_digits_once_with_absolute_paths(digits_cfg, monkeypatch):
    monkeypatch.chdir(Path(digits_cfg.root).parent)
    relative = digits_cfg.model_copy(update={"root": Path(digits_cfg.root).name})
    train, val = resolve_beton_paths(relative)
    assert train.is_absolute() and train == Path(digits_cfg.root) / "digits" / "train.beton" and val.is_file()
    mtime = train.stat().st_mtime_ns
    assert write_dataset("digits", train.parent) == (train, val)  # reused, not rewritten
    assert train.stat().st_mtime_ns == mtime


def test_digits_match_scikit_learn(digits_cfg):
    from ffcv.reader import Reader
    from sklearn.datasets import load_digits

    train, val = resolve_beton_paths(digits_cfg)
    target = load_digits().target
    labels = [np.asarray(Reader(str(p)).metadata["f1"]) for p in (train, val)]  # FFCV's own reader
    assert (len(labels[0]), len(labels[1])) == (1437, 360) == (DATASETS["digits"].train_size, 360)
    assert np.array_equal(np.bincount(np.concatenate(labels), minlength=10), np.bincount(target))
    # stratified 20 % split: every class has 20 % +- 1 sample in val
    assert np.all(np.abs(np.bincount(labels[1], minlength=10) - 0.2 * np.bincount(target)) <= 1)
    info = inspect_beton(train)
    assert info["image"]["min_hw"] == info["image"]["max_hw"] == [32, 32] and info["label"]["distinct"] == 10


@pytest.mark.slow
def test_raw_round_trip_is_bit_exact_through_the_val_loader(digits_cfg):
    _, val = loaders(digits_cfg, 0, 1, CPU)
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in val], strict=True)
    x = torch.cat(images)
    assert x.dtype == torch.float32 and x.shape == (360, 3, 32, 32) and torch.cat(labels).dtype == torch.int64
    spec = DATASETS["digits"]
    assert abs(float(x.mean())) < 0.1  # mean/std normalisation actually applied
    got = _to_uint8_hwc(x, [255 * m for m in spec.mean], [255 * s for s in spec.std])
    _, _, x_val, y_val = digits_arrays(32)
    assert np.array_equal(got, x_val) and np.array_equal(torch.cat(labels).numpy(), y_val)


def test_check_dataset_refuses_bad_labels_and_resolutions(digits_cfg):
    info = check_dataset(digits_cfg, num_classes=10, input_size=32)
    assert info["num_classes"] == 10 and info["train_size"] == 1437 and Path(info["train_path"]).is_absolute()
    with pytest.raises(UserError, match=r"labels in \[0, 9\].*5 classes"):
        check_dataset(digits_cfg, num_classes=5)
    with pytest.raises(UserError, match="built for 224x224"):
        check_dataset(digits_cfg, input_size=224)
    with pytest.raises(UserError, match="holds 32x32 images but data.image_size is 64"):
        check_dataset(digits_cfg.model_copy(update={"image_size": 64}))


# ------------------------------------------------------------------ JPEG / imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """An ImageNet-layout folder of PNG digits (32x32, classes "c0".."c2"); returns (root, val images, labels)."""
    root = tmp_path_factory.mktemp("folder")
    x_tr, y_tr, x_va, y_va = digits_arrays(32)
    keep_va = []
    for split, xs, ys, n in (("train", x_tr, y_tr, 8), ("val", x_va, y_va, 4)):
        for cls in range(3):
            (root / split / f"c{cls}").mkdir(parents=True)
            for k, i in enumerate(np.flatnonzero(ys == cls)[:n]):
                Image.fromarray(xs[i]).save(root / split / f"c{cls}" / f"{k:03d}.png")
                if split == "val":
                    keep_va.append((xs[i], cls))
    return root, np.stack([a for a, _ in keep_va]), np.array([c for _, c in keep_va])


@pytest.mark.slow
def test_jpeg_round_trip_within_psnr(folder, tmp_path):
    root, x_val, y_val = folder
    train, val = write_dataset("imagefolder", tmp_path / "out", source_dir=root, max_side=32, jpeg_quality=90)
    info = inspect_beton(val)
    assert info["image"]["jpeg_samples"] == 12 and info["num_samples"] == 12
    # Read the JPEG beton through the plain (fixed-resolution) val pipeline: decode only.
    cfg = DataConfig(dataset="digits", train_path=str(train), val_path=str(val), normalization="unit", batch_size=8)
    _, loader = loaders(cfg, 0, 1, CPU)
    x, y = map(torch.cat, zip(*[(a.clone(), b.clone()) for a, b in loader], strict=True))
    assert np.array_equal(y.numpy(), y_val)  # classes = sorted folder names, files in sorted order
    got = _to_uint8_hwc(x, [0.0] * 3, [255.0] * 3).astype(np.float64)
    mse = ((got - x_val.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
    assert psnr.min() >= 30.0, f"JPEG quality 90 should stay above 30 dB PSNR, got {psnr.min():.1f}"
    assert not np.array_equal(got, x_val)  # it really is lossy JPEG, not raw


@pytest.mark.slow
def test_imagefolder_pipeline_crops_to_image_size_with_cutout(folder, tmp_path):
    root, _, _ = folder
    cfg = DataConfig(
        dataset="imagefolder", source_dir=str(root), root=str(tmp_path), image_size=24, batch_size=8, cutout=6
    )
    assert check_dataset(cfg)["num_classes"] == 3  # from the labels: imagefolder has no fixed class count
    train, val = loaders(cfg, 0, 1, CPU)
    (xt, yt), (xv, _) = next(iter(train)), next(iter(val))
    assert xt.shape == (8, 3, 24, 24) and xv.shape == (8, 3, 24, 24) and yt.max() < 3
    # every training image has one 6x6 square of the mean colour (normalised: round(255 m) / 255 - m) / s)
    spec = DATASETS["imagefolder"]
    fill = torch.tensor([(round(255 * m) - 255 * m) / (255 * s) for m, s in zip(spec.mean, spec.std, strict=True)])
    is_fill = (xt - fill.view(1, 3, 1, 1)).abs().amax(dim=1) < 1e-5  # (B, H, W)
    windows = is_fill.float().unfold(1, 6, 1).unfold(2, 6, 1).amin(dim=(-1, -2))  # (B, 19, 19)
    assert bool((windows.amax(dim=(1, 2)) == 1).all())


# ------------------------------------------------------------------ sharding across ranks

N_INDEX = 250  # 125 per rank: not a multiple of the batch size, so drop_last matters


@pytest.fixture(scope="module")
def index_cfg(tmp_path_factory) -> tuple[DataConfig, np.ndarray]:
    """Random 32x32 images whose label is their own index, so a batch tells which samples it holds."""
    images = np.random.default_rng(0).integers(0, 256, size=(N_INDEX, 32, 32, 3), dtype=np.uint8)
    path = write_beton(tmp_path_factory.mktemp("index") / "index.beton", _ArrayDataset(images, np.arange(N_INDEX)))
    cfg = DataConfig(dataset="synthetic", train_path=str(path), val_path=str(path), batch_size=16, normalization="unit")
    return cfg, images


def _rank_loaders(cfg: DataConfig, world_size: int = 2, seed: int = 0):
    out = []
    for rank in range(world_size):
        with fake_rank(rank, world_size):
            out.append(loaders(cfg, rank, world_size, CPU, seed=seed))
    return out


@pytest.mark.slow
def test_train_shards_are_disjoint_cover_and_follow_seed_and_epoch(index_cfg):
    cfg, images = index_cfg
    (tr0, va0), (tr1, va1) = _rank_loaders(cfg)
    o0, o1 = tr0.traversal_order.sample_order(0), tr1.traversal_order.sample_order(0)
    assert len(o0) == len(o1) == N_INDEX // 2 and len(tr0) == len(tr1) == (N_INDEX // 2) // 16
    assert not set(o0.tolist()) & set(o1.tolist()) and set(o0.tolist()) | set(o1.tolist()) == set(range(N_INDEX))
    # reference: PyTorch's DistributedSampler, which FFCV's distributed mode emulates
    ref = torch.utils.data.DistributedSampler(range(N_INDEX), num_replicas=2, rank=1, shuffle=True, seed=0)
    ref.set_epoch(3)
    assert np.array_equal(tr1.traversal_order.sample_order(3), list(ref))
    assert not np.array_equal(tr0.traversal_order.sample_order(1), o0)  # reshuffled every epoch
    ((same, _), (other, _)) = _rank_loaders(cfg, seed=0)[:1] + _rank_loaders(cfg, seed=1)[:1]
    assert np.array_equal(same.traversal_order.sample_order(0), o0)
    assert not np.array_equal(other.traversal_order.sample_order(0), o0)

    # The loader really yields that order (up to drop_last) with translate <= 4 px + optional flip.
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in tr0], strict=True)
    labels = torch.cat(ys).numpy()
    assert np.array_equal(labels, o0[: len(labels)]) and len(labels) == 7 * 16
    got = _to_uint8_hwc(torch.cat(xs), [0.0] * 3, [255.0] * 3)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))  # zero fill, as RandomCrop(32, padding=4)
    for out, idx in zip(got[:40], labels[:40], strict=True):
        shifts = [padded[idx, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(np.array_equal(out, s) or np.array_equal(out, s[:, ::-1]) for s in shifts)

    # Validation: strided, unpadded shards that count every sample exactly once.
    assert sorted(np.concatenate([va0.indices, va1.indices]).tolist()) == list(range(N_INDEX))
    vlabels = torch.cat([y.clone() for _, y in va1]).numpy()
    assert np.array_equal(vlabels, va1.indices)


@pytest.mark.slow
def test_quasi_random_shards_are_equal_and_disjoint(index_cfg):
    cfg, _ = index_cfg
    (tr0, _), (tr1, _) = _rank_loaders(cfg.model_copy(update={"order": "quasi_random"}))
    assert len(tr0.indices) == len(tr1.indices) == N_INDEX // 2 and not set(tr0.indices) & set(tr1.indices)
    assert sorted(tr0.traversal_order.sample_order(0).tolist()) == sorted(tr0.indices.tolist())


def test_loaders_need_the_process_group(index_cfg):
    with pytest.raises(RuntimeError, match="process group"):
        loaders(index_cfg[0], 1, 2, CPU)


# ------------------------------------------------------------------ CIFAR files and bad files


def _cifar_tarball(dest: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny cifar-10-python.tar.gz in the published layout: pickled dicts, data (N, 3072) R|G|B planes."""
    batches = {}
    with tarfile.open(dest / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
            batch = {"data": data, "labels": rng.integers(0, 10, size=3).tolist()}
            blob = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            batches[name] = (data, batch["labels"])
    return batches


def test_cifar_from_supplied_archive_is_raw_exact(tmp_path):
    from ffcv.reader import Reader

    src = tmp_path / "src"
    src.mkdir()
    batches = _cifar_tarball(src, np.random.default_rng(1))
    _, val = write_dataset("cifar10", tmp_path / "out", source_dir=src)
    reader = Reader(str(val))
    data, labels = batches["test_batch"]
    assert np.array_equal(reader.metadata["f1"], labels)
    ptrs = reader.metadata["f0"]["data_ptr"]
    for i in range(3):  # raw mode stores H x W x 3 bytes at data_ptr
        stored = np.fromfile(val, dtype=np.uint8, count=3072, offset=int(ptrs[i])).reshape(32, 32, 3)
        assert np.array_equal(stored, data[i].reshape(3, 32, 32).transpose(1, 2, 0))


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
