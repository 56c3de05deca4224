"""`kn-dist bench data`, ImageNet case (issue 26): decode + RandomResizedCrop(224) + flip per CPU core from
imagefolder JPEG files written as kn_dist writes ImageNet, beside FFCV's published figure.

FFCV's ImageNet benchmark (docs.ffcv.io/benchmarks.html, "Data loading"): 31,278 images/s from RAM,
512 px JPEG quality 90, RandomResizedCrop to 224 + random horizontal flip, all cores of an AWS
p3dn.24xlarge (96 vCPUs), i.e. 325.8 images/s per vCPU. Here one loader thread (one core) runs the same
work on photo-like 500x375 JPEGs written at max side 512, quality 90: kn_dist's seeded decoder
(kn_dist.data.imagenet_pipeline) + seeded flip, and FFCV's own RandomResizedCropRGBImageDecoder +
RandomHorizontalFlip on the same file, interleaved (medians of the repeats; a warm-up pass first).
ratio = ours per core / FFCV's published per vCPU, target >= 1.0 (another CPU: compare on a quiet
machine); `vs_ffcv_decoder` = ours / FFCV's decoder here, which the seeded crop should keep >= 0.9.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

PUBLISHED_IMAGES_PER_S = 31_278  # FFCV, RAM, 512 px, JPEG 90 %, all cores
PUBLISHED_VCPUS = 96  # p3dn.24xlarge
SIDE, BATCH = 224, 64


def _photo_folder(root: Path, n: int) -> None:
    """`n` photo-like 500x375 JPEGs (smooth colour fields + grain), quality 90, in 10 class folders."""
    rng = np.random.default_rng(2)
    for split, count in (("train", n), ("val", 10)):
        for i in range(count):
            folder = root / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC), dtype=np.float64)
            grain = rng.normal(0, 8, size=(375, 500, 3))
            Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def _rate(loader) -> float:
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def case_imagenet_per_core(tmp: Path, n: int, repeats: int) -> dict:
    """The per-core decode + RandomResizedCrop case (see the module doc)."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    from kn_dist.data import write_dataset
    from kn_dist.data.augment import SeededAugment
    from kn_dist.data.imagenet_pipeline import ScheduledLoader, SeededRandomResizedCrop

    _photo_folder(tmp / "photos", n)
    train = write_dataset(
        "imagefolder", tmp / "photos_beton", source_dir=tmp / "photos", max_side=512, jpeg_quality=90, val_fraction=0.1
    ).train
    common = {"batch_size": BATCH, "num_workers": 1, "order": OrderOption.RANDOM, "seed": 0, "drop_last": False}
    label = [IntDecoder(), ToTensor()]
    ours = ScheduledLoader(
        str(train),
        pipelines={
            "image": [SeededRandomResizedCrop((SIDE, SIDE), seed=0), SeededAugment(0, flip=True), ToTensor()],
            "label": label,
            "index": None,
        },
        **common,
    )
    stock = Loader(
        str(train),
        pipelines={
            "image": [RandomResizedCropRGBImageDecoder((SIDE, SIDE)), RandomHorizontalFlip(), ToTensor()],
            "label": [IntDecoder(), ToTensor()],
            "index": None,
        },
        **common,
    )
    _rate(ours), _rate(stock)  # warm-up: JIT compilation, page cache
    ours_rates, stock_rates = [], []
    for _ in range(repeats):
        ours_rates.append(_rate(ours))
        stock_rates.append(_rate(stock))
    per_core, stock_per_core = statistics.median(ours_rates), statistics.median(stock_rates)
    published = PUBLISHED_IMAGES_PER_S / PUBLISHED_VCPUS
    return {
        "name": "imagenet_jpeg512_randomresizedcrop224_flip_per_core",
        "images": n,
        "batch_size": BATCH,
        "loader_threads": 1,
        "images_per_s_per_core": round(per_core, 1),
        "ffcv_decoder_images_per_s_per_core": round(stock_per_core, 1),
        "runs": [round(r, 1) for r in ours_rates],
        "ffcv_decoder_runs": [round(r, 1) for r in stock_rates],
        "published_images_per_s_per_vcpu": round(published, 1),
        "published_source": "docs.ffcv.io/benchmarks.html: 31,278 img/s, RAM, 512 px JPEG 90, p3dn.24xlarge",
        "vs_ffcv_decoder": round(per_core / stock_per_core, 3),
        "ratio": round(per_core / published, 3),
        "target": 1.0,
    }
