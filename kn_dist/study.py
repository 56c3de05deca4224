"""`kn-dist study FILE`: the whole protocol of DESIGN.md §8, from one YAML, into one MLflow parent run.

A study file is a sweep file (kn_dist.sweep) plus a `study:` section:

    study:
      seeds: 3                  # final runs per cell: an int n (seeds 0..n-1) or a list of seeds
      select_epoch: last        # a trial's score: its last val top-1, or its best epoch's ("best")
      final_train_on: train     # or "train+val": finals train on both (their val figures then mean little)

(a) the sweep, as `kn-dist tune` runs it: every (architecture, norm) cell gets the same trials and epochs;
(b) per cell, the configuration with the best val score among trials that ran their full budget;
(c) finals: that configuration once per seed, evaluated once on the test split after its last epoch;
(d) the report (kn_dist.study_report): mean ± sd and 95 % CI of test top-1 per cell, KernelNorm minus the
    published norm with Welch's 95 % CI and p-value, the cost, one sentence per architecture.
The sweep run and the final runs nest under the study run, which holds the report and per-cell metrics.
`--resume` continues a killed study: finished trials and finished final runs are not redone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from kn_dist import config, tracking
from kn_dist.config import ExperimentConfig
from kn_dist.errors import UserError
from kn_dist.runtime import init_ray, say
from kn_dist.sweep import Sweep, load_sweep
from kn_dist.worker import LoopConfig

STUDY_TAG, CELL_TAG, SEED_TAG = "kn_dist.study", "kn_dist.cell", "kn_dist.seed"


class StudySpec(BaseModel):
    """The `study:` section."""

    model_config = ConfigDict(extra="forbid")

    seeds: int | list[int] = 3  # ≥ 3 for an answer, 5 for a claim (DESIGN.md §8)
    select_epoch: Literal["last", "best"] = "last"
    final_train_on: Literal["train", "train+val"] = "train"

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"seeds={value} must be at least 1 (3 or more for a confidence interval)")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError(f"seeds={value} must be a non-empty list of distinct seeds")
        return value

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


@dataclass
class Study:
    name: str
    spec: StudySpec
    sweep: Sweep
    path: Path

    @property
    def base(self) -> ExperimentConfig:
        return self.sweep.base


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read a study file; `study.*` overrides go to the study section, the rest as in kn_dist.sweep."""
    path = Path(path)
    raw = config.read_yaml(path, "study file")
    if not isinstance(raw.get("study"), dict):
        raise UserError(f"study file {str(path)!r} needs a `study:` section (seeds, select_epoch, final_train_on)")
    study_raw = {"study": raw.pop("study")}
    mine = [o for o in overrides or [] if o.startswith("study.")]
    try:
        spec = StudySpec.model_validate(config.apply_overrides(study_raw, mine)["study"])
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise UserError(
                f"study file {str(path)!r}: unknown key 'study.{key}'; see StudySpec in kn_dist/study.py"
            ) from None
        msg = first["msg"].removeprefix("Value error, ")
        raise UserError(f"study file {str(path)!r}: study.{key}: {msg}") from None
    sweep = load_sweep(path, [o for o in overrides or [] if not o.startswith("study.")], raw=raw)
    return Study(name=sweep.name, spec=spec, sweep=sweep, path=path)


# ---------------------------------------------------------------------------------------------------
# selection


@dataclass(frozen=True)
class Selected:
    """The configuration a cell's finals retrain, and why it was chosen."""

    model: str
    norm: str
    run_id: str
    trial_id: str
    score: float  # val top-1 by select_epoch
    full_budget_trials: int
    config: ExperimentConfig

    @property
    def cell(self) -> str:
        return f"{self.model}/{self.norm}"


