"""The Ray Train per-worker function: runs on every rank of a TorchTrainer (DESIGN.md §1).

`train_worker(loop_config)` builds the FFCV loaders and the model once, wraps the model in DDP
(`ray.train.torch.prepare_model`: gloo on CPU, nccl on GPU), trains with kn_dist.engine and
reports once per epoch on every rank (`ray.train.report` is a barrier). Rank 0 alone writes
MLflow and passes the checkpoint.

train_loop_config keys (built by kn_dist.trainer.build_torch_trainer):
  "config":               cfg.model_dump(mode="json") of the config resolved by trainer.prepare_config
  "mlflow_run_id":        str | None — the run created by `kn-dist train`; None: find-or-create by run key
  "mlflow_parent_run_id": str | None — Tune's parent run (tag mlflow.parentRunId)
  "trial_id":             str | None — Tune trial id: becomes the run key and tag kn_dist.trial_id
  "sweep":                str | None — sweep name (tag kn_dist.sweep)
  "run_key":              str — stable identity of the run (default "<storage_path>/<name>")
  "stop_after_epoch":     int | None — stop (resumably) after this epoch; the schedule still spans cfg.epochs

Restarts (worker failure, `--resume`, a Tune trial restored): the checkpoint holds model,
optimizer, scheduler, scaler, epoch, every rank's RNG states and the MLflow run id; epochs are
logged to MLflow before their checkpoint is reported, and a restarted run skips logging epochs
MLflow already holds, so each epoch appears exactly once.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from kn_dist import data, engine, tracking
from kn_dist.config import ExperimentConfig
from kn_dist.models import create_model
from kn_dist.trainer import PROGRESS_PREFIX

CHECKPOINT_FILE = "state.pt"


def quiet_ray_logs() -> None:
    """Silence Ray Train's per-report INFO lines and the state-API warnings of its helper actors.

    Used as Ray's `worker_process_setup_hook` (every worker process) and again inside the worker
    function, because Ray Train reconfigures the `ray.train` logger when a worker starts.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Child loggers get an explicit level: Ray Train reconfigures "ray.train" itself in each worker.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    # Without a dashboard the state API is unavailable; this cleaner then warns every second.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj` on every rank (RNG states must be saved for all ranks, not only rank 0)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _format_progress(epoch: int, epochs: int, m: dict[str, float], elapsed: float, done: int) -> str:
    eta = elapsed / max(1, done) * (epochs - epoch)
    return (
        f"{PROGRESS_PREFIX} epoch {epoch}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"train_top1 {100 * m['train_top1']:.2f}%  val_loss {m['val_loss']:.4f}  val_top1 {100 * m['val_top1']:.2f}%  "
        f"lr {m['lr']:.4g}  {m['images_per_s']:.0f} img/s  {m['epoch_seconds']:.1f}s  "
        f"ETA {timedelta(seconds=round(eta))}"
    )


