"""`kn-dist train`: validate on the driver, then one Ray Train V2 TorchTrainer (DESIGN.md §1, §7).

Everything a person can get wrong — config keys, model/norm/geometry, dataset files and labels,
tracking URI, resume without checkpoints — is checked here before Ray starts any worker, and
raised as one-line UserErrors. A run is identified by `RunConfig(storage_path, name)`: Ray Train
V2 resumes from the latest checkpoint whenever that pair already holds one, so names are stable
and `--resume` is required to continue (without it an existing run is refused, not overwritten).

Tune (kn_dist.tune) builds on `prepare_config` (on the real driver) and `build_torch_trainer`
(inside its per-trial driver function).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kn_dist import tracking
from kn_dist.config import ExperimentConfig
from kn_dist.errors import UserError
from kn_dist.models import create_model, model_info

if TYPE_CHECKING:
    import ray.train
    from ray.train.torch import TorchTrainer

# Ray, FFCV and the worker module are imported inside the functions that need them, so a bad model,
# norm or tracking URI is reported before paying for those imports (tens of seconds on a busy machine).
PROGRESS_PREFIX = "[kn-dist]"

LOOP_CONFIG_KEYS = ("mlflow_run_id", "mlflow_parent_run_id", "trial_id", "sweep", "run_key", "stop_after_epoch")
# Ray Train V2 writes this file beside the checkpoints of a run; its presence means "resumable".
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def _is_uri(path: str) -> bool:
    return "://" in path


def prepare_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The resolved config: everything checked, defaults filled in, paths absolute (workers run elsewhere).

    Resolves model.norm (None -> the published norm), model.num_classes (None -> the dataset's),
    data.train_path/val_path (digits is written on first use), checkpoint.storage_path and
    tracking.uri. Idempotent.
    """
    cfg = cfg.model_copy(deep=True)
    try:
        info = model_info(cfg.model.name)
    except ValueError as err:
        raise UserError(str(err)) from None
    norm = cfg.model.norm or info.default_norm
    if norm not in info.norms:
        raise UserError(
            f"model {cfg.model.name!r} does not support norm {norm!r}; valid norms are: {', '.join(info.norms)}"
        )

    # Dataset: files exist (digits is written here on first use), labels fit the head, resolution fits.
    from kn_dist import data

    found = data.check_dataset(cfg.data, num_classes=cfg.model.num_classes)
    cfg.data.train_path, cfg.data.val_path = found["train_path"], found["val_path"]
    classes = found["num_classes"]
    if not _is_uri(cfg.data.root):
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())

    # Build the model once here so a bad name/kwarg/geometry is one line, not a traceback from a worker.
    try:
        model = create_model(cfg.model.name, norm=norm, num_classes=classes, **cfg.model.kwargs).eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
    except (ValueError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model {cfg.model.name!r} (norm {norm!r}, kwargs {cfg.model.kwargs}) cannot be built for "
            f"{cfg.data.image_size}x{cfg.data.image_size} inputs: {first}"
        ) from None
    cfg.model.norm, cfg.model.num_classes = norm, classes

    if not _is_uri(cfg.checkpoint.storage_path):
        cfg.checkpoint.storage_path = str(Path(cfg.checkpoint.storage_path).expanduser().resolve())
    cfg.tracking.uri = tracking.resolve_uri(cfg.tracking.uri)
    if cfg.scaling.use_gpu and not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS"):
        # A cluster may have GPUs the driver lacks; only a purely local run can be judged here.
        import ray

        if not ray.is_initialized():
            raise UserError("scaling.use_gpu=true but this machine has no CUDA device; set scaling.use_gpu=false")
    return ExperimentConfig.model_validate(cfg.model_dump())


def init_ray(address: str | None = None) -> bool:
    """Start a local Ray (no address and no RAY_ADDRESS) or join a cluster; False if Ray was already up.

    Noise reduction: no dashboard for a local Ray, WARNING level for Ray's loggers, Ray Train's
    print patch off (it duplicates every worker print into its log), and Ray Train's INFO lines
    silenced in every worker process by `kn_dist.worker.quiet_ray_logs`.
    """
    import ray

    if ray.is_initialized():
        return False
    local = address is None and not os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # propagated to controller and workers
    kwargs: dict[str, Any] = {
        # "local": start our own Ray even if `ray start` left a cluster on this machine (the contract).
        "address": address or os.environ.get("RAY_ADDRESS") or "local",
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "runtime_env": {"worker_process_setup_hook": "kn_dist.worker.quiet_ray_logs"},
    }
    if local:
        # A single machine cannot be preempted; the watcher only adds an actor and an error line.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    return True


