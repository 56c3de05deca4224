"""`kn-dist tune`: a sweep (kn_dist.sweep) on Ray Tune, every trial one MLflow child of the sweep's run.

Three tiers as in the Ray docs (train_tune_interop): Tuner -> a trial function -> the per-worker loop
(kn_dist.worker). A trial with one worker runs the loop in its own Tune actor (no worker group: the
controller, worker actors and their start-up are not needed for one process); a trial with several
workers is a driver function that builds and fits the TorchTrainer of kn_dist.trainer. The deprecated
`Tuner(trainer)` form is not used (Ray Train V2, DESIGN.md §6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kn_dist import ray_compat, tracking
from kn_dist.config import ExperimentConfig, ScalingConfig
from kn_dist.errors import UserError
from kn_dist.prepare import prepare_config
from kn_dist.runtime import init_ray, say
from kn_dist.sweep import Sweep, load_sweep, trial_plan, validate_sweep
from kn_dist.tune_search import make_searcher
from kn_dist.worker import LoopConfig, train_loop

# ---------------------------------------------------------------------------------------------------
# the trial


class TuneSession:
    """kn_dist.worker's Session inside a Tune trial's own process: one worker, `ray.tune.report`."""

    world_rank, world_size = 0, 1
    in_driver = False

    def __init__(self, use_gpu: bool) -> None:
        import ray
        import torch

        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.node_id = ray.get_runtime_context().get_node_id()

    def latest_checkpoint(self) -> Any | None:
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, dir_name: str | None) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)


def sweep_trial_loop(trial: dict[str, Any], trial_id: str, *, sweep: Sweep, parent_run_id: str) -> LoopConfig:
    """The loop of one sweep trial: the cell's and sampled values on the base config, its own seed."""
    values = {k: v for k, v in trial.items() if k != "seed"}
    cfg = sweep.trial_config(values, seed=trial["seed"], name=f"{sweep.name}-{trial_id}")
    return LoopConfig(
        config=cfg,
        run_key=trial_id,
        kind="trial",
        mlflow_parent_run_id=parent_run_id,
        trial_id=trial_id,
        sweep=sweep.name,
    )


MakeLoop = Callable[[dict[str, Any], str], LoopConfig]  # (Tune trial config, trial id) -> the loop to run


def run_trial_in_process(trial: dict[str, Any], *, make_loop: MakeLoop) -> None:
    """Tune trainable for one-worker trials: the loop itself, in the trial's actor."""
    import ray.tune

    loop = make_loop(trial, ray.tune.get_context().get_trial_id())
    train_loop(loop, TuneSession(loop.config.scaling.use_gpu))


def run_trial_on_worker_group(trial: dict[str, Any], *, make_loop: MakeLoop, storage: str) -> None:
    """Tune trainable for multi-worker trials: a driver function that fits one TorchTrainer.

    Trial ids come from ray.tune.get_context() (ray.train.get_context() raises here, DESIGN.md §7);
    metrics reach Tune through TuneReportCallback.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from kn_dist.trainer import build_torch_trainer

    loop = make_loop(trial, ray.tune.get_context().get_trial_id())
    # A stable run name per trial: a restarted trial resumes from its own checkpoints.
    trainer = build_torch_trainer(
        loop, run_name=loop.config.name, storage_path=storage, callbacks=[TuneReportCallback()]
    )
    trainer.fit()


def loop_trainable(make_loop: MakeLoop, scaling: ScalingConfig, storage: str) -> Any:
    """The Tune trainable that runs `make_loop`'s loops with `scaling`: in the trial's process for one
    worker, as a TorchTrainer (its checkpoints under `storage`) for several."""
    from ray import tune

    if scaling.num_workers == 1:
        trainable = tune.with_parameters(run_trial_in_process, make_loop=make_loop)
        return tune.with_resources(
            trainable, {"cpu": scaling.cpus_per_worker, "gpu": scaling.gpus_per_worker if scaling.use_gpu else 0}
        )
    trainable = tune.with_parameters(run_trial_on_worker_group, make_loop=make_loop, storage=storage)
    # The driver function only waits on its TorchTrainer; the workers hold the CPUs/GPUs. An all-zero
    # request is refused, so the driver asks for one byte of memory.
    return tune.with_resources(trainable, {"cpu": 0, "memory": 1})


# ---------------------------------------------------------------------------------------------------
# concurrency, scheduler, MLflow parent run


def trial_resources(sweep: Sweep) -> dict[str, float]:
    """What one trial's workers hold together."""
    s = sweep.base.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu and s.gpus_per_worker > 0:
        need["GPU"] = s.num_workers * s.gpus_per_worker
    return need