def train_worker(loop_config: dict[str, Any]) -> None:
    """Train `loop_config["config"]` on this rank; see the module docstring for the keys."""
    quiet_ray_logs()
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Same seed on every rank for the model (DDP also broadcasts rank 0's weights), then a
    # per-rank stream so dropout masks differ between ranks.
    _seed(cfg.seed)
    model = create_model(cfg.model.name, norm=cfg.model.norm, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
    num_params = sum(p.numel() for p in model.parameters())
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to device; DDP when world > 1
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    forward = torch.compile(model) if cfg.compile else model
    # Validation runs on the unwrapped module: ranks may have different numbers of val batches
    # (kn_dist.data shards val without padding) and DDP's forward can issue collectives.
    evaluated = torch.compile(net) if cfg.compile else net
    _seed(cfg.seed + 1000 * rank)

    # FFCV shards itself (distributed=True); built once per worker after the process group exists.
    train_loader, val_loader = data.loaders(
        cfg.data, rank, world, device, seed=cfg.seed, channels_last=cfg.channels_last
    )
    optimizer = engine.build_optimizer(net, cfg.optim)
    scheduler = engine.build_scheduler(optimizer, cfg.schedule, cfg.epochs, len(train_loader))
    scaler = engine.build_scaler(cfg.precision, device)

    start_epoch, run_id = 1, loop_config.get("mlflow_run_id")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        run_id = state["mlflow_run_id"] or run_id
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank])
        else:  # the world size changed: a fresh but reproducible stream
            _seed(cfg.seed + 1000 * rank + start_epoch)
    # FFCV derives each epoch's order from seed + epoch number: continue where the run stopped.
    for loader in (train_loader, val_loader):
        if hasattr(loader, "next_epoch"):
            loader.next_epoch = start_epoch - 1

    client, logged = None, set()
    if rank == 0:
        client = tracking.client(cfg.tracking.uri)
        if run_id is None:
            trial_id = loop_config.get("trial_id")
            tags = tracking.run_tags(
                cfg,
                norm=cfg.model.norm,
                run_key=trial_id or loop_config["run_key"],
                kind="trial" if trial_id else "train",
                trial_id=trial_id,
                sweep=loop_config.get("sweep"),
                parent_run_id=loop_config.get("mlflow_parent_run_id"),
            )
            run_id = tracking.find_or_create_run(client, cfg.tracking.experiment, cfg, tags)
        logged = tracking.logged_epochs(client, run_id)
        if not tracking.logged_epochs(client, run_id, "num_params"):
            tracking.log_epoch(client, run_id, 0, {"num_params": num_params})

    stop = loop_config.get("stop_after_epoch") or cfg.epochs
    begin = time.perf_counter()
    for epoch in range(start_epoch, min(stop, cfg.epochs) + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lr = optimizer.param_groups[0]["lr"]
        train = engine.train_epoch(
            forward,
            train_loader,
            optimizer,
            scheduler,
            scaler,
            device=device,
            precision=cfg.precision,
            label_smoothing=cfg.optim.label_smoothing,
            grad_clip=cfg.optim.grad_clip,
            channels_last=cfg.channels_last,
        )
        if world > 1:
            # Each rank's BatchNorm running stats drift by its last local batch; evaluate (and save)
            # rank 0's everywhere, as DDP itself does before every training forward.
            for buffer in net.buffers():
                dist.broadcast(buffer, 0)
        val = engine.evaluate(
            evaluated, val_loader, device=device, precision=cfg.precision, channels_last=cfg.channels_last
        )
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        metrics = {
            "train_loss": train["loss"],
            "train_top1": train["top1"],
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "lr": lr,
            "epoch_seconds": train["seconds"],
            "images_per_s": train["images"] / max(train["seconds"], 1e-9),
            "peak_mem_mb": peak,
        }
        last = epoch == min(stop, cfg.epochs)
        if rank == 0:
            if epoch not in logged:
                tracking.log_epoch(client, run_id, epoch, metrics)
            print(_format_progress(epoch, cfg.epochs, metrics, time.perf_counter() - begin, epoch - start_epoch + 1))
        # "reported_at" lets kn_dist.bench.ray time whole epochs (train, eval, logging, checkpoint).
        report = {"epoch": epoch, **metrics, "reported_at": time.time()}
        if epoch % cfg.checkpoint.every_epochs == 0 or last:
            rng = _gather(_rng_state(), world)  # collective: every rank takes part
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:
                    state = {
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch,
                        "rng": rng,
                        "mlflow_run_id": run_id,
                    }
                    torch.save(state, Path(folder) / CHECKPOINT_FILE)
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(report, checkpoint=saved, checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            ray.train.report(report)

    if rank == 0 and min(stop, cfg.epochs) == cfg.epochs:
        tracking.log_final(client, run_id, cfg, net.state_dict())
        tracking.finish(client, run_id)
