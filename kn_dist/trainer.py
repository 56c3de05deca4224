"""`kn-dist train`: one run under a Ray Train V2 TorchTrainer (DESIGN.md §1, §7), or in this process.

The config is resolved and checked on the driver first (kn_dist.prepare); then a TorchTrainer runs
kn_dist.worker.train_worker on every rank. A one-worker run on this machine (local Ray, local storage,
`scaling.in_process` true, the default) skips Ray altogether: the same loop runs here
(kn_dist.in_process), with the same checkpoint folders and MLflow records.

A run is identified by (storage_path, name), Ray Train V2's `RunConfig`: it resumes from the latest
checkpoint whenever that pair holds one, so names are stable and `--resume` is required to continue
(without it an existing run is refused, not overwritten).

kn_dist.tune builds its multi-worker trials with `build_torch_trainer`; one-worker trials run the
same loop without a worker group (kn_dist.tune).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kn_dist import ray_compat, tracking
from kn_dist.checkpoint_store import latest_checkpoint
from kn_dist.config import ExperimentConfig
from kn_dist.errors import UserError
from kn_dist.prepare import prepare_config
from kn_dist.runtime import TIMELINE_TAG, init_ray, is_local_address, mark, say, timeline_json
from kn_dist.worker import LoopConfig

if TYPE_CHECKING:
    import ray.train

    from kn_dist.in_process import InProcessResult

__all__ = ["build_torch_trainer", "has_checkpoint", "latest_checkpoint", "prepare_config", "run_training"]


def _is_uri(path: str) -> bool:
    return "://" in path


def build_torch_trainer(loop: LoopConfig, *, run_name: str, storage_path: str, callbacks: list | None = None):
    """A TorchTrainer running kn_dist.worker.train_worker with `loop` (its config from prepare_config).

    `run_name`/`storage_path` identify the run: the same pair resumes from its latest checkpoint.
    `callbacks` go to RunConfig (e.g. Tune's TuneReportCallback).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from kn_dist.worker import train_worker

    cfg = loop.config
    if (
        cfg.tracking.uri is None
        or cfg.data.train_path is None
        or not (_is_uri(storage_path) or Path(storage_path).is_absolute())
    ):
        raise ValueError("build_torch_trainer needs a config from prepare_config and an absolute storage_path")
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config=loop.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            # Elastic (min_workers): Ray Train starts on what the cluster holds and, after a lost node,
            # restarts from the last checkpoint on the remaining workers; the global batch stays fixed.
            num_workers=(scaling.min_workers, scaling.num_workers) if scaling.min_workers else scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            # A node drained with notice (spot/preemptible) is not a failure: Ray Train restarts the
            # group elsewhere from the last checkpoint without using max_failures (clusters/README.md).
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=callbacks,
            # Ray Train's INFO and WARNING records stay in its log files; errors still reach the console.
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
        ),
    )


def has_checkpoint(storage_path: str, name: str) -> bool:
    """Whether run `name` under `storage_path` holds a kn_dist checkpoint (`latest_checkpoint`)."""
    return latest_checkpoint(storage_path, name) is not None


def runs_in_process(cfg: ExperimentConfig, address: str | None) -> bool:
    """Whether `run_training` runs cfg's loop in this process (kn_dist.in_process) rather than under Ray Train."""
    return (
        cfg.scaling.num_workers == 1
        and cfg.scaling.in_process
        and is_local_address(address)
        and not _is_uri(cfg.checkpoint.storage_path)
    )


