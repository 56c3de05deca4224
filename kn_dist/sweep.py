"""The sweep model: what a sweep file says, checked and expanded into cells, with no Ray import.

A sweep file is an experiment config (kn_dist/config.py) plus a `tune:` section:

    tune:
      search: random            # or optuna (TPE)
      num_samples: 2            # sampled configurations per cell (architecture x norm x grid values)
      scheduler: {name: halving, grace_period: 1, reduction_factor: 3}   # or fifo, or asha (not in studies)
      space:                    # every trial; `grid` keys multiply the cells
        optim.lr: {loguniform: [0.01, 0.2]}
      architectures:
        - model: vit_cifar
          kwargs: {input_size: 16}          # fixed model arguments, every norm
          norms: [ln, kn]                   # default: the published norm and "kn"
          kn_space:                         # KernelNorm cells only: baselines refuse kn_* arguments
            model.kwargs.kn_kernel_size: {choice: [2, 4]}

Every cell gets `num_samples` trials, so a baseline norm gets exactly the budget of KernelNorm
(DESIGN.md §8). Draws are paired: with random search the i-th sample of every shared key (tune.space,
an architecture's space) is the same value for every norm of that architecture, and so is the i-th
sample's seed; KernelNorm-only keys come from a stream of their own, so adding one changes no shared
value. kn_dist.tune runs a Sweep on Ray Tune; kn_dist.sweep_progress decides which trial segments run
(successive halving per cell); kn_dist.study adds selection and finals.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kn_dist import config
from kn_dist.config import is_kn  # noqa: F401  (part of the sweep model's API)
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
_FIXED_PREFIXES += ("data.val_path", "data.test_path", "data.val_fraction", "data.source_dir", "data.image_size")


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
    """How trials are cut short. `halving`: synchronous successive halving per cell (kn_dist.sweep_progress):
    at each rung (grace_period x reduction_factor^k epochs) a cell keeps its best floor(n / reduction_factor)
    configurations (at least one), so every cell ends with the same number of full-budget trials.
    `fifo`: every trial runs its full budget. `asha`: Ray Tune's asynchronous ASHA over all cells together,
    for exploratory `kn-dist tune` sweeps only (cells end with unequal budgets; studies refuse it)."""

    name: Literal["halving", "asha", "fifo"] = "halving"
    grace_period: int = Field(1, ge=1)  # epochs before a trial may be stopped
    reduction_factor: float = Field(3.0, gt=1)  # keep the top 1/reduction_factor at each rung


class TuneSpec(_Strict):
    metric: Literal["val_top1", "val_loss"] = "val_top1"
    mode: Literal["max", "min"] = "max"
    search: Literal["random", "optuna"] = "random"
    num_samples: int = Field(1, ge=1)  # sampled configurations per cell
    search_seed: int = 0  # seeds the sampler: the same file samples the same trials
    seeds: list[int] | None = None  # replicate each sampled configuration once per seed
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: what the cluster can grow to (kn_dist.tune)
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
    group: int = 0  # cells of one architecture and grid combination share their draws (paired draws)
    kn_keys: frozenset[str] = frozenset()  # keys of `space` that only KernelNorm cells sample

    @property
    def label(self) -> str:
        """model/norm: how a study names the cell."""
        return f"{self.values['model.name']}/{self.norm}"


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
        return f"{where}: unknown key {loc!r}; see TuneSpec in kn_dist/sweep.py"
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
        combos = list(itertools.product(*grid.values()))
        for norm, (c, combo) in itertools.product(norms, enumerate(combos)):
            kn = arch.kn_space if is_kn(norm) else {}
            space = {**shared, **arch.space, **kn}
            values = {**fixed, "model.norm": norm, **dict(zip(grid, combo, strict=True))}
            group = i * len(combos) + c
            cells.append(Cell(values=values, space=space, norm=norm, group=group, kn_keys=frozenset(kn)))
    return cells


def load_sweep(path: str | Path, overrides: list[str] | None = None, *, raw: dict[str, Any] | None = None) -> Sweep:
    """Read a sweep YAML; `tune.*` overrides go to the tune section, all others to the base config.

    `raw` is the file's mapping already read (kn_dist.study reads it first and removes its `study:` section).
    """
    raw = dict(config.read_yaml(path, "sweep file") if raw is None else raw)
    if not isinstance(raw.get("tune"), dict):
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
    from kn_dist.prepare import model_build_error, num_classes_of

    num_classes = sweep.base.model.num_classes or num_classes_of(sweep.base.data.dataset)
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
            error = model_build_error(cfg, num_classes)
            if error:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise UserError(f"sweep {sweep.name!r}: the combination {shown} cannot be built: {error}")


# Streams of the paired random search: shared keys and KernelNorm-only keys never share generator words.
_SHARED_STREAM, _KN_STREAM = 0, 1


def _draw(spec: SpaceSpec, rng: Any) -> Any:
    """One value of `spec` (not a grid) from numpy Generator `rng`, as a plain Python number or choice."""
    if spec.form == "choice":
        return spec.choice[int(rng.integers(len(spec.choice)))]
    lo, hi = getattr(spec, spec.form)
    if spec.form == "uniform":
        return float(rng.uniform(lo, hi))
    if spec.form == "loguniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return int(rng.integers(lo, hi + 1))  # randint: both bounds inclusive


def sample_values(sweep: Sweep, cell: int, sample: int) -> dict[str, Any]:
    """The `sample`-th random draw of cell `cell`'s space: paired across the norms of its architecture.

    Shared keys come from a generator seeded by (search_seed, shared stream, cell group, sample) and are
    drawn in sorted key order, so every norm of a group gets the same values; KernelNorm-only keys from
    (search_seed, KernelNorm stream, group, sample).
    """
    import numpy as np

    spec = sweep.cells[cell]
    values: dict[str, Any] = {}
    for stream, keys in ((_SHARED_STREAM, set(spec.space) - spec.kn_keys), (_KN_STREAM, spec.kn_keys)):
        rng = np.random.default_rng([sweep.tune.search_seed, stream, spec.group, sample])
        values |= {key: _draw(spec.space[key], rng) for key in sorted(keys)}
    return values


def trial_seed(sweep: Sweep, sample: int, rep: int) -> int:
    """The training seed of a sweep trial: tune.seeds[rep], else base seed + sample. It does not depend on
    the cell, so the i-th sample of every norm sees the same data order and augmentation (paired)."""
    return sweep.tune.seeds[rep] if sweep.tune.seeds else sweep.base.seed + sample


def replicates(sweep: Sweep) -> int:
    """Trials per sampled configuration: one per tune.seeds entry, else one."""
    return len(sweep.tune.seeds or [0])


def trial_plan(sweep: Sweep) -> list[tuple[int, int, int]]:
    """(cell, sample, replicate) of every trial, sample-major so early trials cover every cell."""
    reps = replicates(sweep)
    return [(c, s, r) for s in range(sweep.tune.num_samples) for c in range(len(sweep.cells)) for r in range(reps)]
