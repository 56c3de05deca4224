"""Worker layouts and precisions that cannot run are refused before anything starts (issue 24, item 6).

Each is one sentence naming the keys and what would be valid, exit code 2 through the command line, instead
of an error from deep inside torch, NCCL or Ray minutes later: SyncBatchNorm without GPUs (torch's runs on
CUDA only), GPUs asked for with none per worker, fractional GPUs that would pack DDP ranks onto one device
(NCCL: "Duplicate GPU detected"), forced DDP without a process group, bf16 on a GPU without bfloat16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kn_dist import config, engine
from kn_dist.cli import main
from kn_dist.errors import UserError

DIGITS = Path(__file__).resolve().parents[1] / "experiments" / "digits_quick.yaml"


@pytest.mark.parametrize(
    "scaling,needles",
    [
        ({"sync_bn": True}, ["scaling.sync_bn=true needs GPUs", "scaling.use_gpu=true"]),
        ({"use_gpu": True, "gpus_per_worker": 0}, ["gpus_per_worker=0"]),
        ({"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5}, ["gpus_per_worker=0.5", "NCCL"]),
        ({"force_ddp": True}, ["scaling.force_ddp=true", "scaling.in_process=false"]),
    ],
)
def test_impossible_scaling_is_one_sentence(scaling, needles):
    with pytest.raises(UserError) as err:
        config.from_dict({"scaling": scaling})
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message


@pytest.mark.parametrize(
    "scaling",
    [
        {"use_gpu": True, "sync_bn": True, "num_workers": 4},
        {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5, "placement_strategy": "SPREAD"},
        {"force_ddp": True, "in_process": False},
        {"use_gpu": True, "gpus_per_worker": 0.25},  # one worker on a shared GPU: no NCCL peer on it
    ],
)
def test_possible_scaling_is_accepted(scaling):
    assert config.from_dict({"scaling": scaling}).scaling.model_dump(include=set(scaling)) == scaling


def test_sync_bn_without_gpus_exits_2_before_any_start(capsys):
    assert main(["train", str(DIGITS), "scaling.sync_bn=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scaling.sync_bn=true needs GPUs" in err[0]


def test_bf16_on_a_gpu_without_bfloat16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(UserError, match=r"precision=bf16 needs .* Tesla V100-SXM2-16GB is sm_70; use precision=fp16"):
        engine.check_precision("bf16", torch.device("cuda", 0))
    engine.check_precision("fp16", torch.device("cuda", 0))  # fp16 runs there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    engine.check_precision("bf16", torch.device("cuda", 0))  # A100
    engine.check_precision("bf16", torch.device("cpu"))  # CPU autocast has bf16
