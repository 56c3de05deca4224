"""The strong-augmentation training pipeline through a real FFCV loader on the real digits .beton files.

The loader's batches are rebuilt from outside it: the raw images (FFCV's own Reader), the sample order FFCV's
traversal gives for each epoch, the translate / flip reference of tests/data_helpers.py, then
StrongAugment.transform (checked against torchvision in test_strong_augment.py). With
`data.repeated_augmentation: 2` an epoch is two passes, FFCV epochs 2e and 2e + 1. On a CUDA machine the
GPU path must give the same batches as the CPU path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import ref_augment, ref_params

from kn_dist.config import DataConfig
from kn_dist.data import train_loader
from kn_dist.data.augment import RepeatedPasses
from kn_dist.data.catalog import spec
from kn_dist.data.checks import open_splits
from kn_dist.data.strong_augment import StrongAugment

CPU = torch.device("cpu")
SEED = 11
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("data")
    return DataConfig(
        dataset="digits",
        root=str(root),
        batch_size=64,
        num_workers=1,
        crop_padding=2,
        hflip=True,
        randaugment_ops=2,
        color_jitter=0.2,
        random_erasing=0.5,
        repeated_augmentation=2,
    )


def _raw_images(path: Path) -> np.ndarray:
    from ffcv.reader import Reader

    meta = Reader(str(path)).metadata  # fields in file order: f0 image, f1 label, f2 index
    return np.stack(
        [
            np.fromfile(path, dtype=np.uint8, count=int(h) * int(w) * 3, offset=int(ptr)).reshape(h, w, 3)
            for h, w, ptr in zip(meta["f0"]["height"], meta["f0"]["width"], meta["f0"]["data_ptr"], strict=True)
        ]
    )


def _expected(cfg: DataConfig, raw: np.ndarray, indices: np.ndarray, epoch: int) -> torch.Tensor:
    h, w = raw.shape[1:3]
    crops = [ref_augment(raw[i], ref_params(SEED, epoch, int(i), 2, True, 0, h, w), 2, 0, 0) for i in indices]
    s = spec("digits")
    op = StrongAugment(SEED, cfg, tuple(255.0 * m for m in s.mean), tuple(255.0 * v for v in s.std))
    return op.transform(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2), indices, epoch)


def test_repeated_passes_and_strong_augmentation_rebuilt_from_raw_images(cfg):
    loader = train_loader(cfg, 0, 1, CPU, seed=SEED)
    assert isinstance(loader, RepeatedPasses) and len(loader) == 2 * len(loader.loader)
    info, _ = open_splits(cfg, None, None)
    raw = _raw_images(Path(info["train_path"]))
    loader.next_epoch = 1  # the second epoch: FFCV epochs 2 and 3
    batches = [(x.clone(), y.clone()) for x, y in loader]  # FFCV reuses its output buffers
    per_pass = len(loader.loader)
    assert len(batches) == 2 * per_pass and loader.next_epoch == 2 and loader.loader.next_epoch == 4
    for ffcv_epoch, first in ((2, 0), (3, per_pass)):
        order = loader.loader.traversal_order.sample_order(ffcv_epoch)
        for b in (0, per_pass - 1):
            images, labels = batches[first + b]
            indices = np.asarray(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
            torch.testing.assert_close(images, _expected(cfg, raw, indices, ffcv_epoch), rtol=0, atol=0)
    # the two passes of one epoch are different augmentations (and orders) of the same images
    assert not torch.equal(batches[0][0], batches[per_pass][0])


def test_the_gpu_paths_operations_in_an_ffcv_pipeline_give_the_cpu_paths_batches(cfg):
    """The GPU path's pipeline without its ToDevice (uint8 to torch, StrongAugment's torch ops), run on the CPU
    inside FFCV, against the CPU path's loader (the numba kernel): the same batches, float for float."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    from kn_dist.data.augment import SeededAugment, SeededLoader

    one_pass = cfg.model_copy(update={"repeated_augmentation": 1})
    cpu = train_loader(one_pass, 0, 1, CPU, seed=SEED)
    s = spec("digits")
    mean, std = tuple(255.0 * m for m in s.mean), tuple(255.0 * v for v in s.std)
    image = [
        SimpleRGBImageDecoder(),
        SeededAugment(SEED, pad=2, flip=True),
        ToTensor(),
        ToTorchImage(channels_last=True),
    ]
    image.append(StrongAugment(SEED, one_pass, mean, std, on_device=True))
    info, _ = open_splits(cfg, None, None)
    pipelines = {"image": image, "label": [IntDecoder(), ToTensor(), Squeeze(1)], "index": None}
    device_path = SeededLoader(
        info["train_path"], batch_size=64, drop_last=True, order=OrderOption.RANDOM, seed=SEED, pipelines=pipelines
    )
    for loader in (cpu, device_path):
        loader.next_epoch = 5
    for (xc, yc), (xd, yd) in zip(cpu, device_path, strict=True):
        assert torch.equal(yc, yd) and torch.equal(xc, xd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_and_cpu_strong_pipelines_give_the_same_batches(cfg):
    batches = {}
    for device in (CPU, torch.device("cuda:0")):
        loader = train_loader(cfg.model_copy(update={"repeated_augmentation": 1}), 0, 1, device, seed=SEED)
        loader.next_epoch = 3
        batches[device.type] = [(x.cpu().clone(), y.cpu().clone()) for x, y in loader][:6]
    for (xc, yc), (xg, yg) in zip(batches["cpu"], batches["cuda"], strict=True):
        assert torch.equal(yc, yg) and torch.equal(xc, xg)  # the same torch ops: bit-identical
