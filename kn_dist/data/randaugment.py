"""RandAugment / AutoAugment / ColorJitter image operations on a uint8 batch, one magnitude per image.

The operations are torchvision's tensor functional ops as `torchvision.transforms.RandAugment`,
`AutoAugment` and `ColorJitter` apply them to one image (`autoaugment._apply_op`, nearest
interpolation, zero fill), computed for a whole (B, C, H, W) uint8 batch with a per-image magnitude,
so the GPU path runs them on the device and nothing loops over images in Python. The op set and the
magnitude bins are torchvision's (`RandAugment._augmentation_space`: 14 ops, 31 bins; AutoAugment's
CIFAR-10 policy, Cubuk et al. CVPR 2019, 10 bins); tests/data/test_randaugment.py checks every op
against torchvision on single images.

Bit-exactness against torchvision, and between the CPU and the GPU, comes from doing the arithmetic
torchvision does in the same precision (float32 blends truncated to uint8, float32 grey levels,
integer histograms) with elementwise ops only, which IEEE rounding makes device-independent. Two
places differ in how, not in what:
- geometric ops compute each output pixel's source position in float64 and round half to even
  (what grid_sample's nearest mode does with torchvision's float32 grid); where the exact position is
  within float32 rounding of a half-pixel tie, torchvision's float32 grid may pick the other
  neighbour (a few pixels in a thousand, only for shears and rotations); float64 keeps CPU and GPU equal;
- the contrast mean and the sharpness blur are computed from exact integer sums (torchvision's float32
  sums of at most 2**24 grey levels are exact too, and its blur is never within rounding of a tie).
"""

from __future__ import annotations

import numpy as np
import torch

# torchvision's RandAugment op order (its `_augmentation_space` keys); AutoAugment adds Invert.
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
OP_ID = {name: i for i, name in enumerate(OPS)}
NUM_RANDAUGMENT_OPS = 14  # RandAugment draws among OPS[:14]
SIGNED = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
)

# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, Appendix; torchvision's AutoAugmentPolicy.CIFAR10):
# 25 sub-policies of two (op, probability, magnitude bin of 10) each.
AUTOAUGMENT_CIFAR10 = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
AUTOAUGMENT_BINS = 10