def concurrency_limit(sweep: Sweep, now: dict[str, float], most: dict[str, float] | None) -> tuple[int, str]:
    """(trials at once, where the number comes from).

    `now`: the cluster's resources at start; `most`: what its autoscaler can grow to (None without an
    autoscaler). tune.max_concurrent_trials wins; else whatever the larger of the two can hold, so
    pending trials ask the autoscaler for nodes instead of waiting for one another. Never more than the
    sweep's trials, never fewer than one.
    """
    trials = len(trial_plan(sweep))
    if sweep.tune.max_concurrent_trials is not None:
        return sweep.tune.max_concurrent_trials, "tune.max_concurrent_trials"
    need = trial_resources(sweep)

    def fits(resources: dict[str, float]) -> int:
        return int(min(resources.get(k, 0) // v for k, v in need.items()))

    here, grown = fits(now), fits(most) if most else 0
    described = ", ".join(f"{v:g} {k}" for k, v in need.items())
    if grown > here:
        limit, source = grown, f"what the autoscaler can provide ({_describe(most)}), {described} per trial"
    else:
        limit, source = here, f"the cluster's resources ({_describe(now)}), {described} per trial"
    return max(1, min(limit, trials)), source


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k in resources or k == "CPU")


def _scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = sweep.tune.scheduler
    if sched.name == "fifo":
        return FIFOScheduler()
    # A trial's last epoch logs its artifacts before its last report (kn_dist.worker), so ASHA may stop
    # every trial at max_t as it does.
    return ASHAScheduler(
        time_attr="epoch",  # reported by the worker: still right after a trial resumes mid-way
        max_t=sweep.base.epochs,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )


def _parent_run(sweep: Sweep, *, resume: bool, parent_run_id: str | None = None) -> str:
    """The sweep's MLflow parent run, created here on the driver (Ray's MLflowLoggerCallback would make
    flat runs, DESIGN.md §7); trials nest under it. `resume` reuses the sweep's existing parent;
    `parent_run_id` nests the sweep itself under a study run."""
    client, experiment = tracking.client(sweep.base.tracking.uri), sweep.base.tracking.experiment
    run_key = f"sweep:{sweep.name}"
    run_id = tracking.find_run(client, experiment, run_key) if resume else None
    if run_id is not None:
        tracking.mark_running(client, run_id)
        return run_id
    tags = tracking.run_tags(sweep.base, run_key=run_key, kind="sweep", sweep=sweep.name, parent_run_id=parent_run_id)
    run_id = tracking.create_run(client, experiment, sweep.base, tags)
    # `tune.*` params beside the base config's; report.py reads target_top1
    tracking.log_text_params(client, run_id, {f"tune.{k}": v for k, v in sweep.tune.model_dump(mode="json").items()})
    return run_id


def storage_join(root: str, *parts: str) -> str:
    """root/parts for a local folder (absolute) or a URI (s3://, gs://)."""
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else str(Path(root).resolve().joinpath(*parts))


def _prepare(sweep: Sweep) -> None:
    """Resolve the base config once on the driver, as `kn-dist train` does (kn_dist.prepare.prepare_config):
    dataset written/checked, paths and tracking URI absolute (workers run elsewhere), num_classes set."""
    first = sweep.trial_config(sweep.cells[0].values, seed=sweep.base.seed, name=sweep.name)
    resolved = prepare_config(first)
    base = sweep.base
    for key in ("root", "train_path", "val_path", "test_path"):
        setattr(base.data, key, getattr(resolved.data, key))
    base.model.num_classes = resolved.model.num_classes
    base.checkpoint.storage_path = resolved.checkpoint.storage_path
    base.tracking.uri = resolved.tracking.uri


# ---------------------------------------------------------------------------------------------------
# the sweep


def open_sweep(
    path: str | Path, overrides: list[str] | None = None, tracking_uri: str | None = None, *, sweep: Sweep | None = None
) -> Sweep:
    """Load (or take), validate and resolve a sweep on the driver: every error before any trial starts."""
    sweep = sweep or load_sweep(path, overrides)
    if tracking_uri is not None:
        sweep.base.tracking.uri = tracking_uri
    tracking.check_reachable(tracking.resolve_uri(sweep.base.tracking.uri))
    validate_sweep(sweep)
    _prepare(sweep)
    return sweep


def sweep_dir(sweep: Sweep) -> str:
    return storage_join(sweep.base.checkpoint.storage_path, sweep.name)


def fit_sweep(sweep: Sweep, *, resume: bool, parent_run_id: str | None = None) -> Any:
    """Run (or restore) the Tuner of an opened sweep with Ray already up; returns Ray Tune's ResultGrid."""
    import ray
    from ray import tune

    experiment_dir = sweep_dir(sweep)
    restorable = tune.Tuner.can_restore(experiment_dir)
    if resume and not restorable:
        raise UserError(f"--resume: no interrupted sweep {sweep.name!r} at {experiment_dir}")
    if not resume and restorable:
        raise UserError(
            f"sweep {sweep.name!r} already exists at {experiment_dir}; pass --resume to continue it, "
            "or give it another name (name=...)"
        )
    # Inside a study the sweep's run is reused whenever it exists (a study killed before Tune saved its state).
    sweep_run_id = _parent_run(sweep, resume=resume or parent_run_id is not None, parent_run_id=parent_run_id)
    limit, source = concurrency_limit(sweep, ray.cluster_resources(), ray_compat.autoscaler_max_resources())
    say(
        f"{'resuming' if resume else 'starting'} sweep {sweep.name!r}: {len(trial_plan(sweep))} trials over "
        f"{len(sweep.cells)} cells, up to {limit} at once ({source}); MLflow parent run {sweep_run_id} in "
        f"experiment {sweep.base.tracking.experiment!r} at {sweep.base.tracking.uri}"
    )
    if sweep.base.scaling.num_workers > 1:
        ray_compat.start_autoscaling_coordinator()  # TorchTrainer trials: ready before their controllers ask
    make_loop = functools.partial(sweep_trial_loop, sweep=sweep, parent_run_id=sweep_run_id)
    trainable = loop_trainable(
        make_loop, sweep.base.scaling, storage_join(sweep.base.checkpoint.storage_path, f"{sweep.name}-trials")
    )
    if resume:
        tuner = tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=sweep.tune.metric,
                mode=sweep.tune.mode,
                search_alg=make_searcher(sweep),
                scheduler=_scheduler(sweep),
                num_samples=len(trial_plan(sweep)),
                max_concurrent_trials=limit,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune_run_config(sweep.name, sweep.base),
        )
    try:
        results = tuner.fit()
    except BaseException:
        # The sweep's own error is what the user must see: a failing MLflow store may not replace it.
        close_tune_runs(sweep.base, sweep_run_id, set(), ok=False, quiet=True)
        raise
    failed = {trial_key(r) for r in results if r.error is not None}
    close_tune_runs(sweep.base, sweep_run_id, failed, ok=not results.errors)
    say(f"sweep {sweep.name!r} done: {len(results)} trials, {len(results.errors)} failed")
    return results


