"""Loaders across ranks, uneven shards, and seeded augmentation, on real .beton files and FFCV loaders.

The sample's label is its own index, so a batch tells which samples it holds. References: PyTorch's
DistributedSampler (which FFCV's distributed mode emulates) and the plain-Python augmentation
reference in tests/data_helpers.py. Two ranks share one process through a fake-backend process
group (what FFCV's sampler reads when the loader is built).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import fake_rank, ref_augment, ref_params, to_uint8_hwc

from kn_dist.config import DataConfig
from kn_dist.data import eval_loader, loaders, train_loader
from kn_dist.data.sources import ArrayDataset
from kn_dist.data.writers import write_beton

CPU = torch.device("cpu")
N_TRAIN, N_VAL = 251, 33  # odd: FFCV pads the last train shard with a repeat; val splits 17 + 16
BATCH, SEED, PAD, CUTOUT = 16, 5, 4, 6
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def index_cfg(tmp_path_factory) -> tuple[DataConfig, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(N_TRAIN, 32, 32, 3), dtype=np.uint8)
    val = rng.integers(0, 256, size=(N_VAL, 32, 32, 3), dtype=np.uint8)
    root = tmp_path_factory.mktemp("index")
    train_path = write_beton(root / "train.beton", ArrayDataset(train, np.arange(N_TRAIN)))
    val_path = write_beton(root / "val.beton", ArrayDataset(val, np.arange(N_VAL)))
    cfg = DataConfig(
        dataset="synthetic",
        train_path=str(train_path),
        val_path=str(val_path),
        test_path=str(val_path),
        batch_size=BATCH,
        normalization="unit",  # x / 255: the uint8 pixels come back exactly
        crop_padding=PAD,
        cutout=CUTOUT,
        num_workers=2,
    )
    return cfg, train, val


def _rank_loaders(cfg: DataConfig, world_size: int = 2, seed: int = SEED):
    out = []
    for rank in range(world_size):
        with fake_rank(rank, world_size):
            out.append(loaders(cfg, rank, world_size, CPU, seed=seed))
    return out


@pytest.fixture(scope="module")
def rank_loaders(index_cfg):
    return _rank_loaders(index_cfg[0])


def _epoch(loader) -> tuple[np.ndarray, np.ndarray]:
    """One pass: (uint8 NHWC images, labels)."""
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader], strict=True)
    return to_uint8_hwc(torch.cat(xs), [0.0] * 3, [255.0] * 3), torch.cat(ys).numpy()


def _expected(images: np.ndarray, labels: np.ndarray, epoch: int) -> np.ndarray:
    fill = np.round(255 * np.array([0.5, 0.5, 0.5])).astype(np.uint8)  # synthetic's mean colour
    return np.stack(
        [
            ref_augment(images[i], ref_params(SEED, epoch, int(i), PAD, True, CUTOUT, 32, 32), PAD, CUTOUT, fill)
            for i in labels
        ]
    )


@pytest.mark.slow
def test_uneven_train_shards_are_padded_equal_and_follow_seed_and_epoch(index_cfg, rank_loaders):
    cfg, images, _ = index_cfg
    (tr0, _), (tr1, _) = rank_loaders
    o0, o1 = tr0.traversal_order.sample_order(0), tr1.traversal_order.sample_order(0)
    # 251 over 2 ranks: both read 126 (one sample repeated), so both run the same 7 steps
    assert len(o0) == len(o1) == 126 and len(tr0) == len(tr1) == 126 // BATCH
    counts = Counter(np.concatenate([o0, o1]).tolist())
    assert set(counts) == set(range(N_TRAIN)) and sorted(counts.values()).count(2) == 1
    for rank, loader in enumerate((tr0, tr1)):
        ref = torch.utils.data.DistributedSampler(range(N_TRAIN), num_replicas=2, rank=rank, shuffle=True, seed=SEED)
        ref.set_epoch(3)
        assert np.array_equal(loader.traversal_order.sample_order(3), list(ref))
    assert not np.array_equal(tr0.traversal_order.sample_order(1), o0)  # reshuffled every epoch
    ((same, _), (other, _)) = _rank_loaders(cfg)[:1] + _rank_loaders(cfg, seed=SEED + 1)[:1]
    assert np.array_equal(same.traversal_order.sample_order(0), o0)
    assert not np.array_equal(other.traversal_order.sample_order(0), o0)

    # Rank 1 holds the repeat; it yields its order (up to drop_last), each image augmented exactly as
    # the reference says for (seed, epoch 0, sample index).
    got, labels = _epoch(tr1)
    assert np.array_equal(labels, o1[: 7 * BATCH]) and len(labels) == 7 * BATCH
    assert np.array_equal(got, _expected(images, labels, epoch=0))


@pytest.mark.slow
def test_uneven_validation_counts_every_sample_exactly_once(index_cfg, rank_loaders):
    _, _, val_images = index_cfg
    (_, va0), (_, va1) = rank_loaders
    assert (len(va0.indices), len(va1.indices)) == (17, 16)
    seen = []
    for loader in (va0, va1):
        got, labels = _epoch(loader)
        assert np.array_equal(labels, loader.indices) and len(labels) == len(loader.indices)
        assert np.array_equal(got, val_images[labels])  # no augmentation in evaluation
        seen.append(labels)
    assert sum(map(len, seen)) == N_VAL and np.array_equal(np.sort(np.concatenate(seen)), np.arange(N_VAL))


@pytest.mark.slow
def test_a_resumed_loader_yields_exactly_the_uninterrupted_batches(index_cfg, rank_loaders):
    cfg, images, _ = index_cfg
    (_, _), (tr1, _) = rank_loaders
    tr1.next_epoch = 1  # the uninterrupted run, epochs 1 and 2 (FFCV counts from 0)
    epoch1, epoch2 = _epoch(tr1), _epoch(tr1)
    with fake_rank(1, 2):
        resumed = train_loader(cfg, 1, 2, CPU, seed=SEED)
    resumed.next_epoch = 2  # what the worker sets when it resumes after epoch 2 - 1
    again = _epoch(resumed)
    assert np.array_equal(again[1], epoch2[1]) and np.array_equal(again[0], epoch2[0])
    assert np.array_equal(epoch1[0], _expected(images, epoch1[1], epoch=1))
    assert np.array_equal(epoch2[0], _expected(images, epoch2[1], epoch=2))
    # the same sample looks different in another epoch (the draws depend on the epoch)
    common = np.intersect1d(epoch1[1], epoch2[1])
    first = {int(k): img for k, img in zip(epoch1[1], epoch1[0], strict=True)}
    second = {int(k): img for k, img in zip(epoch2[1], epoch2[0], strict=True)}
    assert np.mean([np.array_equal(first[k], second[k]) for k in common.tolist()]) < 0.2


@pytest.mark.slow
def test_uint8_augment_op_of_the_gpu_path_in_an_ffcv_pipeline(index_cfg):
    """The GPU path's pipeline up to ToDevice, on the CPU: decode, SeededAugment to uint8, ToTensor."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import OrderOption
    from ffcv.transforms import ToTensor

    from kn_dist.data.augment import SeededAugment, SeededLoader

    cfg, images, _ = index_cfg
    fill = (128.0, 128.0, 128.0)
    op = SeededAugment(SEED, pad=PAD, flip=True, cutout=CUTOUT, cutout_fill=fill)
    pipelines = {"image": [SimpleRGBImageDecoder(), op, ToTensor()], "label": [IntDecoder(), ToTensor()]}
    loader = SeededLoader(cfg.train_path, batch_size=64, order=OrderOption.RANDOM, seed=0, pipelines=pipelines)
    loader.next_epoch = 4
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (64, 32, 32, 3)
    labels = y.numpy().ravel()
    assert np.array_equal(x.numpy(), _expected(images, labels, epoch=4))


@pytest.mark.slow
def test_quasi_random_shards_are_equal_and_disjoint(index_cfg):
    cfg, _, _ = index_cfg
    (tr0, _), (tr1, _) = _rank_loaders(cfg.model_copy(update={"order": "quasi_random"}))
    assert len(tr0.indices) == len(tr1.indices) == N_TRAIN // 2 and not set(tr0.indices) & set(tr1.indices)
    assert sorted(tr0.traversal_order.sample_order(0).tolist()) == sorted(tr0.indices.tolist())


def test_loaders_need_the_process_group(index_cfg):
    with pytest.raises(RuntimeError, match="process group"):
        loaders(index_cfg[0], 1, 2, CPU)


def test_test_loader_needs_a_test_file(index_cfg):
    from kn_dist.errors import UserError

    cfg = index_cfg[0].model_copy(update={"test_path": None})
    with pytest.raises(UserError, match=r"no test split: set data.test_path"):
        eval_loader(cfg, 0, 1, CPU, split="test")