def run_training(
    cfg: ExperimentConfig,
    address: str | None = None,
    resume: bool = False,
    *,
    stop_after_epoch: int | None = None,
    fault_drill: dict[str, int] | None = None,
) -> ray.train.Result | InProcessResult:
    """Train `cfg` under Ray Train or in this process (`runs_in_process`), tracked in MLflow.

    Returns Ray's Result or its in-process equivalent: `.metrics` (the last epoch's), `.checkpoint`.

    `resume` continues the run of the same name from its latest checkpoint, in the same MLflow
    run. `stop_after_epoch` ends the run early but resumably (the schedule still spans
    cfg.epochs), e.g. to split a run across allocations. `fault_drill` ({"fail_after_epoch": e,
    "fail_rank": r}) makes one rank fail once after epoch e's checkpoint (kn_dist.worker.LoopConfig).
    """
    tracking.check_reachable(tracking.resolve_uri(cfg.tracking.uri))  # first: before any data or model work
    cfg = prepare_config(cfg, address=address)
    mark("config_prepared")
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    storage, name = cfg.checkpoint.storage_path, cfg.name
    latest = latest_checkpoint(storage, name)
    exists = latest is not None
    if exists and not resume:
        raise UserError(
            f"run {name!r} already has checkpoints in {storage}/{name}; pass --resume to continue it "
            "or choose another name (name=...)"
        )
    if resume and not exists:
        raise UserError(f"nothing to resume: run {name!r} has no checkpoint in {storage}/{name}")

    run_key = f"{storage.rstrip('/')}/{name}"
    client = tracking.client(uri)
    run_id = tracking.find_run(client, experiment, run_key) if resume else None
    if run_id is not None:
        changed = tracking.param_differences(client, run_id, cfg)
        if changed:
            raise UserError(
                f"cannot resume run {name!r} with a different config (changed: {', '.join(changed)}); "
                "use the original values or a new name"
            )
        tracking.mark_running(client, run_id)
    else:
        run_id = tracking.create_run(client, experiment, cfg, tracking.run_tags(cfg, run_key=run_key, kind="train"))

    loop = LoopConfig(
        config=cfg,
        run_key=run_key,
        mlflow_run_id=run_id,
        stop_after_epoch=stop_after_epoch,
        resume_from=latest if resume else None,
        **(fault_drill or {}),
    )
    here = runs_in_process(cfg, address)
    say(
        f"{'resuming' if resume else 'starting'} run {name!r}: {cfg.model.name} (norm {cfg.model.norm}) on "
        f"{cfg.data.dataset}, {cfg.scaling.num_workers} worker(s) {'GPU' if cfg.scaling.use_gpu else 'CPU'}"
        f"{' in this process' if here else ''}, {cfg.epochs} epochs; MLflow run {run_id} in {uri}"
    )
    try:
        result = _fit_here(loop) if here else _fit_on_ray(loop, address)
    except BaseException:
        tracking.finish(client, run_id, ok=False)
        raise
    client.set_tag(run_id, TIMELINE_TAG.format(role="driver"), timeline_json())
    if stop_after_epoch is not None and stop_after_epoch < cfg.epochs:
        tracking.finish(client, run_id, status="KILLED")  # resumable; the worker marks FINISHED at the end
    final: dict[str, Any] = result.metrics or {}
    top1 = 100 * final.get("val_top1", float("nan"))
    say(
        f"done: epoch {final.get('epoch')}, val_top1 {top1:.2f}%; "
        f"checkpoint {result.checkpoint.path if result.checkpoint else None}; MLflow run {run_id}"
    )
    return result


def _fit_here(loop: LoopConfig):
    from kn_dist.in_process import fit_in_process

    mark("fit_started")
    result = fit_in_process(loop, Path(loop.config.checkpoint.storage_path) / loop.config.name)
    mark("fit_returned")
    return result


def _fit_on_ray(loop: LoopConfig, address: str | None):
    import ray

    started = init_ray(address)
    ray_compat.start_autoscaling_coordinator()  # ready before the controller asks (ray_compat)
    mark("ray_started")
    try:
        trainer = build_torch_trainer(loop, run_name=loop.config.name, storage_path=loop.config.checkpoint.storage_path)
        mark("fit_started")
        result = trainer.fit()
        mark("fit_returned")
    finally:
        if started:
            ray.shutdown()
    return result