def tune_run_config(name: str, base: ExperimentConfig) -> Any:
    """Tune's RunConfig for a sweep or a study's finals: storage, failures and checkpoints from the config."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=base.checkpoint.storage_path,
        verbose=1,
        # One-worker trials restart from their last checkpoint (on another node if theirs is gone).
        failure_config=tune.FailureConfig(max_failures=base.checkpoint.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=base.checkpoint.keep),
    )


def trial_key(result: Any) -> str:
    """The MLflow run key of a Tune result's trial (kn_dist trials are keyed by their trial id)."""
    return str(result.metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"))


def close_tune_runs(base: ExperimentConfig, parent_run_id: str, failed: set[str], *, ok: bool, quiet: bool = False):
    """End the children a Tune run left RUNNING (FAILED where errored, KILLED where stopped early) and the
    parent. `quiet`: while another error propagates, an MLflow failure here is one line, not a new error."""
    try:
        client = tracking.client(base.tracking.uri)
        tracking.close_children(client, base.tracking.experiment, parent_run_id, failed)
        tracking.finish(client, parent_run_id, ok=ok)
    except Exception as err:
        if not quiet:
            raise
        say(f"could not close the MLflow runs of {parent_run_id} ({type(err).__name__}: {err})")


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default spells out the whole config


def run_sweep(
    path: str | Path,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
) -> Any:
    """`kn-dist tune`: validate the sweep, open its MLflow parent run, run (or restore) the Tuner.

    Returns Ray Tune's ResultGrid.
    """
    import ray

    sweep = open_sweep(path, overrides, tracking_uri)
    started = init_ray(address, dashboard=sweep.base.scaling.num_workers > 1)
    try:
        results = fit_sweep(sweep, resume=resume)
    finally:
        if started:
            ray.shutdown()
    say(
        f"best per (model, norm): kn-dist best --experiment {sweep.base.tracking.experiment} "
        f"--tracking-uri {sweep.base.tracking.uri}"
    )
    return results
