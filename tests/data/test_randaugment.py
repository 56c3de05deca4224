"""kn_dist.data.randaugment against torchvision: the op set, the magnitude bins and the AutoAugment CIFAR-10
policy are torchvision's own tables; every op, at every RandAugment bin and both signs, equals torchvision's
`autoaugment._apply_op` (its tensor functional ops: F.affine, F.rotate, F.adjust_*, F.posterize, ...) on
single images, pixel for pixel. The one documented exception: shears, where torchvision's float32 sampling
grid may round an exact half-pixel tie the other way; those pixels must lie on the tie rows (columns).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode, RandAugment
from torchvision.transforms.autoaugment import _apply_op

from kn_dist.data import randaugment as ra

SIZES = [(32, 32), (20, 28)]  # square CIFAR size and a non-square one (translate spans each side)


def _images(h: int, w: int, n: int = 12) -> torch.Tensor:
    """Noise, smooth gradients and flat-ish patches: histograms, extremes and constant channels all occur."""
    g = torch.Generator().manual_seed(h * 100 + w)
    noise = torch.randint(0, 256, (n // 2, 3, h, w), generator=g, dtype=torch.uint8)
    small = torch.randint(0, 256, (n - n // 2, 3, 4, 4), generator=g).float()
    smooth = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    smooth = (smooth * 0.6 + 40).round().clamp(0, 255).to(torch.uint8)
    smooth[0, 1] = 77  # one constant channel: AutoContrast and Equalize leave it
    return torch.cat([noise, smooth])


def _torchvision(img: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    return torch.stack([_apply_op(x, name, magnitude, InterpolationMode.NEAREST, None) for x in img])


@pytest.mark.parametrize("h,w", SIZES)
def test_op_set_and_magnitude_bins_are_torchvisions(h, w):
    ours = ra.magnitude_bins(31, h, w)
    space = RandAugment()._augmentation_space(31, (h, w))
    assert list(space) == list(ra.OPS[: ra.NUM_RANDAUGMENT_OPS])
    for name, (magnitudes, signed) in space.items():
        assert (name in ra.SIGNED) == signed, name
        want = magnitudes.double().numpy() if magnitudes.ndim else np.zeros(31)
        np.testing.assert_array_equal(ours[name], want, err_msg=name)
    aa = AutoAugment(AutoAugmentPolicy.CIFAR10)
    assert [tuple(sub) for sub in aa.policies] == list(ra.AUTOAUGMENT_CIFAR10)
    ours10 = ra.magnitude_bins(ra.AUTOAUGMENT_BINS, h, w)
    for name, (magnitudes, signed) in aa._augmentation_space(ra.AUTOAUGMENT_BINS, (h, w)).items():
        assert (name in ra.SIGNED) == signed, name
        if magnitudes.ndim:
            np.testing.assert_array_equal(ours10[name], magnitudes.double().numpy(), err_msg=name)


def _tie_lines(name: str, magnitude: float, h: int, w: int) -> np.ndarray:
    """Rows (ShearX) or columns (ShearY) whose exact source offset m * (k + 1/2) is a half-pixel tie."""
    k = np.arange(h if name == "ShearX" else w)
    offset = np.abs(magnitude) * (k + 0.5)
    return k[np.abs(offset - np.floor(offset) - 0.5) < 1e-5]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("name", ra.OPS)
def test_each_op_at_every_bin_equals_torchvision(name, h, w):
    img = _images(h, w)
    bins = ra.magnitude_bins(31, h, w)[name]
    signs = (1.0, -1.0) if name in ra.SIGNED else (1.0,)
    mismatched, total = 0, 0
    for magnitude in {float(b) * s for b in bins for s in signs}:
        ours = ra.apply_op(name, img, np.full(len(img), magnitude))
        want = _torchvision(img, name, magnitude)
        assert ours.dtype == torch.uint8 and ours.shape == want.shape
        bad = ours != want
        total += bad.numel()
        if name not in ("ShearX", "ShearY"):
            assert not bad.any(), (name, magnitude, int(bad.sum()))
            continue
        lines = bad.any(dim=(0, 1, 3 if name == "ShearX" else 2)).nonzero().flatten().numpy()
        assert set(lines) <= set(_tie_lines(name, magnitude, h, w)), (magnitude, lines)
        mismatched += int(bad.sum())
    assert mismatched <= 0.005 * total  # ties are rare: a few pixels in a thousand at most


def test_a_batch_with_a_different_op_and_magnitude_per_image_equals_torchvision_image_by_image():
    # RandAugment(2, 9)'s and AutoAugment's magnitudes (no shear ties at bin 9 of 31) and ColorJitter-style
    # factors, applied in rounds as kn_dist.data.strong_augment does.
    h, w = 32, 32
    img = _images(h, w, n=40)
    rng = np.random.default_rng(0)
    bins = ra.magnitude_bins(31, h, w)
    ops = rng.integers(0, len(ra.OPS), size=(len(img), 3))
    mags = np.array([[bins[ra.OPS[o]][9] for o in row] for row in ops])
    mags *= np.where(rng.random(mags.shape) < 0.5, -1.0, 1.0) * np.isin(ops, [ra.OP_ID[n] for n in ra.SIGNED])
    mags[mags == 0] = np.abs(mags[mags == 0])  # no -0.0 where the op has no sign
    ours = ra.apply_ops(img, ops, mags)
    for i in range(len(img)):
        want = img[i]
        for op, m in zip(ops[i], mags[i], strict=True):
            want = _apply_op(want, ra.OPS[op], float(m), InterpolationMode.NEAREST, None)
        assert torch.equal(ours[i], want), (i, [ra.OPS[o] for o in ops[i]], mags[i])


def test_colour_jitter_ops_equal_torchvisions_adjust_functions():
    # ColorJitter(j, j, j) applies F.adjust_brightness / contrast / saturation with factors 1 + m.
    img = _images(32, 32)
    factors = np.linspace(0.6, 1.4, len(img))
    for name, fn in (
        ("Brightness", TF.adjust_brightness),
        ("Contrast", TF.adjust_contrast),
        ("Color", TF.adjust_saturation),
    ):
        ours = ra.apply_op(name, img, factors - 1.0)
        want = torch.stack([fn(x, float(f)) for x, f in zip(img, factors, strict=True)])
        assert torch.equal(ours, want), name


def test_apply_ops_never_writes_into_its_input():
    img = _images(32, 32)
    before = img.clone()
    ra.apply_ops(img, np.full((len(img), 2), ra.OP_ID["Invert"]), np.zeros((len(img), 2)))
    assert torch.equal(img, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_give_the_same_pixels():
    # Every op at two magnitudes per image, a different one per image: the GPU path must equal the CPU path.
    img = _images(32, 32, n=64)
    rng = np.random.default_rng(1)
    bins = ra.magnitude_bins(31, 32, 32)
    ops = rng.integers(0, len(ra.OPS), size=(len(img), 2))
    mags = np.array([[bins[ra.OPS[o]][rng.integers(31)] for o in row] for row in ops])
    cpu = ra.apply_ops(img, ops, mags)
    gpu = ra.apply_ops(img.cuda(), ops, mags).cpu()
    assert torch.equal(cpu, gpu)
