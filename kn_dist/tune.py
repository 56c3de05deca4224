"""Ray Tune sweeps of KernelNorm hyperparameters per architecture, baseline norms on the same budget.

A sweep file is an experiment config (kn_dist/config.py) plus a `tune:` section:

    tune:
      search: random            # or optuna (TPE)
      num_samples: 2            # sampled configurations per cell (architecture x norm x grid values)
      scheduler: {name: asha, grace_period: 1, reduction_factor: 3}
      space:                    # every trial; `grid` keys multiply the cells
        optim.lr: {loguniform: [0.01, 0.2]}
      architectures:
        - model: vit_cifar
          kwargs: {image_size: 16}          # fixed model arguments, every norm
          norms: [ln, kn]                   # default: the published norm and "kn"
          kn_space:                         # KernelNorm cells only: baselines refuse kn_* arguments
            model.kwargs.kn_kernel_size: {choice: [2, 4]}

Every cell gets `num_samples` trials, so a baseline norm gets exactly the budget of KernelNorm.
Three tiers as in the Ray docs (train_tune_interop): Tuner -> `_run_trial` (a driver function that
builds the TorchTrainer of kn_dist/trainer.py) -> the per-worker loop. The deprecated `Tuner(trainer)`
form is not used (Ray Train V2, DESIGN.md §6).
"""

from __future__ import annotations

import functools
import itertools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kn_dist import config
from kn_dist.errors import UserError

# Keys a sweep may not search: they are the trial's identity, its budget, its resources or its data.
_FIXED = {
    "name": "the trial name is set per trial",
    "seed": "use tune.seeds (replicates) or leave it: every trial gets its own seed",
    "epochs": "the epoch budget is the ASHA max_t; set epochs outside the space",
    "model.name": "list models under tune.architectures",
    "model.norm": "list norms under tune.architectures",
}
_FIXED_PREFIXES = ("scaling.", "checkpoint.", "tracking.", "data.dataset", "data.root", "data.train_path")
_FIXED_PREFIXES += ("data.val_path", "data.source_dir", "data.image_size")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpaceSpec(_Strict):
    """One searched key: exactly one of the forms below. `randint` bounds are both inclusive."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> SpaceSpec:
        given = [k for k, v in self if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid/choice/uniform/loguniform/randint, got {given or 'none'}")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]} needs at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and not values[0] <= values[1]:
            raise ValueError(f"{given[0]} bounds {list(values)} are not [low, high]")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform bounds {list(values)} must be positive")
        return self

    @property
    def form(self) -> str:
        return next(k for k, v in self if v is not None)

    def probes(self) -> list[Any]:
        """Values that stand for the whole range when validating: every listed value, or both bounds."""
        return list(getattr(self, self.form))

    def domain(self) -> Any:
        """The Ray Tune search domain (not for grid keys, which make the cells)."""
        from ray import tune

        lo_hi = getattr(self, self.form)
        return {
            "choice": lambda: tune.choice(self.choice),
            "uniform": lambda: tune.uniform(*lo_hi),
            "loguniform": lambda: tune.loguniform(*lo_hi),
            "randint": lambda: tune.randint(lo_hi[0], lo_hi[1] + 1),  # Tune's upper bound is exclusive
        }[self.form]()


class ArchitectureSpec(_Strict):
    """One architecture of the comparison and the norms it is trained with."""

    model: str  # registered model name (`kn-dist models`)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # fixed model.kwargs for every norm
    norms: list[str] | None = None  # default: the published norm, plus "kn" where the model supports it
    space: dict[str, SpaceSpec] = Field(default_factory=dict)  # sampled for every norm of this model
    kn_space: dict[str, SpaceSpec] = Field(default_factory=dict)  # sampled for KernelNorm norms only


class SchedulerSpec(_Strict):
    name: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs its full budget
    grace_period: int = Field(1, ge=1)  # epochs before a trial may be stopped
    reduction_factor: float = Field(3.0, gt=1)  # keep the top 1/reduction_factor at each rung


class TuneSpec(_Strict):
    metric: Literal["val_top1", "val_loss"] = "val_top1"
    mode: Literal["max", "min"] = "max"
    search: Literal["random", "optuna"] = "random"
    num_samples: int = Field(1, ge=1)  # sampled configurations per cell
    search_seed: int = 0  # seeds the sampler: the same file samples the same trials
    seeds: list[int] | None = None  # replicate each sampled configuration once per seed
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: cluster CPUs/GPUs // one trial's
    target_top1: float | None = Field(None, gt=0, le=1)  # report: epochs to reach this val top-1
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    space: dict[str, SpaceSpec] = Field(default_factory=dict)
    architectures: list[ArchitectureSpec] = Field(min_length=1)


@dataclass
class Cell:
    """One architecture x norm x grid-value combination: fixed values and the keys sampled on top."""

    values: dict[str, Any]  # dotted config key -> value
    space: dict[str, SpaceSpec]  # dotted config key -> sampled domain
    norm: str


@dataclass
class Sweep:
    """A validated sweep: the base experiment config, the tune section and its cells."""

    base: config.ExperimentConfig
    tune: TuneSpec
    cells: list[Cell]

    @property
    def name(self) -> str:
        return self.base.name

    def trial_config(self, values: dict[str, Any], *, seed: int, name: str) -> config.ExperimentConfig:
        """The resolved config of one trial: base, then the cell's and sampled values, then seed and name."""
        raw = self.base.model_dump(mode="json")
        raw["model"]["kwargs"] = {}  # an architecture's kwargs come from its entry, not from the base model
        for key, value in {**values, "seed": seed, "name": name}.items():
            set_dotted(raw, key, value)
        return config.from_dict(raw)


