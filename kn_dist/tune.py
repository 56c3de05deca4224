"""`kn-dist tune`: a sweep (kn_dist.sweep) on Ray Tune, every trial one MLflow child of the sweep's run.

A sweep runs in *passes*: each pass is one Tuner whose searcher (kn_dist.tune_search) hands out the
segments that kn_dist.sweep_progress decides from what the trials have recorded in MLflow. A sweep that
was killed, or whose trial failed, continues with `--resume` as a new pass: finished epochs are kept,
unfinished trials continue from their checkpoints, and no decision depends on Tune's saved state. The
trials themselves are kn_dist.tune_trial's.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

from kn_dist import ray_compat, tracking
from kn_dist.config import ExperimentConfig
from kn_dist.errors import UserError
from kn_dist.prepare import prepare_config
from kn_dist.runtime import init_ray, say
from kn_dist.sweep import Sweep, load_sweep, trial_plan, validate_sweep
from kn_dist.sweep_progress import SweepProgress, TrialKey
from kn_dist.tune_search import make_searcher
from kn_dist.tune_trial import TRIAL_KEY_TAG, loop_trainable, sweep_trial_loop

PASSES_TAG = "kn_dist.passes"  # Tuner runs a sweep took (each one a pass; kn_dist.sweep_progress)
STOPPED_TAG = tracking.STOPPED_TAG

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
    """Tune's scheduler: ASHA for `asha`; FIFO otherwise (`halving` decides in the searcher, per cell)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = sweep.tune.scheduler
    if sched.name != "asha":
        return FIFOScheduler()
    # A trial's last epoch logs its artifacts before its last report (kn_dist.worker), so ASHA may stop
    # every trial at max_t as it does.
    return ASHAScheduler(
        time_attr="epoch",  # reported by the worker: still right after a trial resumes mid-way
        max_t=sweep.base.epochs,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )


def _parent_run(sweep: Sweep, run_id: str | None, parent_run_id: str | None) -> str:
    """The sweep's MLflow parent run (`run_id` if it exists), created here on the driver (Ray's
    MLflowLoggerCallback would make flat runs, DESIGN.md §7); trials nest under it. `parent_run_id` nests
    the sweep itself under a study run."""
    client, experiment = tracking.client(sweep.base.tracking.uri), sweep.base.tracking.experiment
    if run_id is not None:
        tracking.mark_running(client, run_id)
        return run_id
    run_key = f"sweep:{sweep.name}"
    tags = tracking.run_tags(sweep.base, run_key=run_key, kind="sweep", sweep=sweep.name, parent_run_id=parent_run_id)
    run_id = tracking.create_run(client, experiment, sweep.base, tags)
    # `tune.*` params beside the base config's; report.py reads target_top1
    tracking.log_text_params(client, run_id, {f"tune.{k}": v for k, v in sweep.tune.model_dump(mode="json").items()})
    return run_id


def read_progress(sweep: Sweep, client: Any, sweep_run_id: str) -> tuple[SweepProgress, dict[tuple[int, int], Any]]:
    """The sweep's progress as its trials recorded it in MLflow, and (optuna) the values they were given."""
    progress, values = SweepProgress(sweep), {}
    for run in tracking.child_runs(client, sweep.base.tracking.experiment, sweep_run_id):
        name = run.data.tags.get(TRIAL_KEY_TAG)
        if run.data.tags.get("kn_dist.kind") != "trial" or name is None:
            continue
        key = TrialKey.parse(name)
        for metric in client.get_metric_history(run.info.run_id, sweep.tune.metric):
            progress.record(key, metric.step, metric.value)
        if sweep.tune.scheduler.name == "asha" and run.data.tags.get(STOPPED_TAG) == "true":
            progress.stopped.add(key)
        if sweep.tune.search == "optuna":  # random draws are recomputed (kn_dist.sweep.sample_values)
            values[key.candidate] = {k: _param_value(run.data.params[k]) for k in sweep.cells[key.cell].space}
    return progress, values


