"""The per-worker training loop (DESIGN.md §1): one function, run by every rank of a run.

`train_loop(loop, session)` builds the model and the FFCV loaders once, trains with kn_dist.engine,
logs to MLflow on rank 0 and reports once per epoch on every rank. The `session` says where it
runs: a Ray Train worker (`RayTrainSession`, DDP over the worker group), a Ray Tune trial's own
process (kn_dist.tune, one worker, no worker group) or the driver itself (kn_dist.in_process, one
worker, no Ray). Either way checkpoints hold the model, optimizer, scheduler, scaler, epoch, every
rank's RNG states and the MLflow run id, and a restarted run logs only the epochs MLflow does not
hold yet, so each epoch appears exactly once.

Order at the last epoch: test evaluation (final runs only), final artifacts and FINISHED status,
then the last report. A Tune scheduler may stop a trial at any report, so nothing is left for
after it.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from kn_dist import data, engine, tracking
from kn_dist.config import ExperimentConfig
from kn_dist.models import create_model
from kn_dist.rank_state import broadcast_flag, gather_objects, rng_state, seed_all, set_rng_state
from kn_dist.run_tracker import open_run
from kn_dist.runtime import PROGRESS_PREFIX, TIMELINE_TAG, keep_freed_cpu_memory, mark, restart_timeline, timeline_json

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_DIR = "epoch_{epoch:04d}"  # one directory per checkpointed epoch, under the run's storage
NODES_TAG = "kn_dist.nodes"  # rank 0's Ray node at every start of the run ("node_a,node_b" after a move)


class LoopConfig(BaseModel):
    """Everything the loop needs besides the experiment config; strict like the config itself."""

    model_config = ConfigDict(extra="forbid")

    config: ExperimentConfig  # resolved by kn_dist.prepare.prepare_config on the driver
    run_key: str  # stable identity of the run in MLflow (tag kn_dist.run_key)
    kind: Literal["train", "trial", "final"] = "train"
    mlflow_run_id: str | None = None  # the run the driver created; None: find-or-create by run_key
    mlflow_parent_run_id: str | None = None  # sweep or study parent run (tag mlflow.parentRunId)
    trial_id: str | None = None  # Ray Tune trial id (tag kn_dist.trial_id)
    sweep: str | None = None  # sweep name (tag kn_dist.sweep)
    tags: dict[str, str] = Field(default_factory=dict)  # extra MLflow tags (a study's cell and seed)
    evaluate_test: bool = False  # final runs: evaluate once on the test split after the last epoch
    stop_after_epoch: int | None = Field(None, ge=1)  # stop resumably after this epoch (schedule spans epochs)
    # Fault drill: rank `fail_rank` raises in the epoch after `fail_after_epoch` (its checkpoint reported,
    # the next epoch's training done), on a run that started from scratch only, so the restart from that
    # checkpoint runs through. For tests and rehearsals.
    fail_after_epoch: int | None = Field(None, ge=1)
    fail_rank: int = Field(0, ge=0)
    fail_mode: Literal["raise", "hang"] = "raise"  # hang: stall until the rank's node dies (test_imagenet_cluster)
    # A checkpoint folder (path or URI) to start from when Ray Train holds none as new: the run's own
    # latest, which a run begun in the driver's process (kn_dist.in_process) wrote without Ray.
    resume_from: str | None = None


class Session(Protocol):
    """Where the loop runs: its rank, device, latest checkpoint, and how it reports an epoch."""

    world_rank: int
    world_size: int
    device: torch.device
    node_id: str  # the Ray node this rank runs on (tag kn_dist.nodes: where a run went, restarts included)
    in_driver: bool  # the loop runs in the driver's process: it shares the driver's start-up timeline

    def latest_checkpoint(self) -> Any | None:
        """A ray Checkpoint to resume from, or None for a fresh start."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, dir_name: str | None) -> None:
        """Hand one epoch's metrics (and rank 0's checkpoint folder, if any) to Ray; every rank calls it."""


class RayTrainSession:
    """The loop inside a Ray Train worker: `ray.train.report` is a barrier over the worker group."""

    in_driver = False

    def __init__(self, resume_from: str | None = None) -> None:
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.world_rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.resume_from = resume_from

    def latest_checkpoint(self) -> Any | None:
        """Ray Train's latest checkpoint of this run, or the driver's `resume_from` where that is newer."""
        import ray.train

        ours = ray.train.get_checkpoint()
        if self.resume_from is None:
            return ours
        if ours is None or (checkpoint_epoch(ours.path) or 0) < (checkpoint_epoch(self.resume_from) or 0):
            return ray.train.Checkpoint(self.resume_from)
        return ours

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, dir_name: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name if checkpoint_dir else None)