def is_kn(norm: str) -> bool:
    """KernelNorm variants are named "kn" or "kn_<variant>" by the model registry."""
    return norm == "kn" or norm.startswith("kn_")


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw["a"]["b"]["c"] = value for key "a.b.c", creating sections as needed."""
    *parents, leaf = key.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def _describe(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key {loc!r}; see TuneSpec in kn_dist/tune.py"
    return f"{where}: {loc or 'tune'}: {first['msg']}"


def _check_keys(where: str, space: dict[str, SpaceSpec], *, kn_only: bool) -> None:
    for key, entry in space.items():
        fixed = [f"{p.rstrip('.')} is fixed per sweep" for p in _FIXED_PREFIXES if key.startswith(p)]
        why = _FIXED.get(key) or (fixed[0] if fixed else None)
        if why:
            raise UserError(f"{where}: {key!r} cannot be searched: {why}")
        if kn_only and not key.startswith("model.kwargs."):
            raise UserError(f"{where}: {key!r} is not a model.kwargs.* key; KernelNorm-only keys are model arguments")
        if entry.form == "grid" and where.endswith("kn_space"):
            raise UserError(f"{where}: {key!r} is a grid; use choice, so the baseline keeps the same number of trials")


def _cells(spec: TuneSpec) -> list[Cell]:
    from kn_dist.models import model_info

    _check_keys("tune.space", spec.space, kn_only=False)
    grid = {k: s.grid for k, s in spec.space.items() if s.form == "grid"}
    shared = {k: s for k, s in spec.space.items() if s.form != "grid"}
    cells = []
    for i, arch in enumerate(spec.architectures):
        where = f"tune.architectures[{i}] ({arch.model})"
        try:
            info = model_info(arch.model)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
        norms = arch.norms or [info.default_norm] + (["kn"] if "kn" in info.norms and info.default_norm != "kn" else [])
        for norm in norms:
            if norm not in info.norms:
                raise UserError(f"{where}: norm {norm!r} is not supported; valid norms are {', '.join(info.norms)}")
        _check_keys(f"{where}.space", arch.space, kn_only=False)
        _check_keys(f"{where}.kn_space", arch.kn_space, kn_only=True)
        if any(s.form == "grid" for s in arch.space.values()):
            raise UserError(f"{where}.space: grids belong in tune.space (shared by every architecture)")
        fixed = {"model.name": arch.model, **{f"model.kwargs.{k}": v for k, v in arch.kwargs.items()}}
        for norm, combo in itertools.product(norms, itertools.product(*grid.values())):
            space = {**shared, **arch.space, **(arch.kn_space if is_kn(norm) else {})}
            values = {**fixed, "model.norm": norm, **dict(zip(grid, combo, strict=True))}
            cells.append(Cell(values=values, space=space, norm=norm))
    return cells


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep YAML; `tune.*` overrides go to the tune section, all others to the base config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"sweep file {str(path)!r} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tune"), dict):
        raise UserError(f"sweep file {str(path)!r} needs a `tune:` section next to the experiment config")
    tune_raw = {"tune": raw.pop("tune")}
    tune_over = [o for o in overrides or [] if o.startswith("tune.")]
    base = config.from_dict(config.apply_overrides(raw, [o for o in overrides or [] if not o.startswith("tune.")]))
    try:
        spec = TuneSpec.model_validate(config.apply_overrides(tune_raw, tune_over)["tune"])
    except ValidationError as err:
        raise UserError(_describe(err, f"sweep file {str(path)!r}")) from None
    max_t = base.epochs  # a trial's full budget; ASHA's rungs are below it
    if spec.scheduler.grace_period > max_t:
        grace = spec.scheduler.grace_period
        raise UserError(f"tune.scheduler.grace_period={grace} exceeds the budget of {max_t} epochs")
    return Sweep(base=base, tune=spec, cells=_cells(spec))


def validate_sweep(sweep: Sweep) -> None:
    """Check every combination before any trial starts: each key/value against the config schema, and
    the geometry of every (model, norm, model.kwargs) combination at the data's image size.
    An impossible value is a UserError naming the combination."""
    num_classes = sweep.base.model.num_classes or _num_classes(sweep.base)
    for cell in sweep.cells:
        # Keys outside model.* cannot break geometry: check each probe value alone against the schema.
        for key, spec in cell.space.items():
            if not key.startswith("model."):
                for value in spec.probes():
                    sweep.trial_config({**cell.values, key: value}, seed=0, name="probe")
        model_keys = [k for k in cell.space if k.startswith("model.")]
        for combo in itertools.product(*(cell.space[k].probes() for k in model_keys)):
            values = {**cell.values, **dict(zip(model_keys, combo, strict=True))}
            cfg = sweep.trial_config(values, seed=0, name="probe")
            error = _geometry_error(cfg, num_classes)
            if error:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise UserError(f"sweep {sweep.name!r}: the combination {shown} cannot be built: {error}")


def _geometry_error(cfg: config.ExperimentConfig, num_classes: int) -> str | None:
    """None if the model builds and takes a (1, 3, S, S) input, else the first line of the error.

    Cheap first: the registry's meta-device trace (no memory, no init). Some ops have no meta kernel,
    so a failure there is confirmed with a real CPU forward before it is reported.
    """
    import torch

    from kn_dist.models import create_model
    from kn_dist.models._registry import check_geometry

    build = functools.partial(create_model, cfg.model.name, cfg.model.norm, num_classes, **cfg.model.kwargs)
    try:
        check_geometry(build, cfg.data.image_size, cfg.model.name)
        return None
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        pass
    try:
        with torch.no_grad():
            build().eval()(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
    except (ValueError, TypeError, RuntimeError) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def _num_classes(cfg: config.ExperimentConfig) -> int:
    from kn_dist.data import dataset_info

    return dataset_info(cfg.data.dataset)["num_classes"] or 10  # imagefolder: the head size is not geometry


# ---------------------------------------------------------------------------------------------------
# search: the grid cells in turn, one sampler per cell


def _plan(sweep: Sweep) -> list[tuple[int, int, int]]:
    """(cell, sample, replicate) of every trial, sample-major so early trials cover every cell."""
    reps = len(sweep.tune.seeds or [0])
    return [(c, s, r) for s in range(sweep.tune.num_samples) for c in range(len(sweep.cells)) for r in range(reps)]


def _make_searcher(sweep: Sweep) -> Any:
    """A Ray Tune Searcher that walks the cells round-robin and samples each cell's own space.

    Ray's Optuna integration refuses grid_search keys, and KernelNorm keys must not reach baseline
    cells (the models refuse kn_* arguments for other norms), so each cell gets its own sampler:
    seeded random sampling, or one Optuna TPE study per cell (a cell's best lr is its own).
    """
    import numpy as np
    from ray.tune.search import Searcher

    class CellSearcher(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=sweep.tune.metric, mode=sweep.tune.mode)
            self.plan = _plan(sweep)
            self.next = 0
            self.sampled: dict[tuple[int, int], dict[str, Any]] = {}  # (cell, sample) -> values
            self.optuna_trials: dict[str, int] = {}  # tune trial id -> cell whose study suggested it
            self.studies: dict[int, Any] = {}

        def _study(self, cell: int) -> Any:
            if cell not in self.studies:
                import optuna
                from ray.tune.search.optuna import OptunaSearch

                space = {k: s.domain() for k, s in sweep.cells[cell].space.items()}
                sampler = optuna.samplers.TPESampler(seed=sweep.tune.search_seed + cell)
                self.studies[cell] = OptunaSearch(space, metric=self.metric, mode=self.mode, sampler=sampler)
            return self.studies[cell]

        def suggest(self, trial_id: str) -> dict | str | None:
            if self.next >= len(self.plan):
                return Searcher.FINISHED
            index, (cell, sample, rep) = self.next, self.plan[self.next]
            space = sweep.cells[cell].space
            if (cell, sample) not in self.sampled:
                if not space:
                    values = {}
                elif sweep.tune.search == "optuna":
                    values = self._study(cell).suggest(trial_id)
                    if values is None:
                        return None  # Optuna is waiting for results; Tune asks again later
                    self.optuna_trials[trial_id] = cell
                else:
                    rng = np.random.default_rng([sweep.tune.search_seed, cell, sample])
                    values = {k: s.domain().sample(random_state=rng) for k, s in space.items()}
                self.sampled[(cell, sample)] = {k: _plain(v) for k, v in values.items()}
            self.next += 1
            seed = sweep.tune.seeds[rep] if sweep.tune.seeds else sweep.base.seed + index
            return {**sweep.cells[cell].values, **self.sampled[(cell, sample)], "seed": seed}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self.optuna_trials:
                self._study(self.optuna_trials[trial_id]).on_trial_complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as f:
                pickle.dump({k: v for k, v in self.__dict__.items() if k in _STATE}, f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                self.__dict__.update(pickle.load(f))

    return CellSearcher()


_STATE = ("next", "sampled", "optuna_trials", "studies")


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, so configs and YAML hold plain values."""
    return value.item() if hasattr(value, "item") else value


# ---------------------------------------------------------------------------------------------------
# the trial: a driver function that builds and fits one TorchTrainer


def _run_trial(trial: dict[str, Any], *, sweep: Sweep, parent_run_id: str, storage: str) -> None:
    """Tune trainable. Runs in a Tune actor: trial ids come from ray.tune.get_context()
    (ray.train.get_context() raises here, DESIGN.md §7); metrics reach Tune through TuneReportCallback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from kn_dist.trainer import build_torch_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    values = {k: v for k, v in trial.items() if k != "seed"}
    cfg = sweep.trial_config(values, seed=trial["seed"], name=f"{sweep.name}-{trial_id}")
    trainer = build_torch_trainer(
        cfg,
        run_name=cfg.name,  # stable per trial: a restarted trial resumes from its own checkpoints
        storage_path=storage,
        extra_loop_config={"mlflow_parent_run_id": parent_run_id, "trial_id": trial_id, "sweep": sweep.name},
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def reap_orphaned_placement_groups() -> int:
    """Remove worker placement groups whose creating actor has died; returns how many.

    When ASHA stops a trial, Tune kills the trial's actor and with it the TorchTrainer's controller
    while its workers' placement group is still reserved. Ray scopes such a group to the job, not
    to the dead controller, and Ray Train's own PlacementGroupCleaner asks the state API, which
    needs the dashboard (ray[default], not installed here) — so the CPUs stayed reserved and the
    next trial waited forever. Groups made by the driver itself (Tune's trial groups: no creator
    actor) and detached ones are left alone. Uses Ray's GCS table directly (ray 2.60).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed, table = 0, gcs_pb2.PlacementGroupTableData
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        if by_actor and pg.creator_actor_dead and not pg.is_detached and pg.state != table.REMOVED:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


def _reaper_callback() -> Any:
    """A Tune callback (on the driver) that reaps orphaned worker placement groups every few seconds."""
    import time

    from ray import tune

    class ReapOrphanedPlacementGroups(tune.Callback):
        def __init__(self) -> None:
            self.last = 0.0

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() - self.last > 2.0:
                self.last = time.monotonic()
                reap_orphaned_placement_groups()

    return ReapOrphanedPlacementGroups()


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else str(Path(root).resolve().joinpath(*parts))


def max_concurrent_trials(sweep: Sweep, resources: dict[str, float]) -> int:
    """How many trials fit the cluster at once: its CPUs (and GPUs) divided by one trial's workers'.

    One trial per GPU set also keeps early-stopped trials' GPU memory from piling up (DESIGN.md §7).
    """
    if sweep.tune.max_concurrent_trials is not None:
        return sweep.tune.max_concurrent_trials
    s = sweep.base.scaling
    fits = [int(resources.get("CPU", 0) // (s.num_workers * s.cpus_per_worker))]
    if s.use_gpu and s.gpus_per_worker > 0:
        fits.append(int(resources.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)))
    if min(fits) < 1:
        print(
            f"kn-dist: the cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) cannot "
            f"hold one trial yet ({s.num_workers} workers); trials wait for the autoscaler"
        )
    return max(1, min(fits))


def _parent_run(sweep: Sweep, *, resume: bool) -> str:
    """The sweep's MLflow parent run, created here on the driver (Ray's MLflowLoggerCallback would make
    flat runs, DESIGN.md §7); trials nest under it. `resume` reuses the sweep's existing parent."""
    from kn_dist import tracking

    client, experiment = tracking.client(sweep.base.tracking.uri), sweep.base.tracking.experiment
    run_key = f"sweep:{sweep.name}"
    run_id = tracking.find_run(client, experiment, run_key) if resume else None
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = tracking.run_tags(sweep.base, norm="-", run_key=run_key, kind="sweep", sweep=sweep.name)
    for key in ("kn_dist.model", "kn_dist.norm"):  # a sweep spans models and norms; its trials carry them
        tags.pop(key)
    run_id = tracking.create_run(client, experiment, sweep.base, tags)
    tune = sweep.tune.model_dump(mode="json")
    for key, value in tune.items():  # `tune.*` params beside the base config's; report.py reads target_top1
        client.log_param(run_id, f"tune.{key}", str(value)[:6000])  # MLflow's limit on a param value
    return run_id


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default spells out the whole config


def _close_runs(sweep: Sweep, parent_run_id: str, *, ok: bool, finished: bool) -> None:
    """End the parent run, and mark trials that ASHA stopped (their workers were killed mid-run, so they
    could not end their own MLflow runs) as KILLED rather than leaving them RUNNING forever."""
    from kn_dist import tracking

    client = tracking.client(sweep.base.tracking.uri)
    experiment = client.get_experiment_by_name(sweep.base.tracking.experiment)
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    if finished:  # an interrupted sweep leaves its unfinished trials RUNNING: --resume continues them
        for run in children:
            tracking.finish(client, run.info.run_id, status="KILLED")
    tracking.finish(client, parent_run_id, ok=ok)


def _prepare(sweep: Sweep) -> None:
    """Resolve the base config once on the driver, as `kn-dist train` does (kn_dist.trainer.prepare_config):
    dataset written/checked, paths and tracking URI absolute (workers run elsewhere), num_classes set."""
    from kn_dist.trainer import prepare_config

    first = sweep.trial_config(sweep.cells[0].values, seed=sweep.base.seed, name=sweep.name)
    resolved = prepare_config(first)
    base = sweep.base
    base.data.root, base.data.train_path, base.data.val_path = (
        resolved.data.root,
        resolved.data.train_path,
        resolved.data.val_path,
    )
    base.model.num_classes = resolved.model.num_classes
    base.checkpoint.storage_path = resolved.checkpoint.storage_path
    base.tracking.uri = resolved.tracking.uri


def _scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    sched = sweep.tune.scheduler
    if sched.name == "fifo":
        return FIFOScheduler()

    class ASHA(ASHAScheduler):
        """ASHA that lets a trial finish its last epoch by itself: ASHA stops every trial at max_t,
        and being killed there would cost the worker its final MLflow artifacts (config, weights)."""

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE if result.get("epoch", 0) >= self._max_t else decision

    return ASHA(
        time_attr="epoch",  # reported by the worker: still right after a trial resumes mid-way
        max_t=sweep.base.epochs,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )


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
    from ray import tune

    from kn_dist import tracking
    from kn_dist.trainer import init_ray

    sweep = load_sweep(path, overrides)
    if tracking_uri is not None:
        sweep.base.tracking.uri = tracking_uri
    validate_sweep(sweep)
    _prepare(sweep)
    uri = sweep.base.tracking.uri
    tracking.check_reachable(uri)

    storage = sweep.base.checkpoint.storage_path
    experiment_dir = _join(storage, sweep.name)
    restorable = tune.Tuner.can_restore(experiment_dir)
    if resume and not restorable:
        raise UserError(f"--resume: no interrupted sweep {sweep.name!r} at {experiment_dir}")
    if not resume and restorable:
        raise UserError(
            f"sweep {sweep.name!r} already exists at {experiment_dir}; pass --resume to continue it, "
            "or give it another name (name=...)"
        )
    parent_run_id = _parent_run(sweep, resume=resume)
    print(
        f"[kn-dist] {'resuming' if resume else 'starting'} sweep {sweep.name!r}: {len(_plan(sweep))} trials over "
        f"{len(sweep.cells)} cells; MLflow parent run {parent_run_id} in experiment "
        f"{sweep.base.tracking.experiment!r} at {uri}",
        flush=True,
    )

    started = init_ray(address)
    trainable = tune.with_parameters(
        _run_trial, sweep=sweep, parent_run_id=parent_run_id, storage=_join(storage, f"{sweep.name}-trials")
    )
    # The driver function only waits on its TorchTrainer (whose controller takes no CPU either); the
    # workers hold the CPUs/GPUs and max_concurrent_trials keeps trials from oversubscribing. Tune's
    # default of 1 CPU per trial would leave 2-worker trials unschedulable on a 2-CPU machine, and an
    # all-zero request is refused, so the driver asks for one byte of memory instead.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 1})
    ok = finished = False
    try:
        if resume:
            tuner = tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=sweep.tune.metric,
                    mode=sweep.tune.mode,
                    search_alg=_make_searcher(sweep),
                    scheduler=_scheduler(sweep),
                    num_samples=len(_plan(sweep)),
                    max_concurrent_trials=max_concurrent_trials(sweep, ray.cluster_resources()),
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=sweep.name, storage_path=storage, verbose=1, callbacks=[_reaper_callback()]
                ),
            )
        results = tuner.fit()
        ok, finished = not results.errors, True
        print(
            f"[kn-dist] sweep {sweep.name!r} done: {len(results)} trials, {len(results.errors)} failed. Best per "
            f"(model, norm): kn-dist best --experiment {sweep.base.tracking.experiment} --tracking-uri {uri}",
            flush=True,
        )
        return results
    finally:
        _close_runs(sweep, parent_run_id, ok=ok, finished=finished)
        if started:
            ray.shutdown()
