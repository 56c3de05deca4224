"""`kn-dist study FILE`: the whole protocol of DESIGN.md §8, from one YAML, into one MLflow parent run.

A study file is a sweep file (kn_dist.sweep) plus a `study:` section:

    study:
      seeds: 3                  # final runs per cell: an int n (seeds 0..n-1) or a list of seeds
      select_epoch: last        # a trial's score: its last val top-1, or its best epoch's ("best")
      final_train_on: train     # or "train+val": finals train on both (their val figures then mean little)

(a) the sweep, as `kn-dist tune` runs it, with paired draws (random search) and equal budgets per cell
    (scheduler halving or fifo: kn_dist.sweep_progress);
(b) per cell, the configuration with the best mean val score over its replicates among those that ran the
    full budget, the cells' full-budget counts checked equal (kn_dist.study_selection), pinned on the study run;
(c) finals: that configuration once per study seed s, trained with a seed from the finals' own stream
    (final_seed: never a trial's seed, so a final never replays a trial; the same for every norm, so seed s
    gives every norm the same data order and augmentation), evaluated once on the test split;
(d) the report (kn_dist.study_report).
The sweep run and the final runs nest under the study run, which holds the report and per-cell metrics.
`--resume` continues a killed study: finished trials and finals are kept, finals are keyed by (cell, seed),
and `study.seeds` may grow (3 -> 5 runs only seeds 3 and 4); any other change to the study is refused.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kn_dist import config, tracking
from kn_dist.config import ExperimentConfig
from kn_dist.errors import UserError
from kn_dist.runtime import init_ray, say
from kn_dist.study_answer import SeedPolicy, seed_looks
from kn_dist.study_selection import (
    Selected,
    check_unchanged,
    pin_or_check_selection,
    select_configurations,
    study_params,
)
from kn_dist.sweep import Sweep, load_sweep
from kn_dist.worker import LoopConfig

STUDY_TAG, CELL_TAG, SEED_TAG = "kn_dist.study", "kn_dist.cell", "kn_dist.seed"
SEEDS_TAG = "kn_dist.study_seeds"  # the study seeds of the latest look (JSON list): they may grow on --resume
SEED_PLAN_TAG = "kn_dist.seed_plan"  # a seed policy (JSON) is fixed once the study starts; null for fixed seeds
LOOKS_TAG = "kn_dist.seed_looks"  # planned looks: each verdict is judged at alpha / looks
FINAL_PASSES_TAG = "kn_dist.final_passes"


class StudySpec(BaseModel):
    """The `study:` section."""

    model_config = ConfigDict(extra="forbid")

    # n (seeds 0..n-1), a list, or a policy {min, max, batch}; ≥ 3 for an answer, 5 for a claim (DESIGN.md §8)
    seeds: int | list[int] | SeedPolicy = 3
    select_epoch: Literal["last", "best"] = "last"
    final_train_on: Literal["train", "train+val"] = "train"
    alpha: float = Field(0.05, gt=0, lt=1)  # family-wise error of the report's verdicts (Holm)
    delta: float = Field(0.5, gt=0)  # equivalence margin in test top-1 points (TOST)

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, value: int | list[int] | SeedPolicy) -> int | list[int] | SeedPolicy:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"seeds={value} must be at least 1 (3 or more for a confidence interval)")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError(f"seeds={value} must be a non-empty list of distinct seeds")
        return value

    def seeds_at(self, look: int) -> list[int]:
        """The study seeds of look `look` (0-based) of seed_looks."""
        if isinstance(self.seeds, list):
            return list(self.seeds)
        return list(range(seed_looks(self.seeds)[look]))

    @property
    def seed_list(self) -> list[int]:
        """Every seed the study may run (a policy: up to its max)."""
        return self.seeds_at(len(seed_looks(self.seeds)) - 1)


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
    where = f"study file {str(path)!r}"
    if sweep.tune.search != "random":
        raise UserError(
            f"{where}: tune.search={sweep.tune.search} adapts each norm's draws to its own results, so the norms "
            "would not be offered the same values (paired draws, DESIGN.md §8); use search: random"
        )
    if sweep.tune.scheduler.name == "asha":
        raise UserError(
            f"{where}: tune.scheduler asha ranks all cells together and ends them with unequal full-budget counts; "
            "use halving (the same successive halving, per cell) or fifo"
        )
    return Study(name=sweep.name, spec=spec, sweep=sweep, path=path)


# ---------------------------------------------------------------------------------------------------
# finals

FINAL_SEED_STREAM = 0x46494E41  # "FINA": the finals' seeds never come from the trials' sequence


def final_seed(base_seed: int, seed: int) -> int:
    """The training seed of study seed `seed`: a 31-bit draw of its own stream, the same for every cell."""
    import numpy as np

    return int(np.random.SeedSequence([FINAL_SEED_STREAM, base_seed % 2**32, seed]).generate_state(1)[0] >> 1)


def final_loops(study: Study, selected: list[Selected], study_run_id: str, seeds: list[int]) -> dict[str, LoopConfig]:
    """One loop per (cell, study seed), keyed by its run key: the selected config, evaluated on test at its end."""
    loops = {}
    train_path = _train_plus_val_path(study) if study.spec.final_train_on == "train+val" else None
    for choice in selected:
        for seed in seeds:
            raw = choice.config.model_dump(mode="json")
            raw["seed"] = final_seed(study.base.seed, seed)
            raw["name"] = f"{study.name}-final-{choice.model}-{choice.norm.replace('+', '_')}-s{seed}"
            raw["tracking"] = study.base.tracking.model_dump(mode="json")
            if train_path is not None:
                raw["data"]["train_path"] = train_path
            cfg = config.from_dict(raw)
            tags = {
                STUDY_TAG: study.name,
                CELL_TAG: choice.cell,
                SEED_TAG: str(seed),
                "kn_dist.train_seed": str(cfg.seed),
                "kn_dist.selected_trial": choice.candidate,
                "kn_dist.final_train_on": study.spec.final_train_on,
            }
            key = f"final:{study.name}:{choice.cell}:{seed}"
            loops[key] = LoopConfig(
                config=cfg,
                run_key=key,
                kind="final",
                mlflow_parent_run_id=study_run_id,
                tags=tags,
                evaluate_test=True,
            )
    return loops


def check_no_replay(client: Any, study: Study, sweep_run_id: str, loops: dict[str, LoopConfig]) -> None:
    """Refuse finals that would retrain a sweep trial: the same cell, seed and sampled values."""
    from kn_dist.config import to_flat_dict

    trials: dict[str, list[dict[str, str]]] = {}
    for run in tracking.child_runs(client, study.base.tracking.experiment, sweep_run_id):
        if run.data.tags.get("kn_dist.kind") == "trial":
            cell = f"{run.data.tags['kn_dist.model']}/{run.data.tags['kn_dist.norm']}"
            trials.setdefault(cell, []).append(run.data.params)
    searched = {k for c in study.sweep.cells for k in c.space} | {"seed"}
    for loop in loops.values():
        final = {k: str(v) for k, v in to_flat_dict(loop.config).items() if k in searched}
        for params in trials.get(loop.tags[CELL_TAG], []):
            if all(params.get(k) == v for k, v in final.items()):
                raise UserError(
                    f"study {study.name!r}: final {loop.config.name} would replay a sweep trial (cell "
                    f"{loop.tags[CELL_TAG]}, seed {loop.config.seed}, the same values); choose other study.seeds"
                )


def _train_plus_val_path(study: Study) -> str:
    from kn_dist.data import write_train_plus_val

    d = study.base.data
    out = Path(d.train_path).parent
    return str(write_train_plus_val(d.dataset, out, source_dir=d.source_dir, image_size=d.image_size))


def final_loop(trial: dict[str, Any], trial_id: str, *, loops: dict[str, LoopConfig]) -> LoopConfig:
    """The Tune trial of a final run is its run key in the study's finals."""
    return loops[trial["final"]]


