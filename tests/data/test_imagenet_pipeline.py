"""ImageNet-style data on real JPEG files: the writer's JPEG/raw share, seeded RandomResizedCrop decoding with
progressive resizing, the centre-crop eval, and ffcv-imagenet's resolution ramp.

References, written from the docs and papers, not from kn_dist's code: the crop window in plain Python
integers from kn_dist.data.imagenet_pipeline's module doc (torchvision's RandomResizedCrop.get_params
driven by SplitMix64 draws); pixels from the source files through OpenCV directly (INTER_AREA resize, as
FFCV's writer and resize_crop use); ffcv-imagenet's get_resolution with np.interp as its code has it.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from data_helpers import GOLDEN, M64, sm64, to_uint8_hwc
from imagefolder_helpers import write_digit_jpegs
from PIL import Image

from kn_dist.cli import main
from kn_dist.config import DataConfig, ProgressiveResizing
from kn_dist.data import eval_loader, train_loader, write_dataset, write_train_plus_val
from kn_dist.data.beton import open_beton
from kn_dist.data.imagenet_pipeline import ramp_resolution
from kn_dist.data.sources import imagefolder_pools
from kn_dist.errors import UserError

CPU = torch.device("cpu")
SEED, MAX_SIDE, GLOBAL = 7, 40, 8
RAMP = ProgressiveResizing(min_res=16, max_res=24, start_ramp=0, end_ramp=1, step=8)
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    source = write_digit_jpegs(root / "src", train_per_class=6, val_per_class=2, classes=5)
    paths = write_dataset("imagefolder", root / "out", source_dir=source, max_side=MAX_SIDE, compress_probability=0.5)
    return source, paths


def _stored(source, split_dir: str, beton) -> list[np.ndarray]:
    """What the writer stored for each sample of `beton`: the source file, longest side cut to MAX_SIDE."""
    files = imagefolder_pools(source)[split_dir].files
    out = []
    for i in beton.labels("index"):
        with Image.open(files[i]) as img:
            rgb = np.asarray(img.convert("RGB"))
        scale = MAX_SIDE / max(rgb.shape[:2])
        if scale < 1:
            size = (int(rgb.shape[1] * scale), int(rgb.shape[0] * scale))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        out.append(rgb)
    return out


def _ref_window(seed: int, epoch: int, index: int, h: int, w: int) -> tuple[int, int, int, int]:
    key = sm64(sm64(sm64(seed) ^ epoch) ^ index)
    rkey = sm64(key ^ 0x5252435F43524F50)

    def u(j: int) -> float:
        return (sm64((rkey + j * GOLDEN) & M64) >> 11) / 2.0**53

    for t in range(10):
        area = h * w * (0.08 + 0.92 * u(4 * t))
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u(4 * t + 1))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u(4 * t + 2) * (h - ch + 1)), int(u(4 * t + 3) * (w - cw + 1)), ch, cw
    ratio = w / h
    ch, cw = (round(w / (3 / 4)), w) if ratio < 3 / 4 else ((h, round(h * 4 / 3)) if ratio > 4 / 3 else (h, w))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def test_jpeg_share_is_recorded_reproducible_and_decodes(written, tmp_path):
    source, paths = written
    modes = {split: open_beton(p).metadata["image"]["mode"] for split, p in zip("tvs", paths, strict=True)}
    all_modes = np.concatenate(list(modes.values()))
    assert 0.25 < (all_modes == 0).mean() < 0.75, "compress probability 0.5: about half JPEG (mode 0), half raw"
    meta = json.loads((paths.train.parent / "splits.json").read_text())
    assert meta["encoding"] == {"max_side": MAX_SIDE, "jpeg_quality": 90, "compress_probability": 0.5}
    # The same folder written again gives the same choice per image (not FFCV's np.random in each process).
    again = write_dataset(
        "imagefolder", tmp_path / "again", source_dir=source, max_side=MAX_SIDE, compress_probability=0.5
    )
    assert np.array_equal(open_beton(again.train).metadata["image"]["mode"], modes["t"])
    with pytest.raises(UserError, match="was written with"):
        write_dataset("imagefolder", paths.train.parent, source_dir=source, max_side=MAX_SIDE, compress_probability=0.1)
    # A study's train+val file keeps the directory's encoding: each image stored as it is in its split.
    trainval = write_train_plus_val("imagefolder", paths.train.parent, source_dir=source, image_size=32)
    assert np.array_equal(open_beton(trainval).metadata["image"]["mode"], np.concatenate([modes["t"], modes["v"]]))
    for bad in (["--compress-probability", "1.5"], ["--jpeg-quality", "0"]):
        assert main(["data", "write", "imagefolder", "--source", str(source), "--out", str(tmp_path / "x"), *bad]) == 2
    assert main(["data", "write", "digits", "--out", str(tmp_path / "d"), "--compress-probability", "0.5"]) == 2


def test_seeded_random_resized_crops_with_progressive_resizing(written):
    source, paths = written
    cfg = DataConfig(
        dataset="imagefolder",
        train_path=str(paths.train),
        val_path=str(paths.val),
        image_size=24,
        batch_size=4,
        normalization="unit",  # x / 255: the uint8 pixels come back exactly
        hflip=False,
        num_workers=1,
        progressive=RAMP,
    )
    beton = open_beton(paths.train)
    stored, modes = _stored(source, "train", beton), beton.metadata["image"]["mode"]
    loader = train_loader(cfg, 0, 1, CPU, seed=SEED, global_batch=GLOBAL)
    n = beton.num_samples
    assert len(loader) == (n // GLOBAL) * GLOBAL // cfg.batch_size  # whole global batches only
    for epoch, side in ((0, 16), (1, 24)):  # the ramp: 16 px at epoch 0, 24 px from epoch 1
        got = np.concatenate([to_uint8_hwc(x, [0.0] * 3, [255.0] * 3) for x, _ in loader])
        assert loader.current_resolution == side and got.shape[1:] == (side, side, 3)
        order = np.random.default_rng((SEED, epoch)).permutation(n)[: len(got)]  # global_batch's documented order
        raw_checked = 0
        for image, p in zip(got, order, strict=True):
            top, left, h, w = _ref_window(SEED, epoch, int(p), *stored[p].shape[:2])
            crop = stored[p][top : top + h, left : left + w]
            want = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
            diff = np.abs(image.astype(int) - want.astype(int))
            if modes[p] == 1:  # raw: the stored pixels exactly, so the same window gives the same bytes
                assert diff.max() <= 1, f"epoch {epoch}, sample {p}: window or resize differs"
                raw_checked += 1
            else:  # JPEG q90 of the stored pixels, decoded by libjpeg-turbo
                assert diff.mean() < 6, f"epoch {epoch}, sample {p}: mean error {diff.mean():.1f}"
        assert raw_checked >= 5


def test_centre_crop_eval_at_the_recipe_ratio(written):
    source, paths = written
    cfg = DataConfig(
        dataset="imagefolder",
        train_path=str(paths.train),
        val_path=str(paths.val),
        test_path=str(paths.test),
        image_size=24,
        val_image_size=20,
        batch_size=4,
        normalization="unit",
        num_workers=1,
    )
    beton = open_beton(paths.test)
    stored, modes = _stored(source, "val", beton), beton.metadata["image"]["mode"]
    got = np.concatenate(
        [to_uint8_hwc(x, [0.0] * 3, [255.0] * 3) for x, _ in eval_loader(cfg, 0, 1, CPU, split="test")]
    )
    assert got.shape == (beton.num_samples, 20, 20, 3)
    for p, image in enumerate(got):
        h, w = stored[p].shape[:2]
        c = int(224 / 256 * min(h, w))  # torchvision Resize(256) + CenterCrop(224): 224/256 of the short side
        crop = stored[p][(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
        want = cv2.resize(crop, (20, 20), interpolation=cv2.INTER_AREA)
        diff = np.abs(image.astype(int) - want.astype(int))
        assert (diff.max() <= 1) if modes[p] == 1 else (diff.mean() < 6), p


def _ffcv_get_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int, start_ramp: int) -> int:
    # ffcv-imagenet train_imagenet.py, ImageNetTrainer.get_resolution
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


# ffcv-imagenet rn50_configs/rn50_88_epochs.yaml, rn18_configs/rn18_16_epochs.yaml, and a long ramp over
# several multiples of 32
@pytest.mark.parametrize(
    "epochs,start,end,low,high", [(88, 65, 76, 160, 192), (16, 11, 13, 160, 192), (40, 3, 30, 96, 256)]
)
def test_progressive_ramp_is_ffcv_imagenets(epochs, start, end, low, high):
    ramp = ProgressiveResizing(min_res=low, max_res=high, start_ramp=start, end_ramp=end)
    for epoch in range(epochs):
        assert ramp_resolution(epoch, ramp) == _ffcv_get_resolution(epoch, low, high, end, start), epoch


def test_every_side_of_the_ramp_is_checked_before_training(written, tmp_path):
    from kn_dist import config
    from kn_dist.prepare import prepare_config

    _, paths = written
    raw = {
        "epochs": 4,
        "data": {
            "dataset": "imagefolder",
            "train_path": str(paths.train),
            "val_path": str(paths.val),
            "image_size": 128,
            "batch_size": 8,
            "progressive": {"min_res": 64, "max_res": 128, "start_ramp": 0, "end_ramp": 3},
        },
        "model": {"name": "knresnet18"},  # its geometry needs >= 96 px
        "checkpoint": {"storage_path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    with pytest.raises(UserError, match="cannot be built for 64x64 inputs"):
        prepare_config(config.from_dict(raw))
    raw["data"]["progressive"]["min_res"] = 96  # 96, 128 (ramp rounds to multiples of 32): both fine
    assert prepare_config(config.from_dict(raw)).data.progressive.min_res == 96