def _param_value(text: str) -> Any:
    """An MLflow param (str() of a config value) as the value, as kn_dist.report.run_config reads params."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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


def fit_sweep(sweep: Sweep, *, resume: bool, parent_run_id: str | None = None) -> Any:
    """Run one pass of an opened sweep with Ray already up (kn_dist.sweep_progress decides its segments);
    returns Ray Tune's ResultGrid of the pass, or None when the records show nothing left to train.

    `resume` continues the sweep recorded in MLflow; a study (`parent_run_id`) always continues its own.
    A trial that still fails after checkpoint.max_failures retries ends the pass with a UserError once
    every other trial that can run has run: `--resume` retries it.
    """
    import ray
    from ray import tune

    base = sweep.base
    client, experiment = tracking.client(base.tracking.uri), base.tracking.experiment
    existing = tracking.find_run(client, experiment, f"sweep:{sweep.name}")
    if parent_run_id is None and resume and existing is None:
        raise UserError(f"--resume: no sweep {sweep.name!r} in MLflow experiment {experiment!r} at {base.tracking.uri}")
    if parent_run_id is None and not resume and existing is not None:
        raise UserError(
            f"sweep {sweep.name!r} already exists in MLflow experiment {experiment!r}; pass --resume to continue "
            "it, or give it another name (name=...)"
        )
    sweep_run_id = _parent_run(sweep, existing, parent_run_id)
    progress, values = read_progress(sweep, client, sweep_run_id)
    if progress.finished():
        close_tune_runs(base, sweep_run_id, progress, ok=True)
        return None
    passes = int(client.get_run(sweep_run_id).data.tags.get(PASSES_TAG, "0")) + 1
    client.set_tag(sweep_run_id, PASSES_TAG, str(passes))
    limit, source = concurrency_limit(sweep, ray.cluster_resources(), ray_compat.autoscaler_max_resources())
    rungs = ", ".join(map(str, progress.rungs))
    say(
        f"{'continuing' if passes > 1 else 'starting'} sweep {sweep.name!r} (pass {passes}): "
        f"{len(trial_plan(sweep))} trials over {len(sweep.cells)} cells, {sweep.tune.scheduler.name} "
        f"(rungs at epochs {rungs}), up to {limit} at once ({source}); MLflow parent run {sweep_run_id} in "
        f"experiment {experiment!r} at {base.tracking.uri}"
    )
    if base.scaling.num_workers > 1:
        ray_compat.start_autoscaling_coordinator()  # TorchTrainer trials: ready before their controllers ask
    make_loop = functools.partial(sweep_trial_loop, sweep=sweep, parent_run_id=sweep_run_id)
    trainable = loop_trainable(
        make_loop, base.scaling, storage_join(base.checkpoint.storage_path, f"{sweep.name}-trials")
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=sweep.tune.metric,
            mode=sweep.tune.mode,
            search_alg=make_searcher(sweep, progress, values),
            scheduler=_scheduler(sweep),
            num_samples=-1,  # the searcher says when the sweep is done
            max_concurrent_trials=limit,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune_run_config(f"{sweep.name}-pass{passes}", base),
    )
    try:
        results = tuner.fit()
    except BaseException:
        # The sweep's own error is what the user must see: a failing MLflow store may not replace it.
        close_tune_runs(base, sweep_run_id, progress, ok=False, quiet=True)
        raise
    close_tune_runs(base, sweep_run_id, progress, ok=not progress.failed)
    say(f"sweep {sweep.name!r} pass {passes} done: {len(results)} segments, {len(progress.failed)} failed")
    if progress.failed:
        names = ", ".join(k.name for k in sorted(progress.failed))
        raise UserError(
            f"sweep {sweep.name!r}: trial(s) {names} failed after checkpoint.max_failures="
            f"{base.checkpoint.max_failures} retries, so their cells cannot finish with equal budgets; fix the "
            f"cause (Tune's trial logs under {storage_join(base.checkpoint.storage_path, sweep.name)}-pass{passes}) "
            "and run the same command with --resume: every finished epoch is kept"
        )
    return results


def tune_run_config(name: str, base: ExperimentConfig) -> Any:
    """Tune's RunConfig for a sweep or a study's finals: storage, failures and checkpoints from the config."""
    from ray import tune

    from kn_dist.tune_console import make_console_callback, quiet_tune

    quiet_tune()
    return tune.RunConfig(
        name=name,
        storage_path=base.checkpoint.storage_path,
        verbose=0,  # no boxed tables: kn_dist.tune_console prints one line per trial start, epoch and end
        callbacks=[make_console_callback(base.epochs)],
        # One-worker trials restart from their last checkpoint (on another node if theirs is gone).
        failure_config=tune.FailureConfig(max_failures=base.checkpoint.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=base.checkpoint.keep),
    )


def close_tune_runs(
    base: ExperimentConfig, parent_run_id: str, progress: SweepProgress, *, ok: bool, quiet: bool = False
) -> None:
    """End the trial runs a pass left RUNNING: FAILED where the trial failed, KILLED and tagged
    kn_dist.stopped_early where it will train no further, KILLED (resumable) otherwise; then the parent.
    `quiet`: while another error propagates, an MLflow failure here is one line, not a new error."""
    sweep = progress.sweep.name
    try:
        client = tracking.client(base.tracking.uri)
        failed = {f"trial:{sweep}:{k.name}" for k in progress.failed}
        stopped = {f"trial:{sweep}:{k.name}" for k in progress.stopped_trials()}
        tracking.close_children(client, base.tracking.experiment, parent_run_id, failed, stopped)
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
    started = init_ray(address, dashboard=sweep.base.scaling.num_workers > 1, worker_output=False)
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