def train_worker(raw_loop_config: dict[str, Any]) -> None:
    """The Ray Train entry point (TorchTrainer's train_loop_per_worker)."""
    loop = LoopConfig.model_validate(raw_loop_config)
    train_loop(loop, RayTrainSession(loop.resume_from))


def checkpoint_epoch(path: str) -> int | None:
    """The epoch of a checkpoint folder named by CHECKPOINT_DIR (local path or URI), else None."""
    match = re.fullmatch(r"epoch_(\d+)", path.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------
# the loop, as named steps


@dataclass
class _Run:
    """The objects of one training run on one rank."""

    net: torch.nn.Module  # the unwrapped model (state dicts, evaluation)
    forward: torch.nn.Module  # what trains: DDP-wrapped and/or compiled
    evaluated: torch.nn.Module  # what evaluates: unwrapped (the EMA with optim.ema_decay), compiled if asked
    num_params: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loaders: dict[str, Any]
    steps_per_epoch: int
    ema: engine.ModelEma | None = None  # optim.ema_decay; the trained weights then give the val_*_raw metrics
    mixer: engine.BatchMixer | None = None  # optim.mixup_alpha / cutmix_alpha

    def weights(self) -> dict[str, Any]:  # the weights that were evaluated: the EMA's when there is one
        return (self.ema.module if self.ema is not None else self.net).state_dict()


def train_loop(loop: LoopConfig, session: Session) -> None:
    """Train loop.config on this rank: restore, open the MLflow run, epochs, save, finish."""
    # Ray Train sets the root logger to INFO in its workers, and some of its records carry a file path
    # as their logger name (so LoggingConfig cannot filter them): keep INFO off the console.
    logging.getLogger().setLevel(logging.WARNING)
    if session.in_driver:
        mark("loop_started")
    else:  # a fresh worker, or an actor reused for another trial
        restart_timeline("loop_started")
    cfg = loop.config
    rank, world, device = session.world_rank, session.world_size, session.device
    _configure_torch(cfg, device)
    run = _build(cfg, rank, world, device, evaluate_test=loop.evaluate_test)
    start_epoch, run_id, restored_report = _restore(
        session.latest_checkpoint(), run, cfg, rank, world, loop.mlflow_run_id
    )
    tracker = open_run(loop, run_id, run.num_params) if rank == 0 else None
    if tracker is not None:
        tracking.append_tag(tracker.client, tracker.run_id, NODES_TAG, session.node_id)
        if start_epoch > 1:
            tracker.record_resume(start_epoch - 1)
    last = min(loop.stop_after_epoch or cfg.epochs, cfg.epochs)
    if start_epoch > last:
        # Restarted after its last epoch was checkpointed (killed before the caller saw the end): finish the
        # MLflow run if that was still to do, and hand the caller that epoch's result again.
        if tracker is not None and start_epoch > cfg.epochs:
            tracker.finish_once(cfg, run.weights())
        session.report(restored_report, None, None)
        return
    # A final opens the test split once: a restart after its test was logged does not evaluate it again.
    test_open = loop.evaluate_test and not broadcast_flag(tracker is not None and tracker.test_logged(), world)
    begin = time.perf_counter()
    for epoch in range(start_epoch, last + 1):
        drill = (loop.fail_after_epoch, loop.fail_rank, start_epoch) == (epoch - 1, rank, 1)  # on a fresh run only
        metrics = _train_and_validate(run, cfg, device, world, fail_mid_epoch=loop.fail_mode if drill else None)
        mark("first_epoch_done")
        if tracker is not None:
            tracker.log_epoch(epoch, metrics)
            if epoch == start_epoch:  # this process's start-up, beside the run (kn-dist bench startup)
                tracker.client.set_tag(tracker.run_id, TIMELINE_TAG.format(role="rank0"), timeline_json())
            print(_format_progress(epoch, cfg.epochs, metrics, time.perf_counter() - begin, epoch - start_epoch + 1))
        finished = epoch == cfg.epochs
        if finished and test_open:
            examples: list[tuple[torch.Tensor, torch.Tensor]] = []
            test = engine.evaluate(run.evaluated, run.loaders["test"], **_eval_args(cfg, device), examples=examples)
            metrics.update(test_loss=test["loss"], test_top1=test["top1"])
            # every rank's examples, in rank order: the per-example record of the paired bootstrap
            shards = gather_objects([torch.cat([c for c, _ in examples]), torch.cat([y for _, y in examples])], world)
            if tracker is not None:
                tracker.log_test(epoch, test, shards)
        if finished and tracker is not None:
            tracker.finish(cfg, run.weights())
        # "reported_at" lets the benches time whole epochs (train, eval, logging, checkpoint).
        report = {"epoch": epoch, **metrics, "reported_at": time.time()}
        if epoch % cfg.checkpoint.every_epochs == 0 or epoch == last:
            _save_and_report(session, report, run, epoch, tracker.run_id if tracker else run_id)
        else:
            session.report(report, None, None)


def _configure_torch(cfg: ExperimentConfig, device: torch.device) -> None:
    engine.check_precision(cfg.precision, device)  # bf16 on a GPU without it: one clear sentence, not NaNs
    if device.type == "cpu":  # no page faults for each step's temporaries (runtime.py)
        keep_freed_cpu_memory()
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _build(cfg: ExperimentConfig, rank: int, world: int, device: torch.device, *, evaluate_test: bool) -> _Run:
    """Model (same seed on every rank; DDP also broadcasts rank 0's weights), loaders, optimizer, schedule."""
    seed_all(cfg.seed)
    model = create_model(cfg.model.name, norm=cfg.model.norm, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
    num_params = sum(p.numel() for p in model.parameters())
    mark("model_built")
    ddp = world > 1 or cfg.scaling.force_ddp  # force_ddp: DDP (and SyncBN) at world size 1 too, as the GPU check
    if cfg.scaling.sync_bn and ddp:  # one BatchNorm batch over all ranks: the global batch's statistics (DESIGN §9)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model.to(device)
    forward = net
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        forward = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if cfg.compile:  # with the settings `kn-dist bench models --compile` uses (engine.COMPILE_CONFIG)
        forward = engine.compile_model(forward)
    # Validation runs on the unwrapped module: ranks may have different numbers of val batches (the
    # val shards are not padded) and DDP's forward can issue collectives.
    evaluated = engine.compile_model(net) if cfg.compile else net
    ema = engine.build_ema(net, cfg.optim)  # with EMA, evaluate the average (ConvNeXt's --model_ema_eval)
    evaluated = (engine.compile_model(ema.module) if cfg.compile else ema.module) if ema is not None else evaluated
    seed_all(cfg.seed + 1000 * rank)  # a per-rank stream: dropout masks differ between ranks

    # FFCV shards itself (distributed=True, or a fixed global batch's order); built once, after the process group.
    train = {"seed": cfg.seed, "channels_last": cfg.channels_last, "global_batch": cfg.scaling.global_batch_size}
    loaders = {
        "train": data.train_loader(cfg.data, rank, world, device, **train),
        "val": data.eval_loader(cfg.data, rank, world, device, split="val", channels_last=cfg.channels_last),
    }
    if evaluate_test:  # final runs only: sweep trials never open the test split (DESIGN.md §8)
        loaders["test"] = data.eval_loader(cfg.data, rank, world, device, split="test", channels_last=cfg.channels_last)
    mark("loaders_built")
    steps = len(loaders["train"]) // loaders["train"].accumulation  # optimizer steps
    optimizer = engine.build_optimizer(net, cfg.optim)
    scheduler = engine.build_scheduler(optimizer, cfg.schedule, cfg.epochs, steps)
    scaler = engine.build_scaler(cfg.precision, device)
    mixer = engine.build_mixer(cfg.optim, cfg.seed, rank)
    return _Run(net, forward, evaluated, num_params, optimizer, scheduler, scaler, loaders, steps, ema, mixer)


def _restore(checkpoint: Any | None, run: _Run, cfg: ExperimentConfig, rank: int, world: int, run_id: str | None):
    """(first epoch to train, MLflow run id, the checkpointed epoch's report) after loading `checkpoint`."""
    start_epoch, report = 1, {}
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        run.net.load_state_dict(state["model"])
        if run.ema is not None:  # a checkpoint written without EMA starts the average at the restored weights
            run.ema.load_state_dict(state["ema"]) if "ema" in state else run.ema.restart()
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        report = state.get("report", {"epoch": state["epoch"]})
        # The schedule's position is kept in epochs: with another world size an epoch has another number
        # of steps, and a position in steps would shift the schedule (issue 12, item 5).
        engine.set_schedule_position(run.scheduler, state["epoch"] * run.steps_per_epoch)
        run_id = state["mlflow_run_id"] or run_id
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
        else:  # the world size changed: a fresh but reproducible stream
            seed_all(cfg.seed + 1000 * rank + start_epoch)
    # FFCV derives each epoch's order (and kn_dist its augmentation) from seed + epoch: continue there.
    for loader in run.loaders.values():
        if hasattr(loader, "next_epoch"):
            loader.next_epoch = start_epoch - 1
    return start_epoch, run_id, report


def _train_and_validate(
    run: _Run, cfg: ExperimentConfig, device: torch.device, world: int, *, fail_mid_epoch: str | None = None
) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lr = run.optimizer.param_groups[0]["lr"]
    train = engine.train_epoch(
        run.forward,
        run.loaders["train"],
        run.optimizer,
        run.scheduler,
        run.scaler,
        device=device,
        precision=cfg.precision,
        label_smoothing=cfg.optim.label_smoothing,
        grad_clip=cfg.optim.grad_clip,
        channels_last=cfg.channels_last,
        mixer=run.mixer,
        ema=run.ema,
        accumulation_steps=run.loaders["train"].accumulation,
    )
    while fail_mid_epoch == "hang":  # the other ranks wait in their next collective until this rank's node dies
        time.sleep(1)
    if fail_mid_epoch:
        raise RuntimeError("fault drill: this rank fails mid-epoch (LoopConfig.fail_after_epoch)")
    if world > 1 and not cfg.scaling.sync_bn:
        # Each rank's BatchNorm running stats drift by its last local batch; evaluate (and save)
        # rank 0's everywhere, as DDP itself does before every training forward.
        for buffer in [*run.net.buffers(), *(run.ema.module.buffers() if run.ema is not None else ())]:
            dist.broadcast(buffer, 0)
    val = engine.evaluate(run.evaluated, run.loaders["val"], **_eval_args(cfg, device))
    raw = engine.evaluate(run.net, run.loaders["val"], **_eval_args(cfg, device)) if run.ema is not None else None
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return {
        "train_loss": train["loss"],
        "train_top1": train["top1"],
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "lr": lr,
        "epoch_seconds": train["seconds"],
        "images_per_s": train["images"] / max(train["seconds"], 1e-9),
        "peak_mem_mb": peak,
        **({"val_loss_raw": raw["loss"], "val_top1_raw": raw["top1"]} if raw else {}),  # with EMA: the trained weights
        **run.loaders["train"].epoch_facts(),  # its side (progressive resizing), world size and accumulation
    }


def _save_and_report(session: Session, report: dict[str, Any], run: _Run, epoch: int, run_id: str | None) -> None:
    rng = gather_objects(rng_state(), session.world_size)  # collective: every rank takes part
    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if session.world_rank == 0:
            state = {
                "model": run.net.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(),
                **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
                "epoch": epoch,
                "report": report,  # handed back if the run restarts with nothing left to train
                "rng": rng,
                "mlflow_run_id": run_id,
            }
            torch.save(state, Path(folder) / CHECKPOINT_FILE)
            saved = folder
        session.report(report, saved, CHECKPOINT_DIR.format(epoch=epoch))


# ---------------------------------------------------------------------------------------------------
# small helpers


def _eval_args(cfg: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    return {
        "device": device,
        "precision": cfg.precision,
        "channels_last": cfg.channels_last,
        "tta_flip": cfg.data.tta_flip,
    }


def _format_progress(epoch: int, epochs: int, m: dict[str, float], elapsed: float, done: int) -> str:
    eta = elapsed / max(1, done) * (epochs - epoch)
    return (
        f"{PROGRESS_PREFIX} epoch {epoch}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"train_top1 {100 * m['train_top1']:.2f}%  val_loss {m['val_loss']:.4f}  val_top1 {100 * m['val_top1']:.2f}%  "
        f"lr {m['lr']:.4g}  {m['images_per_s']:.0f} img/s  {m['epoch_seconds']:.1f}s  "
        f"ETA {timedelta(seconds=round(eta))}"
    )