def select_configurations(client: Any, study: Study, sweep_run_id: str) -> list[Selected]:
    """Per cell, the trial with the best val score among trials that ran every epoch (FINISHED, all epochs logged).

    Ties go to the earlier trial. A cell without any full-budget trial is an error: its answer would rest
    on a configuration nobody trained to the end.
    """
    from kn_dist.report import run_config

    epochs = study.base.epochs
    trials = tracking.child_runs(client, study.base.tracking.experiment, sweep_run_id)
    by_cell: dict[tuple[str, str], list[tuple[float, int, Any]]] = {}
    for run in sorted(trials, key=lambda r: r.info.start_time):
        if run.data.tags.get("kn_dist.kind") != "trial" or run.info.status != "FINISHED":
            continue
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top1")}
        if sorted(history) != list(range(1, epochs + 1)):
            continue
        score = history[epochs] if study.spec.select_epoch == "last" else max(history.values())
        key = (run.data.tags["kn_dist.model"], run.data.tags["kn_dist.norm"])
        by_cell.setdefault(key, []).append((score, len(by_cell.get(key, [])), run))
    selected = []
    for cell in study.sweep.cells:
        key = (cell.values["model.name"], cell.norm)
        if key in {(s.model, s.norm) for s in selected}:
            continue
        candidates = by_cell.get(key, [])
        if not candidates:
            raise UserError(
                f"study {study.name!r}: cell {key[0]}/{key[1]} has no trial that ran all {epochs} epochs; "
                "raise tune.num_samples or lower the scheduler's reduction so at least one trial reaches max_t"
            )
        score, _, run = max(candidates, key=lambda c: (c[0], -c[1]))
        record = _record(run)
        selected.append(
            Selected(
                key[0],
                key[1],
                run.info.run_id,
                record.trial_id or "",
                score,
                len(candidates),
                run_config(client, record),
            )
        )
    return selected


def _record(run: Any) -> Any:
    from kn_dist.report import RunRecord

    tags = run.data.tags
    return RunRecord(
        run_id=run.info.run_id,
        model=tags["kn_dist.model"],
        norm=tags["kn_dist.norm"],
        params={k: v for k, v in run.data.params.items() if not k.startswith("derived.")},
        score=run.data.metrics.get("val_top1"),
        trial_id=tags.get("kn_dist.trial_id"),
    )


# ---------------------------------------------------------------------------------------------------
# finals


def final_loops(study: Study, selected: list[Selected], study_run_id: str) -> list[LoopConfig]:
    """One loop per (cell, seed): the selected config with that seed, evaluated on test at its end."""
    loops = []
    train_path = _train_plus_val_path(study) if study.spec.final_train_on == "train+val" else None
    for choice in selected:
        for seed in study.spec.seed_list:
            raw = choice.config.model_dump(mode="json")
            raw["seed"] = seed
            raw["name"] = f"{study.name}-final-{choice.model}-{choice.norm.replace('+', '_')}-s{seed}"
            raw["tracking"] = study.base.tracking.model_dump(mode="json")
            if train_path is not None:
                raw["data"]["train_path"] = train_path
            cfg = config.from_dict(raw)
            tags = {
                STUDY_TAG: study.name,
                CELL_TAG: choice.cell,
                SEED_TAG: str(seed),
                "kn_dist.selected_trial": choice.trial_id,
                "kn_dist.final_train_on": study.spec.final_train_on,
            }
            loops.append(
                LoopConfig(
                    config=cfg,
                    run_key=f"final:{study.name}:{choice.cell}:{seed}",
                    kind="final",
                    mlflow_parent_run_id=study_run_id,
                    tags=tags,
                    evaluate_test=True,
                )
            )
    return loops


def _train_plus_val_path(study: Study) -> str:
    from kn_dist.data import write_train_plus_val

    d = study.base.data
    out = Path(d.train_path).parent
    return str(write_train_plus_val(d.dataset, out, source_dir=d.source_dir, image_size=d.image_size))


def final_loop(trial: dict[str, Any], trial_id: str, *, loops: list[LoopConfig]) -> LoopConfig:
    """The Tune trial of a final run is just its index in the study's list of final loops."""
    return loops[trial["final"]].model_copy(update={"trial_id": trial_id})


