"""A study's selection on val, read from the sweep's MLflow records, and what a resume may not change.

Selection (DESIGN.md §8): per cell (model/norm), among the configurations whose every replicate ran the
full budget, the one with the best mean val score over its replicates (tune.seeds); ties go to the earlier
sample. The cells must end the sweep with equal full-budget counts (kn_dist.sweep_progress makes them
equal by construction; a failed trial is what can break it), else the study stops and says how to fix it.
The selection is pinned on the study run (tag kn_dist.selection) and read back on every resume: a
selection that would come out differently is refused, as is a study file changed in anything but
`study.seeds`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from kn_dist import tracking
from kn_dist.config import ExperimentConfig, to_flat_dict
from kn_dist.errors import UserError
from kn_dist.sweep_progress import TrialKey, candidates_per_cell, full_budget_count
from kn_dist.tune_trial import TRIAL_KEY_TAG

SELECTION_TAG = "kn_dist.selection"  # JSON: cell -> {"candidate", "runs", "score"}
# Keys a resume may change: where things are, and how the runs execute, not what they compute.
RESUME_MAY_CHANGE = frozenset(
    {"tracking.uri", "checkpoint.storage_path", "checkpoint.every_epochs", "checkpoint.keep"}
    | {"checkpoint.max_failures", "data.root", "data.train_path", "data.val_path", "data.test_path"}
    | {"data.source_dir", "data.num_workers", "tune.max_concurrent_trials", "study.seeds"}
    | tracking.EXECUTION_ONLY
)


@dataclass(frozen=True)
class Selected:
    """The configuration a cell's finals retrain, and why it was chosen."""

    model: str
    norm: str
    candidate: str  # c<cell>s<sample>: the sampled configuration (all its replicates)
    run_ids: tuple[str, ...]  # the candidate's trial runs, one per replicate
    score: float  # mean val score over the replicates (select_epoch)
    full_budget: int  # the cell's configurations that ran every epoch
    offered: int  # the cell's configurations in the sweep
    config: ExperimentConfig

    @property
    def cell(self) -> str:
        return f"{self.model}/{self.norm}"


def _trial_score(client: Any, run: Any, study: Any) -> float | None:
    """The trial's val score by select_epoch, or None unless it FINISHED with every epoch logged."""
    epochs, metric = study.base.epochs, study.sweep.tune.metric
    if run.info.status != "FINISHED":
        return None
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
    if sorted(history) != list(range(1, epochs + 1)):
        return None
    if study.spec.select_epoch == "last":
        return history[epochs]
    return max(history.values()) if study.sweep.tune.mode == "max" else min(history.values())


def select_configurations(client: Any, study: Any, sweep_run_id: str) -> list[Selected]:
    """Per cell, the full-budget configuration with the best mean val score over its replicates."""
    from kn_dist.report import RunRecord, run_config

    sweep = study.sweep
    reps = len(sweep.tune.seeds or [0])
    # candidate (cell index, sample) -> replicate -> (score, run)
    found: dict[tuple[int, int], dict[int, tuple[float | None, Any]]] = {}
    for run in tracking.child_runs(client, study.base.tracking.experiment, sweep_run_id):
        name = run.data.tags.get(TRIAL_KEY_TAG)
        if run.data.tags.get("kn_dist.kind") == "trial" and name is not None:
            key = TrialKey.parse(name)
            found.setdefault(key.candidate, {})[key.rep] = (_trial_score(client, run, study), run)
    sign = 1.0 if sweep.tune.mode == "max" else -1.0
    offered, expected = candidates_per_cell(sweep), full_budget_count(sweep)
    by_label: dict[str, list[tuple[float, tuple[int, int]]]] = {}
    for (cell, sample), replicas in found.items():
        scores = [replicas.get(r, (None, None))[0] for r in range(reps)]
        if None not in scores:
            by_label.setdefault(sweep.cells[cell].label, []).append((math.fsum(scores) / reps, (cell, sample)))
    counts = {c.label: len(by_label.get(c.label, [])) for c in sweep.cells}
    if len(set(counts.values())) > 1 or (expected is not None and set(counts.values()) != {expected}):
        shown = ", ".join(f"{label} {k} of {offered}" for label, k in counts.items())
        raise UserError(
            f"study {study.name!r}: the cells ended the sweep with unequal full-budget configurations ({shown}; "
            f"{expected} each by construction), so their answers would rest on unequal searches; a trial "
            "failed or was stopped: run the study again with --resume to finish those trials"
        )
    selected = []
    for label in dict.fromkeys(c.label for c in sweep.cells):
        # Best mean first; ties go to the earlier sample (then the earlier cell of a grid).
        score, (cell, sample) = max(by_label[label], key=lambda s: (sign * s[0], -s[1][1], -s[1][0]))
        runs = [found[(cell, sample)][r][1] for r in range(reps)]
        first = runs[0]
        record = RunRecord(
            run_id=first.info.run_id,
            model=first.data.tags["kn_dist.model"],
            norm=first.data.tags["kn_dist.norm"],
            params={k: v for k, v in first.data.params.items() if not k.startswith("derived.")},
            score=None,
            trial_id=first.data.tags.get(TRIAL_KEY_TAG),
        )
        model, norm = label.split("/", 1)
        selected.append(
            Selected(
                model=model,
                norm=norm,
                candidate=f"c{cell}s{sample}",
                run_ids=tuple(r.info.run_id for r in runs),
                score=score,
                full_budget=counts[label],
                offered=offered,
                config=run_config(client, record),
            )
        )
    return selected


def pin_or_check_selection(client: Any, study: Any, study_run_id: str, selected: list[Selected]) -> None:
    """Pin the selection on the study run; on a resume, refuse one that differs from the pinned one."""
    now = {s.cell: {"candidate": s.candidate, "runs": list(s.run_ids), "score": s.score} for s in selected}
    pinned = client.get_run(study_run_id).data.tags.get(SELECTION_TAG)
    if pinned is None:
        client.set_tag(study_run_id, SELECTION_TAG, json.dumps(now, sort_keys=True))
        return
    before = json.loads(pinned)
    moved = [
        f"{cell}: {before.get(cell, {}).get('candidate')} -> {now.get(cell, {}).get('candidate')}"
        for cell in sorted(set(before) | set(now))
        if before.get(cell, {}).get("runs") != now.get(cell, {}).get("runs")
    ]
    if moved:
        raise UserError(
            f"study {study.name!r}: the selection pinned when its finals began no longer holds ({'; '.join(moved)}); "
            "its sweep records changed, so its finals would mix configurations: start it again under another name"
        )


def study_params(study: Any) -> dict[str, str]:
    """What a study run records of the study file: the base config, its tune and study sections."""
    params = {k: str(v) for k, v in to_flat_dict(study.base).items()}
    params |= {f"tune.{k}": str(v)[:6000] for k, v in study.sweep.tune.model_dump(mode="json").items()}
    spec = study.spec.model_dump(mode="json")
    return params | {f"study.{k}": str(v) for k, v in spec.items() if k != "seeds"}  # seeds may grow: a tag


def check_unchanged(client: Any, study: Any, study_run_id: str) -> None:
    """Refuse to resume a study whose file now says anything else than when it started (but study.seeds)."""
    logged = {k: v for k, v in client.get_run(study_run_id).data.params.items() if not k.startswith("derived.")}
    now = study_params(study)
    changed = sorted(k for k in set(logged) | set(now) if logged.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        shown = "; ".join(f"{k}: {logged.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(
            f"study {study.name!r} changed since it started ({shown}{more}); only study.seeds may change on "
            "--resume: give a changed study another name (name=...)"
        )