def build_torch_trainer(
    cfg: ExperimentConfig,
    *,
    run_name: str,
    storage_path: str,
    extra_loop_config: dict[str, Any] | None = None,
    callbacks: list | None = None,
) -> TorchTrainer:
    """A TorchTrainer for a config already resolved by `prepare_config` (on the driver).

    `run_name`/`storage_path` identify the run: the same pair resumes from its latest checkpoint.
    `extra_loop_config` sets the keys documented in kn_dist.worker (trial_id, sweep,
    mlflow_parent_run_id, ...); `callbacks` go to RunConfig (e.g. Tune's TuneReportCallback).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from kn_dist.worker import train_worker

    if (
        cfg.tracking.uri is None
        or cfg.data.train_path is None
        or not (_is_uri(storage_path) or Path(storage_path).is_absolute())
    ):
        raise ValueError("build_torch_trainer needs a config from prepare_config and an absolute storage_path")
    extra = dict(extra_loop_config or {})
    unknown = sorted(set(extra) - set(LOOP_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown train_loop_config keys {unknown}; valid: {LOOP_CONFIG_KEYS}")
    loop_config: dict[str, Any] = dict.fromkeys(LOOP_CONFIG_KEYS)
    loop_config["run_key"] = f"{storage_path.rstrip('/')}/{run_name}"
    loop_config.update(extra)
    loop_config["config"] = cfg.model_dump(mode="json")

    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def has_checkpoint(storage_path: str, name: str) -> bool:
    """Whether Ray Train V2 would resume run `name` under `storage_path` (local, NFS, s3://, gs://)."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        info = fs.get_file_info(f"{root.rstrip('/')}/{name}/{SNAPSHOT_FILE}")
    except (OSError, pyarrow.ArrowException) as err:
        raise UserError(f"checkpoint.storage_path {storage_path!r} cannot be read: {err}") from None
    return info.type != pyarrow.fs.FileType.NotFound


def run_training(
    cfg: ExperimentConfig, address: str | None = None, resume: bool = False, *, stop_after_epoch: int | None = None
) -> ray.train.Result:
    """Train `cfg` under Ray Train, tracked in MLflow; returns Ray's Result (final checkpoint, metrics).

    `resume` continues the run of the same name from its latest checkpoint, in the same MLflow
    run. `stop_after_epoch` ends the run early but resumably (the schedule still spans
    cfg.epochs), e.g. to split a run across allocations.
    """
    tracking.check_reachable(tracking.resolve_uri(cfg.tracking.uri))  # first: before any data or model work
    cfg = prepare_config(cfg)
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    storage, name = cfg.checkpoint.storage_path, cfg.name
    exists = has_checkpoint(storage, name)
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
        client.update_run(run_id, status="RUNNING")
    else:
        tags = tracking.run_tags(cfg, norm=cfg.model.norm, run_key=run_key, kind="train")
        run_id = tracking.create_run(client, experiment, cfg, tags)

    import ray

    started = init_ray(address)
    try:
        trainer = build_torch_trainer(
            cfg,
            run_name=name,
            storage_path=storage,
            extra_loop_config={"mlflow_run_id": run_id, "run_key": run_key, "stop_after_epoch": stop_after_epoch},
        )
        print(
            f"{PROGRESS_PREFIX} {'resuming' if resume else 'starting'} run {name!r}: {cfg.model.name} "
            f"(norm {cfg.model.norm}) on {cfg.data.dataset}, {cfg.scaling.num_workers} worker(s) "
            f"{'GPU' if cfg.scaling.use_gpu else 'CPU'}, {cfg.epochs} epochs; MLflow run {run_id} in {uri}",
            flush=True,
        )
        try:
            result = trainer.fit()
        except Exception:
            tracking.finish(client, run_id, ok=False)
            raise
    finally:
        if started:
            ray.shutdown()
    if stop_after_epoch is not None and stop_after_epoch < cfg.epochs:
        tracking.finish(client, run_id, status="KILLED")  # resumable; the worker marks FINISHED at the end
    final = result.metrics or {}
    top1 = 100 * final.get("val_top1", float("nan"))
    print(
        f"{PROGRESS_PREFIX} done: epoch {final.get('epoch')}, val_top1 {top1:.2f}%; "
        f"checkpoint {result.checkpoint.path if result.checkpoint else None}; MLflow run {run_id}",
        flush=True,
    )
    return result