def finished_finals(client: Any, study: Study) -> set[str]:
    """Run keys of the study's finals that FINISHED with their test figure."""
    exp = client.get_experiment_by_name(study.base.tracking.experiment)
    where = f"tags.`{STUDY_TAG}` = '{study.name}' and tags.`kn_dist.kind` = 'final' and attributes.status = 'FINISHED'"
    runs = client.search_runs([exp.experiment_id], where, max_results=5000) if exp else []
    return {r.data.tags[tracking.RUN_KEY_TAG] for r in runs if "test_top1" in r.data.metrics}


def fit_finals(study: Study, loops: dict[str, LoopConfig], study_run_id: str) -> None:
    """Run `loops` as one FIFO Tune run (a pass): each once, as many at once as fit. A final killed earlier
    continues from its checkpoint under <storage>/<study>-finals-runs."""
    import ray
    from ray import tune

    from kn_dist import ray_compat
    from kn_dist.tune import concurrency_limit, storage_join, tune_run_config
    from kn_dist.tune_trial import loop_trainable

    base = study.base
    client = tracking.client(base.tracking.uri)
    passes = int(client.get_run(study_run_id).data.tags.get(FINAL_PASSES_TAG, "0")) + 1
    client.set_tag(study_run_id, FINAL_PASSES_TAG, str(passes))
    runs = storage_join(base.checkpoint.storage_path, f"{study.name}-finals-runs")
    trainable = loop_trainable(functools.partial(final_loop, loops=loops), base.scaling, runs)
    limit, _ = concurrency_limit(study.sweep, ray.cluster_resources(), ray_compat.autoscaler_max_resources())
    tuner = tune.Tuner(
        trainable,
        param_space={"final": tune.grid_search(sorted(loops))},
        tune_config=tune.TuneConfig(max_concurrent_trials=min(limit, len(loops)), reuse_actors=False),
        run_config=tune_run_config(f"{study.name}-finals-pass{passes}", base),
    )
    results = tuner.fit()
    if results.errors:
        raise UserError(
            f"study {study.name!r}: {len(results.errors)} final run(s) failed after checkpoint.max_failures="
            f"{base.checkpoint.max_failures} retries ({results.errors[0]}".splitlines()[0]
            + "); fix the cause and run the study again with --resume: finished finals are kept"
        )


