"""Ray Train overhead (issue 6): epoch time under a 1-worker TorchTrainer vs the bare engine loop.

Same model, data, batch size, thread count and seed: experiments/digits_quick.yaml with one worker
(ConvMixer-256/8, patch 8, digits 32x32, batch 64, fp32, one CPU thread). The bare side runs
`engine.train_epoch` + `engine.evaluate` in this process; the Ray side is the real `kn-dist train`
path (TorchTrainer, MLflow logging on rank 0, a checkpoint and `ray.train.report` every epoch).
An epoch's time is the wall time between consecutive epoch ends, so the Ray figure includes
logging, checkpointing and the report barrier. The first epoch (FFCV JIT compilation, worker
start-up) is excluded on both sides; runs alternate bare/Ray so both see the same background
load; figures are medians. ratio = Ray epoch seconds / bare epoch seconds; target <= 1.10.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from kn_dist import config, engine
from kn_dist.models import create_model

DIGITS = Path(__file__).resolve().parents[2] / "experiments" / "digits_quick.yaml"
TARGET = 1.10


def _bare_epochs(cfg: config.ExperimentConfig) -> list[float]:
    """Seconds per epoch (after the first) of the plain single-process loop."""
    from kn_dist import data

    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.scaling.cpus_per_worker))  # what Ray gives its worker (OMP_NUM_THREADS)
    try:
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model.name, norm=cfg.model.norm, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
        train_loader, val_loader = data.loaders(cfg.data, 0, 1, device, seed=cfg.seed)
        optimizer = engine.build_optimizer(model, cfg.optim)
        scheduler = engine.build_scheduler(optimizer, cfg.schedule, cfg.epochs, len(train_loader))
        scaler = engine.build_scaler(cfg.precision, device)
        stamps = []
        for _ in range(cfg.epochs):
            engine.train_epoch(model, train_loader, optimizer, scheduler, scaler, device=device)
            engine.evaluate(model, val_loader, device=device)
            stamps.append(time.time())
    finally:
        torch.set_num_threads(threads)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _ray_epochs(cfg: config.ExperimentConfig, name: str) -> list[float]:
    """Seconds per epoch (after the first) under a 1-worker TorchTrainer, from the workers' report stamps."""
    from kn_dist.trainer import run_training

    result = run_training(cfg.model_copy(update={"name": name}))
    stamps = sorted((m["epoch"], m["reported_at"]) for _, m in result.best_checkpoints)
    assert [e for e, _ in stamps] == list(range(1, cfg.epochs + 1)), "every epoch must keep its checkpoint"
    return [b - a for (_, a), (_, b) in zip(stamps, stamps[1:], strict=False)]


def run(quick: bool = False) -> dict:
    """{"cases": [...]} with the median epoch seconds of both sides and their ratio (target <= 1.10)."""
    import ray

    from kn_dist.prepare import prepare_config
    from kn_dist.runtime import init_ray

    epochs, repeats = (3, 1) if quick else (4, 3)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load(
            DIGITS,
            [
                f"epochs={epochs}",
                "scaling.num_workers=1",
                "scaling.in_process=false",  # the Ray Train path is what this bench measures
                f"checkpoint.keep={epochs}",
                f"checkpoint.storage_path={tmp}/runs",
                f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                f"data.root={tmp}/data",
            ],
        )
        cfg = prepare_config(cfg)
        started = init_ray()
        bare, under_ray = [], []
        try:
            for i in range(repeats):  # interleaved: the machine is shared and noisy
                bare += _bare_epochs(cfg)
                under_ray += _ray_epochs(cfg, f"bench_{i}")
        finally:
            if started:
                ray.shutdown()
    bare_s, ray_s = statistics.median(bare), statistics.median(under_ray)
    return {
        "cases": [
            {
                "name": f"{cfg.model.name}_{cfg.data.dataset}_1worker_cpu",
                "bare_epoch_s": round(bare_s, 3),
                "ray_epoch_s": round(ray_s, 3),
                "bare_epochs_s": [round(t, 3) for t in bare],
                "ray_epochs_s": [round(t, 3) for t in under_ray],
                "epochs_per_run": epochs,
                "repeats": repeats,
                "ratio": round(ray_s / bare_s, 3),
                "target": TARGET,
            }
        ]
    }
