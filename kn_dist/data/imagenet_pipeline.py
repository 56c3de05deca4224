"""ImageNet-style decoding (imagefolder data): a seeded RandomResizedCrop decoder, the centre-crop eval
decoder, and progressive resizing (the training resolution as a function of the epoch).

Images of variable size are cropped and resized inside the decoder, as FFCV's
RandomResizedCropRGBImageDecoder does in ffcv-imagenet's train pipeline, but the crop is a function of
(seed, epoch, sample index) instead of numba's per-thread RNG, in the stream of kn_dist.data.augment:

    key  = splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ index)      # augment.py's per-sample key
    rkey = splitmix64(key ^ RRC_DOMAIN)                                  # a stream of its own
    u_j  = (splitmix64(rkey + j * GOLDEN) >> 11) * 2**-53                # uniform in [0, 1)

Attempt t = 0..9 uses u_{4t} (area), u_{4t+1} (log aspect ratio), u_{4t+2} (top) and u_{4t+3} (left) in
torchvision's RandomResizedCrop.get_params (the algorithm FFCV's get_random_crop follows):
area = H·W·(s0 + (s1 - s0)·u), aspect = exp(log r0 + (log r1 - log r0)·u), w = round(sqrt(area·aspect)),
h = round(sqrt(area / aspect)) (round half to even); accepted when 0 < w <= W and 0 < h <= H, with
top = floor(u·(H - h + 1)), left = floor(u·(W - w + 1)). After ten rejections: the central crop of the
whole image clamped to the aspect range [r0, r1]. The window is resized to the output size by FFCV's
`resize_crop` (OpenCV INTER_AREA). So one worker and sixteen decode the same crop of a sample, and a
resumed run draws what an uninterrupted one would: no RNG state to checkpoint.

Evaluation: FFCV's CenterCropRGBImageDecoder, a centred square of `val_crop_ratio` x the short side
resized to `val_image_size` (224/256 = torchvision's Resize(256) + CenterCrop(224), the KernelNorm
paper's and ffcv-imagenet's eval).

Progressive resizing (ffcv-imagenet train_imagenet.py, `get_resolution`): `min_res` up to epoch
`start_ramp`, `max_res` from `end_ramp` on, linear in between rounded to a multiple of `step`; epochs
are 0-based as in ffcv-imagenet's configs (kn_dist's epoch e is their e - 1). The side is a function of
the epoch alone, so a run resumed from a checkpoint trains at the side an uninterrupted run would.
`ScheduledLoader` sets both the epoch of the crops and the output side before each epoch; FFCV sizes
its buffers per epoch (EpochIterator -> Graph.allocate_memory), so the compiled pipeline is reused.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from numba import types
from numba.extending import intrinsic

from kn_dist.config import DataConfig, ProgressiveResizing
from kn_dist.data.augment import GOLDEN, SeededLoader, splitmix64

RRC_DOMAIN = np.uint64(0x5252435F43524F50)  # "RRC_CROP": separates the crop stream from augment.py's slots
RRC_SCALE = (0.08, 1.0)  # torchvision / FFCV defaults: area share and aspect-ratio range of the crop
RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
_U64 = (1 << 64) - 1
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


# ----------------------------------------------------------------------------------------------------
# the crop window


@numba.njit(inline="always")
def _uniform(rkey, slot):
    return np.float64(splitmix64(rkey + np.uint64(slot) * GOLDEN) >> np.uint64(11)) * _TO_UNIT


@numba.njit(inline="always")
def _crop_window(seed, epoch, index, height, width, s0, s1, r0, r1):
    """(top, left, h, w) of the seeded RandomResizedCrop of sample `index` (see the module doc)."""
    key = splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ np.uint64(index))
    rkey = splitmix64(key ^ RRC_DOMAIN)
    height, width = np.int64(height), np.int64(width)
    area = np.float64(height * width)
    lr0, lr1 = math.log(r0), math.log(r1)
    for t in range(RRC_ATTEMPTS):
        target = area * (s0 + (s1 - s0) * _uniform(rkey, 4 * t))
        aspect = math.exp(lr0 + (lr1 - lr0) * _uniform(rkey, 4 * t + 1))
        w = np.int64(round(math.sqrt(target * aspect)))
        h = np.int64(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(_uniform(rkey, 4 * t + 2) * (height - h + 1))
            left = np.int64(_uniform(rkey, 4 * t + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < r0:
        w, h = width, np.int64(round(width / r0))
    elif in_ratio > r1:
        h, w = height, np.int64(round(height * r1))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(cache=True)
def crop_windows(seed, epoch, indices, heights, widths, s0, s1, r0, r1):
    """(N, 4) int64 rows [top, left, h, w]: the windows `SeededRandomResizedCrop` decodes for `indices`."""
    out = np.empty((len(indices), 4), dtype=np.int64)
    for i in range(len(indices)):
        top, left, h, w = _crop_window(seed, epoch, indices[i], heights[i], widths[i], s0, s1, r0, r1)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = top, left, h, w
    return out


@intrinsic
def _u64_at(typingctx, address):
    """A uint64 pointer from an integer address: how compiled code reads state the host changes later."""
    sig = types.CPointer(types.uint64)(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.uint64)))

    return sig, codegen


# ----------------------------------------------------------------------------------------------------
# decoders


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """FFCV decoder: decode (JPEG or raw), seeded RandomResizedCrop window, resize to `output_size`.

    `epoch` is read by the compiled code at run time from a one-element array (numba freezes globals and
    closure arrays at compile time, and FFCV compiles a Loader's pipeline once); `ScheduledLoader` sets
    it, and `output_size`, before every epoch.
    """

    def __init__(
        self,
        output_size: tuple[int, int],
        seed: int,
        scale: tuple[float, float] = RRC_SCALE,
        ratio: tuple[float, float] = RRC_RATIO,
    ):
        super().__init__(output_size)
        self.seed = np.uint64(seed & _U64)
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self._epoch = np.zeros(1, dtype=np.uint64)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = value

    @property
    def get_crop_generator(self):  # the base class's abstract hook; this decoder draws its own windows
        return None

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        read = self.memory_read
        each = Compiler.get_iterator()
        decode_jpeg = Compiler.compile(imdecode)
        resize = Compiler.compile(resize_crop)
        address, seed = self._epoch.ctypes.data, self.seed
        (s0, s1), (r0, r1) = self.scale, self.ratio

        def decode(batch_indices, storage, metadata, storage_state):
            destination, scratch = storage
            epoch = numba.carray(_u64_at(address), 1)[0]
            for k in each(len(batch_indices)):
                index = batch_indices[k]
                entry = metadata[index]
                data = read(entry["data_ptr"], storage_state)
                height, width = np.uint32(entry["height"]), np.uint32(entry["width"])
                if entry["mode"] == jpg:  # decode into this sample's scratch row, viewed as (H, W, 3)
                    pixels = scratch[k]
                    decode_jpeg(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                    pixels = pixels.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    pixels = data.reshape(height, width, 3)
                top, left, h, w = _crop_window(seed, epoch, index, height, width, s0, s1, r0, r1)
                resize(pixels, top, top + h, left, left + w, destination[k])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


def train_decoder(data_cfg: DataConfig, seed: int) -> SeededRandomResizedCrop:
    """The training decoder of an imagefolder dataset at epoch 0's resolution."""
    side = resolution_at(0, data_cfg)
    return SeededRandomResizedCrop((side, side), seed)


def eval_decoder(data_cfg: DataConfig) -> CenterCropRGBImageDecoder:
    """Centre crop of `val_crop_ratio` x the short side, resized to the evaluation side."""
    side = eval_resolution(data_cfg)
    return CenterCropRGBImageDecoder((side, side), ratio=data_cfg.val_crop_ratio)


# ----------------------------------------------------------------------------------------------------
# resolution per epoch


def ramp_resolution(epoch: int, schedule: ProgressiveResizing) -> int:
    """The training side at 0-based `epoch` under `schedule` (ffcv-imagenet's get_resolution)."""
    if epoch <= schedule.start_ramp:
        return schedule.min_res
    if epoch >= schedule.end_ramp:
        return schedule.max_res
    share = (epoch - schedule.start_ramp) / (schedule.end_ramp - schedule.start_ramp)
    side = schedule.min_res + share * (schedule.max_res - schedule.min_res)
    return int(round(side / schedule.step)) * schedule.step


def resolution_at(epoch: int, data_cfg: DataConfig) -> int:
    """The training side at 0-based `epoch`: the ramp when `data.progressive` is set, else data.image_size."""
    return data_cfg.image_size if data_cfg.progressive is None else ramp_resolution(epoch, data_cfg.progressive)


def eval_resolution(data_cfg: DataConfig) -> int:
    return data_cfg.val_image_size or data_cfg.image_size


def resolutions(data_cfg: DataConfig, epochs: int) -> list[int]:
    """Every side the model sees over `epochs` epochs (training and evaluation), sorted."""
    return sorted({resolution_at(e, data_cfg) for e in range(epochs)} | {eval_resolution(data_cfg)})


# ----------------------------------------------------------------------------------------------------
# the loader


class ScheduledLoader(SeededLoader):
    """SeededLoader whose epoch also sets its seeded crop decoders (epoch and output side) and, optionally,
    its traversal order.

    `resolution(epoch)` gives the side of each 0-based epoch (None: the decoders keep theirs);
    `traversal(epoch)` gives this rank's sample indices for the epoch (kn_dist.data.global_batch) in place
    of FFCV's traversal order (pass order=SEQUENTIAL then: it is built but not used). `world_size` and
    `accumulation` (micro-batches per optimizer step) describe the run it feeds, for `epoch_facts`.
    """

    def __init__(
        self,
        *args,
        pipelines: dict | None = None,
        resolution: Callable[[int], int] | None = None,
        traversal: Callable[[int], np.ndarray] | None = None,
        world_size: int = 1,
        accumulation: int = 1,
        **kwargs,
    ):
        pipelines = pipelines or {}
        ops = [op for ops in pipelines.values() for op in ops or ()]
        self.crop_ops = [op for op in ops if isinstance(op, SeededRandomResizedCrop)]
        self.resolution, self.traversal = resolution, traversal
        self.world_size, self.accumulation = world_size, accumulation
        self.current_resolution: int | None = None
        self._prepare(0)  # FFCV declares its buffers (and compiles) in __init__: the sizes of epoch 0
        super().__init__(*args, pipelines=pipelines, **kwargs)

    def epoch_facts(self) -> dict[str, int]:
        """What the latest epoch ran on, for the run's records: training side, world size, accumulation steps."""
        side = self.current_resolution or 0  # 0: no resolution schedule given
        return {"resolution": side, "world_size": self.world_size, "accumulation_steps": self.accumulation}

    def _prepare(self, epoch: int) -> None:
        if self.resolution is not None:
            self.current_resolution = self.resolution(epoch)
            for op in self.crop_ops:
                op.output_size = (self.current_resolution, self.current_resolution)
        for op in self.crop_ops:
            op.epoch = epoch

    def next_traversal_order(self):
        return super().next_traversal_order() if self.traversal is None else self.traversal(self.next_epoch)

    def __iter__(self):
        self._prepare(self.next_epoch)
        return super().__iter__()