def run_finals(client: Any, study: Study, selected: list[Selected], study_run_id: str, sweep_run_id: str) -> list[int]:
    """(c) the finals, look by look of the seed plan: a policy stops at the first look where every
    comparison is decided. Returns the study seeds the answer rests on."""
    from kn_dist.study_report import answer

    looks = seed_looks(study.spec.seeds)
    for look, count in enumerate(looks):
        seeds = study.spec.seeds_at(look)
        client.set_tag(study_run_id, SEEDS_TAG, json.dumps(seeds))
        loops = final_loops(study, selected, study_run_id, seeds)
        check_no_replay(client, study, sweep_run_id, loops)
        todo = {k: v for k, v in loops.items() if k not in finished_finals(client, study)}
        where = f"look {look + 1} of {len(looks)}: " if len(looks) > 1 else ""
        say(
            f"(c) finals, {where}{len(loops)} runs ({len(selected)} cells x {count} seeds), "
            f"{len(todo)} to run, test once each"
        )
        if todo:
            fit_finals(study, todo, study_run_id)
        if look + 1 < len(looks):
            comparisons = answer(client, study, study_run_id, selected, seeds)
            undecided = [f"{c.model} {c.kn} vs {c.base}" for c in comparisons if c.verdict == "inconclusive"]
            if not undecided:
                say(f"(c) every comparison is decided at {count} seeds; no more seed rounds")
                return seeds
            say(f"(c) undecided at {count} seeds: {', '.join(undecided)}; adding seeds")
    return seeds


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
    seeds = study.spec.model_dump(mode="json")["seeds"]
    plan = seeds if isinstance(seeds, dict) else None  # fixed seeds may grow; a policy may not change
    if run_id is not None:
        check_unchanged(client, study, run_id)
        pinned = client.get_run(run_id).data.tags.get(SEED_PLAN_TAG)
        if pinned is not None and json.loads(pinned) != plan:
            raise UserError(
                f"study {study.name!r}: study.seeds {json.dumps(seeds)} differs from the seed policy it started "
                f"with ({pinned}; null = fixed seeds); a policy's looks and their level are planned at the start"
            )
        tracking.mark_running(client, run_id)
    else:
        tags = tracking.run_tags(study.base, run_key=key, kind="study", extra={STUDY_TAG: study.name})
        run_id = tracking.create_run(client, experiment, study.base, tags)
        sections = {k: v for k, v in study_params(study).items() if k.startswith(("tune.", "study."))}
        tracking.log_text_params(client, run_id, sections)
    client.set_tag(run_id, SEED_PLAN_TAG, json.dumps(plan))
    client.set_tag(run_id, LOOKS_TAG, str(len(seed_looks(study.spec.seeds))))
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

    from kn_dist.study_report import write_study_report
    from kn_dist.tune import fit_sweep, open_sweep

    study = load_study(path, overrides)
    open_sweep(path, tracking_uri=tracking_uri, sweep=study.sweep)  # every check before any trial starts
    client = tracking.client(study.base.tracking.uri)
    study_run_id = _study_run(study, resume=resume)
    say(f"{'resuming' if resume else 'starting'} study {study.name!r}; MLflow study run {study_run_id}")
    started = init_ray(address, dashboard=study.base.scaling.num_workers > 1, worker_output=False)
    try:
        sweep_run_id = tracking.find_run(client, study.base.tracking.experiment, f"sweep:{study.sweep.name}")
        if sweep_run_id is None or client.get_run(sweep_run_id).info.status != "FINISHED":
            say("(a) the sweep: paired draws and equal budgets for every cell, scored on val")
            fit_sweep(study.sweep, resume=True, parent_run_id=study_run_id)
            sweep_run_id = tracking.find_run(client, study.base.tracking.experiment, f"sweep:{study.sweep.name}")
        selected = select_configurations(client, study, sweep_run_id)
        pin_or_check_selection(client, study, study_run_id, selected)
        for s in selected:
            say(
                f"(b) {s.cell}: configuration {s.candidate} (mean val {100 * s.score:.2f} %, best of "
                f"{s.full_budget} of {s.offered} configurations that ran the full budget)"
            )
        seeds = run_finals(client, study, selected, study_run_id, sweep_run_id)
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
    report = write_study_report(client, study, study_run_id, selected, seeds, out)
    tracking.finish(client, study_run_id)
    return report
