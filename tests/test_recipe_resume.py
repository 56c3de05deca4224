"""A run with the published recipes' regularisers (RandAugment, colour jitter, random erasing, repeated augmentation,
mixup / cutmix, label smoothing, EMA evaluation) resumed from its epoch-1 checkpoint gives the uninterrupted run's
weights and EMA bit for bit: nothing of the augmentation or the average lives outside the checkpoint. One worker
in kn-dist's own process (kn_dist.in_process), real FFCV files, real MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from kn_dist import config
from kn_dist.trainer import run_training
from kn_dist.worker import CHECKPOINT_FILE

pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


def _config(tmp: Path, name: str):
    return config.from_dict(
        {
            "name": name,
            "epochs": 2,
            "deterministic": True,
            "data": {
                "dataset": "digits",
                "root": str(tmp / "data"),
                "image_size": 16,
                "batch_size": 64,
                "num_workers": 1,
                "hflip": False,
                "crop_padding": 1,
                "randaugment_ops": 2,
                "color_jitter": 0.1,
                "random_erasing": 0.25,
                "repeated_augmentation": 2,
            },
            "model": {
                "name": "convmixer_256_8",
                "norm": "bn",
                "kwargs": {"input_size": 16, "patch_size": 16, "kernel_size": 1},
            },
            "optim": {
                "name": "adamw",
                "lr": 0.002,
                "label_smoothing": 0.1,
                "mixup_alpha": 0.8,
                "cutmix_alpha": 1.0,
                "ema_decay": 0.9,
            },
            "scaling": {"num_workers": 1},
            "checkpoint": {"storage_path": str(tmp / "runs")},
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": name},  # one store: created once
        }
    )


def _state(result) -> dict:
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)


def _history(cfg, key: str) -> list[float]:
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_a_resumed_recipe_run_equals_the_uninterrupted_run(tmp_path):
    """The uninterrupted run keeps its epoch-1 checkpoint; a copy of it, resumed as the latest checkpoint of a
    second run (what a restart after a kill loads), must finish with the same bytes."""
    whole_cfg = _config(tmp_path, "whole")
    whole = _state(run_training(whole_cfg))
    resumed_cfg = _config(tmp_path, "resumed")
    shutil.copytree(tmp_path / "runs" / "whole" / "epoch_0001", tmp_path / "runs" / "resumed" / "epoch_0001")
    resumed = _state(run_training(resumed_cfg, resume=True))
    assert resumed["epoch"] == whole["epoch"] == 2
    for part in ("model", "ema", "optimizer"):
        assert resumed[part].keys() == whole[part].keys()
    for part in ("model", "ema"):
        for key in whole[part]:
            assert torch.equal(resumed[part][key], whole[part][key]), (part, key)
    assert any(not torch.equal(whole["ema"][k], whole["model"][k]) for k in whole["model"])  # a real average
    history = _history(whole_cfg, "val_top1_raw")  # EMA on: the trained weights' accuracy beside the average's
    assert len(history) == 2 and len(_history(whole_cfg, "val_top1")) == 2