def magnitude_bins(num_bins: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Each op's magnitude per bin (float64 copies of torchvision's float32 values; 0 for magnitude-free ops).

    Translate spans 150/331 of the image side (the AutoAugment paper's 150 px of 331); Posterize keeps
    8 down to 4 bits; Solarize's threshold falls from 255 to 0.
    """
    ramp = {
        "ShearX": 0.3,
        "ShearY": 0.3,
        "TranslateX": 150.0 / 331.0 * width,
        "TranslateY": 150.0 / 331.0 * height,
        "Rotate": 30.0,
        "Brightness": 0.9,
        "Color": 0.9,
        "Contrast": 0.9,
        "Sharpness": 0.9,
    }
    table = {name: np.zeros(num_bins) for name in OPS}
    for name, top in ramp.items():
        table[name] = torch.linspace(0.0, top, num_bins).double().numpy()
    table["Posterize"] = (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()).double().numpy()
    table["Solarize"] = torch.linspace(255.0, 0.0, num_bins).double().numpy()
    return table


# ----------------------------------------------------------------------------- the operations


def _col(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-image values as a (n, 1, 1, 1) tensor."""
    return torch.as_tensor(np.ascontiguousarray(values), device=device).to(dtype).view(-1, 1, 1, 1)


def _blend(img: torch.Tensor, other: torch.Tensor, ratio: np.ndarray) -> torch.Tensor:
    """ratio * img + (1 - ratio) * other in float32, clamped, truncated to uint8 (torchvision's `_blend`).

    ratio and 1 - ratio are formed in float64 and rounded to float32 once, as Python floats are."""
    r = _col(ratio, torch.float32, img.device)
    q = _col(1.0 - ratio, torch.float32, img.device)
    return (r * img + q * other).clamp(0, 255).to(torch.uint8)


def _grey(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma as torchvision's rgb_to_grayscale: float32, truncated to uint8, (n, 1, H, W)."""
    r, g, b = img.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).unsqueeze(1)


def brightness(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    # The blend with black: its (1 - ratio) * 0 term adds +-0, which changes no float.
    return (_col(1.0 + m, torch.float32, img.device) * img).clamp(0, 255).to(torch.uint8)


def color(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    return _blend(img, _grey(img), 1.0 + m)


def contrast(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    grey = _grey(img)
    total = grey.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.int64).double()
    # = torchvision's float32 mean: an exact sum, one correctly rounded division (by a tensor: CUDA turns a
    # division by a Python number into a multiplication by its reciprocal)
    count = torch.tensor(float(grey[0].numel()), dtype=torch.float64, device=img.device)
    mean = (total / count).float()
    return _blend(img, mean, 1.0 + m)


def sharpness(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    if img.shape[-1] <= 2 or img.shape[-2] <= 2:
        return img
    # The 3x3 smoothing kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the interior, the border kept:
    # round(S / 13) of the integer sum S, never a tie (S / 13 is never k + 1/2).
    x = img.to(torch.int32)
    s = 4 * x[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            s = s + x[:, :, dy : dy + x.shape[2] - 2, dx : dx + x.shape[3] - 2]
    blurred = img.clone()
    blurred[:, :, 1:-1, 1:-1] = torch.div(2 * s + 13, 26, rounding_mode="floor").to(torch.uint8)
    return _blend(img, blurred, 1.0 + m)


def posterize(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    keep = (0xFF << (8 - m.astype(np.int64))) & 0xFF  # the top `bits` bits
    return img & _col(keep, torch.uint8, img.device)


def solarize(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    # x >= threshold for integer x is x >= ceil(threshold): compared in int16, no float copy of the batch
    threshold = _col(np.clip(np.ceil(m), 0, 256), torch.int16, img.device)
    return torch.where(img.to(torch.int16) >= threshold, 255 - img, img)


def autocontrast(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    low = img.amin(dim=(2, 3), keepdim=True).float()
    high = img.amax(dim=(2, 3), keepdim=True).float()
    scale = 255.0 / (high - low)
    flat = ~torch.isfinite(scale)  # a constant channel is left as it is
    low = torch.where(flat, 0.0, low)
    scale = torch.where(flat, 1.0, scale)
    return ((img - low) * scale).clamp(0, 255).to(torch.uint8)


def equalize(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    n, c, h, w = img.shape
    flat = img.reshape(n * c, h * w).long()
    rows = torch.arange(n * c, device=img.device).view(-1, 1) * 256
    hist = torch.bincount((flat + rows).flatten(), minlength=n * c * 256).view(n * c, 256)  # deterministic on CUDA
    # step = (pixels outside the brightest occupied level) // 255, as PIL's ImageOps.equalize
    top = hist.gather(1, flat.amax(1, keepdim=True))
    step = (h * w - top) // 255
    safe = step.clamp(min=1)
    lut = (hist.cumsum(1) + safe // 2) // safe
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)  # shifted one level up
    out = lut.gather(1, flat).to(torch.uint8).view(n, c, h, w)
    return torch.where((step == 0).view(n, c, 1, 1), img, out)


def invert(img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    return 255 - img


def _inverse_affine(angle: np.ndarray, shear_x: np.ndarray, shear_y: np.ndarray, centre, shift) -> np.ndarray:
    """(n, 6) inverse maps output -> input (coordinates relative to the image centre) of the affine
    `rotate by angle, shear by (shear_x, shear_y) degrees about centre, then translate by shift` at scale 1:
    the RSS decomposition of torchvision's `_get_inverse_affine_matrix`, per image, in float64."""
    rot, sx, sy = np.radians(angle), np.radians(shear_x), np.radians(shear_y)
    cx, cy = centre
    tx, ty = shift
    a = np.cos(rot - sy) / np.cos(sy)
    b = -np.cos(rot - sy) * np.tan(sx) / np.cos(sy) - np.sin(rot)
    c = np.sin(rot - sy) / np.cos(sy)
    d = -np.sin(rot - sy) * np.tan(sx) / np.cos(sy) + np.cos(rot)
    m = np.stack([d, -b, np.zeros_like(d), -c, a, np.zeros_like(d)], 1)  # the inverse of [[a, b], [c, d]]
    m[:, 2] += m[:, 0] * (-cx - tx) + m[:, 1] * (-cy - ty)
    m[:, 5] += m[:, 3] * (-cx - tx) + m[:, 4] * (-cy - ty)
    m[:, 2] += cx
    m[:, 5] += cy
    return m


def _warp(img: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Nearest-neighbour warp with zero fill: output pixel (y, x) takes the input pixel nearest to
    matrix @ (x, y, 1) in centred coordinates (pixel centres at x - (W - 1) / 2)."""
    n, c, h, w = img.shape
    dev = img.device
    theta = torch.as_tensor(matrix, dtype=torch.float64, device=dev).view(n, 6, 1, 1)
    xs = torch.arange(w, dtype=torch.float64, device=dev).view(1, 1, w) - (w - 1) / 2
    ys = torch.arange(h, dtype=torch.float64, device=dev).view(1, h, 1) - (h - 1) / 2
    src_x = torch.round(theta[:, 0] * xs + theta[:, 1] * ys + theta[:, 2] + (w - 1) / 2).long()  # (n, h, w)
    src_y = torch.round(theta[:, 3] * xs + theta[:, 4] * ys + theta[:, 5] + (h - 1) / 2).long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = torch.where(inside, src_y * w + src_x, 0).view(n, 1, h * w).expand(n, c, h * w)
    out = img.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=img.dtype, device=dev))


GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})


def affine_matrix(name: str, m: np.ndarray, h: int, w: int) -> np.ndarray:
    """(n, 6) float64 inverse matrices of geometric op `name` at magnitudes m (kn_dist.data.strong_cpu uses
    them too, so both paths sample the same source pixels)."""
    zero = np.zeros_like(m)
    if name == "Rotate":  # about the centre; torchvision's rotate passes -angle to the affine matrix
        return _inverse_affine(-m, zero, zero, (0.0, 0.0), (zero, zero))
    if name in ("TranslateX", "TranslateY"):  # whole pixels: int() truncates toward zero
        t = np.trunc(m)
        shift = (t, zero) if name == "TranslateX" else (zero, t)
        return _inverse_affine(zero, zero, zero, (0.0, 0.0), shift)
    # Shears about the top-left corner (centre [0, 0] in pixels), by atan(magnitude) expressed in degrees.
    degrees = np.degrees(np.arctan(m))
    shear = (degrees, zero) if name == "ShearX" else (zero, degrees)
    return _inverse_affine(zero, *shear, (-w * 0.5, -h * 0.5), (zero, zero))


_COLOUR = {
    "Brightness": brightness,
    "Color": color,
    "Contrast": contrast,
    "Sharpness": sharpness,
    "Posterize": posterize,
    "Solarize": solarize,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
}


def apply_op(name: str, img: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    """Op `name` on uint8 (n, C, H, W) `img` with magnitude m[i] for image i (float64, sign included)."""
    if name == "Identity":
        return img
    if name in _COLOUR:
        return _COLOUR[name](img, m)
    return _warp(img, affine_matrix(name, m, *img.shape[-2:]))


def apply_ops(img: torch.Tensor, op_ids: np.ndarray, magnitudes: np.ndarray) -> torch.Tensor:
    """Apply op_ids[i, k] with magnitudes[i, k] to image i, for k = 0, 1, ... in order (a new tensor).

    Images are grouped by op per round: one batched call per distinct op, never a loop over images.
    """
    out = img.clone(memory_format=torch.contiguous_format)  # never written in place: FFCV reuses its buffers
    for k in range(op_ids.shape[1]):
        ids = op_ids[:, k]
        for op in np.unique(ids):
            if op == OP_ID["Identity"]:
                continue
            rows = np.flatnonzero(ids == op)
            if len(rows) == len(ids):
                out = apply_op(OPS[op], out, magnitudes[:, k])
                continue
            index = torch.as_tensor(rows, device=img.device)
            out[index] = apply_op(OPS[op], out[index], magnitudes[rows, k])  # distinct rows: deterministic
    return out
