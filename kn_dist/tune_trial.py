"""One Tune trial: the segment of a sweep trial (or a study's final) that it trains, and where it runs.

Three tiers as in the Ray docs (train_tune_interop): Tuner -> a trial function -> the per-worker loop
(kn_dist.worker). A trial with one worker runs the loop in its own Tune actor (no worker group: the
controller, worker actors and their start-up are not needed for one process); a trial with several
workers is a driver function that builds and fits the TorchTrainer of kn_dist.trainer. The deprecated
`Tuner(trainer)` form is not used (Ray Train V2, DESIGN.md §6).

Either way a run's checkpoints live under <storage>/<run name>/epoch_NNNN (kn_dist.checkpoint_store), not
in the Tune trial's folder: the next segment of a sweep trial, a study's later pass or a retried trial is a
new Tune trial, and it continues from there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kn_dist.checkpoint_store import latest_checkpoint, save_checkpoint
from kn_dist.config import ScalingConfig
from kn_dist.sweep import Sweep
from kn_dist.tune_search import segment_keys
from kn_dist.worker import LoopConfig, train_loop

TRIAL_KEY_TAG = "kn_dist.trial_key"  # c<cell>s<sample>r<rep> (kn_dist.sweep_progress.TrialKey)


class TuneSession:
    """kn_dist.worker's Session inside a Tune trial's own process: one worker, `ray.tune.report`,
    checkpoints kept under `storage`/`name` by kn_dist (kn_dist.checkpoint_store)."""

    world_rank, world_size = 0, 1
    in_driver = False

    def __init__(self, use_gpu: bool, storage: str, name: str, keep: int) -> None:
        import ray
        import torch

        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.node_id = ray.get_runtime_context().get_node_id()
        self.storage, self.name, self.keep = storage, name, keep

    def latest_checkpoint(self) -> Any | None:
        import ray.tune

        path = latest_checkpoint(self.storage, self.name)
        return ray.tune.Checkpoint(path) if path else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, dir_name: str | None) -> None:
        import ray.tune

        if checkpoint_dir:
            save_checkpoint(self.storage, self.name, checkpoint_dir, dir_name, self.keep)
        ray.tune.report(metrics)


def sweep_trial_loop(trial: dict[str, Any], trial_id: str, *, sweep: Sweep, parent_run_id: str) -> LoopConfig:
    """The loop of one segment of a sweep trial: the cell's and sampled values on the base config, the
    trial's seed, stopping (resumably) after the segment's stop epoch. One MLflow run per trial."""
    key, stop = segment_keys(trial)
    values = {k: v for k, v in trial.items() if not k.startswith("kn_dist.") and k != "seed"}
    cfg = sweep.trial_config(values, seed=trial["seed"], name=f"{sweep.name}-{key.name}")
    cell = sweep.cells[key.cell]
    return LoopConfig(
        config=cfg,
        run_key=f"trial:{sweep.name}:{key.name}",
        kind="trial",
        mlflow_parent_run_id=parent_run_id,
        trial_id=key.name,
        sweep=sweep.name,
        stop_after_epoch=stop if stop < cfg.epochs else None,
        tags={
            TRIAL_KEY_TAG: key.name,
            "kn_dist.cell": cell.label,
            "kn_dist.sample": str(key.sample),
            "kn_dist.rep": str(key.rep),
        },
    )


MakeLoop = Callable[[dict[str, Any], str], LoopConfig]  # (Tune trial config, Tune trial id) -> the loop to run


def run_trial_in_process(trial: dict[str, Any], *, make_loop: MakeLoop, storage: str) -> None:
    """Tune trainable for one-worker trials: the loop itself, in the trial's actor."""
    import ray.tune

    loop = make_loop(trial, ray.tune.get_context().get_trial_id())
    cfg = loop.config
    train_loop(loop, TuneSession(cfg.scaling.use_gpu, storage, cfg.name, cfg.checkpoint.keep))


def run_trial_on_worker_group(trial: dict[str, Any], *, make_loop: MakeLoop, storage: str) -> None:
    """Tune trainable for multi-worker trials: a driver function that fits one TorchTrainer.

    Trial ids come from ray.tune.get_context() (ray.train.get_context() raises here, DESIGN.md §7);
    metrics reach Tune through TuneReportCallback.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from kn_dist.trainer import build_torch_trainer

    loop = make_loop(trial, ray.tune.get_context().get_trial_id())
    # A stable run name per run: a later segment or a restarted trial resumes from the run's checkpoints.
    loop = loop.model_copy(update={"resume_from": latest_checkpoint(storage, loop.config.name)})
    trainer = build_torch_trainer(
        loop, run_name=loop.config.name, storage_path=storage, callbacks=[TuneReportCallback()]
    )
    trainer.fit()


def loop_trainable(make_loop: MakeLoop, scaling: ScalingConfig, storage: str) -> Any:
    """The Tune trainable that runs `make_loop`'s loops with `scaling`, their checkpoints under `storage`:
    in the trial's process for one worker, as a TorchTrainer for several."""
    from ray import tune

    if scaling.num_workers == 1:
        trainable = tune.with_parameters(run_trial_in_process, make_loop=make_loop, storage=storage)
        return tune.with_resources(
            trainable, {"cpu": scaling.cpus_per_worker, "gpu": scaling.gpus_per_worker if scaling.use_gpu else 0}
        )
    trainable = tune.with_parameters(run_trial_on_worker_group, make_loop=make_loop, storage=storage)
    # The driver function only waits on its TorchTrainer; the workers hold the CPUs/GPUs. An all-zero
    # request is refused, so the driver asks for one byte of memory.
    return tune.with_resources(trainable, {"cpu": 0, "memory": 1})
