"""The loaders' GPU branch, selected on a CPU (`data.device_pipeline: on`; issue 24, item 5).

On CUDA the pipelines ship uint8 batches to the device and convert and normalise them there (FFCV ToDevice,
ToTorchImage, Convert, kn_dist's Normalize); elsewhere SeededAugment normalises on the CPU. The branch is
selected here on a CPU and compared with the CPU branch: the same seeded augmentations (translate, flip,
cutout), the same labels, images equal to fp32 rounding (normalised in torch vs in the CPU kernel), float32 in
the layout asked for. Real digits .beton files and real FFCV loaders.
"""

from __future__ import annotations

import pytest
import torch

from kn_dist.config import DataConfig
from kn_dist.data import train_loader
from kn_dist.data.loaders import uses_device_pipeline

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def digits_cfg(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("data")
    return DataConfig(dataset="digits", root=str(root), batch_size=64, num_workers=2, cutout=8)


def test_the_branch_is_chosen_by_device_unless_set():
    auto = DataConfig()
    assert not uses_device_pipeline(auto, CPU) and uses_device_pipeline(auto, torch.device("cuda", 0))
    assert uses_device_pipeline(DataConfig(device_pipeline="on"), CPU)
    assert not uses_device_pipeline(DataConfig(device_pipeline="off"), torch.device("cuda", 0))


def test_device_branch_on_cpu_gives_the_cpu_branchs_batches(digits_cfg):
    channels_last = True  # the GPU recipes' layout (the contiguous one differs only in ToTorchImage's flag)
    batches = {}
    for branch in ("off", "on"):
        cfg = digits_cfg.model_copy(update={"device_pipeline": branch})
        loader = train_loader(cfg, 0, 1, CPU, seed=11, channels_last=channels_last)
        loader.next_epoch = 3
        batches[branch] = [(x.clone(), y.clone()) for x, y in loader][:3]
    for (xc, yc), (xd, yd) in zip(batches["off"], batches["on"], strict=True):
        assert xd.dtype == torch.float32 and xd.device == CPU and xd.shape == xc.shape
        assert xd.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.equal(yd, yc)
        torch.testing.assert_close(xd, xc, rtol=0, atol=1e-5)
