"""An ImageNet-layout folder of real JPEG files for the tests (pytest puts tests/ on sys.path).

scikit-learn's handwritten digits (real data that ships offline), each upscaled to its own random size
and aspect ratio, so RandomResizedCrop and the centre crop meet the variable shapes ImageNet has, and
saved as JPEG class folders train/c<digit>/ and val/c<digit>/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digit_jpegs(
    root: Path, *, train_per_class: int, val_per_class: int, classes: int = 10, sides=(24, 48), seed: int = 0
) -> Path:
    """Write root/{train,val}/c<k>/<i>.jpg (quality 95) from sklearn's digits; returns root."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for cls in range(classes):
        members = np.flatnonzero(digits.target == cls)
        for split, chosen in (
            ("train", members[:train_per_class]),
            ("val", members[train_per_class : train_per_class + val_per_class]),
        ):
            folder = root / split / f"c{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                grey = np.rint(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # 8x8, 0..16 -> 0..255
                h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
                image = Image.fromarray(grey).resize((w, h), Image.BILINEAR).convert("RGB")
                image.save(folder / f"{i:04d}.jpg", quality=95)
    return root