def fit_finals(study: Study, loops: list[LoopConfig], *, resume: bool) -> Any:
    """Run (or restore) the finals as one FIFO Tune run: every loop once, as many at once as fit."""
    import ray
    from ray import tune

    from kn_dist import ray_compat
    from kn_dist.tune import concurrency_limit, loop_trainable, storage_join, tune_run_config

    name = f"{study.name}-finals"
    base = study.base
    folder = storage_join(base.checkpoint.storage_path, name)
    runs = storage_join(base.checkpoint.storage_path, f"{name}-runs")  # TorchTrainer finals' checkpoints
    trainable = loop_trainable(functools.partial(final_loop, loops=loops), base.scaling, runs)
    if resume and tune.Tuner.can_restore(folder):
        tuner = tune.Tuner.restore(folder, trainable, resume_unfinished=True, resume_errored=True)
    else:
        limit, _ = concurrency_limit(study.sweep, ray.cluster_resources(), ray_compat.autoscaler_max_resources())
        tuner = tune.Tuner(
            trainable,
            param_space={"final": tune.grid_search(list(range(len(loops))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=min(limit, len(loops)), reuse_actors=False),
            run_config=tune_run_config(name, base),
        )
    results = tuner.fit()
    if results.errors:
        raise UserError(
            f"study {study.name!r}: {len(results.errors)} final run(s) failed: {results.errors[0]}".splitlines()[0]
        )
    return results


# ---------------------------------------------------------------------------------------------------
# the protocol


def _study_run(study: Study, *, resume: bool) -> str:
    client, experiment = tracking.client(study.base.tracking.uri), study.base.tracking.experiment
    key = f"study:{study.name}"
    run_id = tracking.find_run(client, experiment, key)
    if run_id is not None and not resume:
        raise UserError(
            f"study {study.name!r} already exists in MLflow experiment {experiment!r}; pass --resume to finish it, "
            "or give it another name (name=...)"
        )
    if run_id is None and resume:
        raise UserError(f"--resume: no study {study.name!r} in MLflow experiment {experiment!r}")
    if run_id is not None:
        tracking.mark_running(client, run_id)
        return run_id
    tags = tracking.run_tags(study.base, run_key=key, kind="study", extra={STUDY_TAG: study.name})
    run_id = tracking.create_run(client, experiment, study.base, tags)
    sections = {f"study.{k}": v for k, v in study.spec.model_dump(mode="json").items()}
    sections |= {f"tune.{k}": v for k, v in study.sweep.tune.model_dump(mode="json").items()}
    tracking.log_text_params(client, run_id, sections)
    return run_id


def run_study(
    path: str | Path,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    report_dir: str | Path | None = None,
) -> Path:
    """`kn-dist study`: sweep, selection on val, finals on test, report; returns the report's path."""
    import ray
    from ray import tune

    from kn_dist.study_report import write_study_report
    from kn_dist.tune import fit_sweep, open_sweep, sweep_dir

    study = load_study(path, overrides)
    open_sweep(path, tracking_uri=tracking_uri, sweep=study.sweep)  # every check before any trial starts
    client = tracking.client(study.base.tracking.uri)
    study_run_id = _study_run(study, resume=resume)
    say(f"{'resuming' if resume else 'starting'} study {study.name!r}; MLflow study run {study_run_id}")
    started = init_ray(address, dashboard=study.base.scaling.num_workers > 1)
    try:
        sweep_run_id = tracking.find_run(client, study.base.tracking.experiment, f"sweep:{study.sweep.name}")
        if sweep_run_id is None or client.get_run(sweep_run_id).info.status != "FINISHED":
            say("(a) the sweep: the same trials and epochs for every cell, scored on val")
            fit_sweep(study.sweep, resume=tune.Tuner.can_restore(sweep_dir(study.sweep)), parent_run_id=study_run_id)
            sweep_run_id = tracking.find_run(client, study.base.tracking.experiment, f"sweep:{study.sweep.name}")
        selected = select_configurations(client, study, sweep_run_id)
        for s in selected:
            say(f"(b) {s.cell}: trial {s.trial_id} (val top-1 {100 * s.score:.2f} %, best of {s.full_budget_trials})")
            client.set_tag(study_run_id, f"kn_dist.selected.{s.cell.replace('+', '_')}", s.run_id)
        loops = final_loops(study, selected, study_run_id)
        say(
            f"(c) finals: {len(loops)} runs ({len(selected)} cells x {len(study.spec.seed_list)} seeds), test once each"
        )
        fit_finals(study, loops, resume=resume)
    except BaseException:
        try:
            tracking.finish(client, study_run_id, ok=False)
        except Exception as err:  # the study's own error is the one to show
            say(f"could not mark the study run FAILED ({type(err).__name__}: {err})")
        raise
    finally:
        if started:
            ray.shutdown()
    out = Path(report_dir) if report_dir is not None else Path("reports") / study.name
    report = write_study_report(client, study, study_run_id, selected, out)
    tracking.finish(client, study_run_id)
    return report
