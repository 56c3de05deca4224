"""`kn-dist summary`: the answer to the mission's question on one page, across every study in an MLflow store.

Per study (architecture x dataset) and KernelNorm variant: the paired difference KN − published norm over
the study's seeds with its 95 % CI, P(KN > published) and the study's verdict (kn_dist.study_answer, the
study's own delta, alpha and seed plan). Across studies, as rliable aggregates tasks (Agarwal et al. 2021):
the interquartile mean of the per-seed differences and the mean P(KN > published), each with a stratified
bootstrap interval (seeds resampled within each study). Written as summary.md + forest.png to a folder and
logged to an MLflow run of kind "summary".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kn_dist import tracking
from kn_dist.errors import UserError
from kn_dist.stats import iqm, probability_of_improvement, stratified_bootstrap
from kn_dist.study_answer import Comparison, compare

SUMMARY_EXPERIMENT = "kn_dist-summary"


@dataclass(frozen=True)
class StudyComparison:
    """One study's comparison, with where it came from."""

    study: str
    dataset: str
    run_id: str
    comparison: Comparison


def _study_runs(client: Any) -> list[Any]:
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    where = "tags.`kn_dist.kind` = 'study' and attributes.status = 'FINISHED'"
    return client.search_runs(ids, where, max_results=5000, order_by=["start_time ASC"])


def collect(client: Any) -> list[StudyComparison]:
    """Every finished study's comparisons, recomputed from its finals (its pinned selection and seeds)."""
    from kn_dist.study_report import collect_finals, published_norm
    from kn_dist.sweep import is_kn

    out = []
    for run in _study_runs(client):
        tags, params = run.data.tags, run.data.params
        experiment = client.get_experiment(run.info.experiment_id).name
        selection = {cell: v["candidate"] for cell, v in json.loads(tags.get("kn_dist.selection", "{}")).items()}
        seeds = json.loads(tags.get("kn_dist.study_seeds", "null"))
        cells = collect_finals(client, experiment, run.info.run_id, selection or None, seeds)
        pairs = []
        for model, by_norm in sorted(cells.items()):
            base = published_norm(model, list(by_norm))
            for kn in sorted(n for n in by_norm if is_kn(n) and n != base and base is not None):
                scores = [{f.seed: 100 * f.test_top1 for f in by_norm[n].finals} for n in (kn, base)]
                pairs.append((model, kn, base, *scores))
        if not pairs:
            continue
        looks = int(tags.get("kn_dist.seed_looks", "1"))
        delta, alpha = float(params.get("study.delta", 0.5)), float(params.get("study.alpha", 0.05))
        for c in compare(pairs, delta=delta, alpha=alpha, looks=looks):
            out.append(
                StudyComparison(
                    tags.get("kn_dist.study", run.info.run_name), tags["kn_dist.dataset"], run.info.run_id, c
                )
            )
    return out


def aggregate(rows: list[StudyComparison]) -> dict[str, float]:
    """IQM of the paired per-seed differences and mean P(KN > published) over studies, with stratified
    bootstrap 95 % intervals (each study's seeds resampled within it)."""
    strata = [
        [np.asarray(r.comparison.kn_scores), np.asarray(r.comparison.base_scores)] for r in rows if r.comparison.seeds
    ]
    if not strata:
        raise UserError("no study has a KernelNorm cell paired with its published norm yet")

    def iqm_diff(sample: list[list[np.ndarray]]) -> float:
        return iqm(np.concatenate([kn - base for kn, base in sample]).tolist())

    def mean_improvement(sample: list[list[np.ndarray]]) -> float:
        return float(np.mean([probability_of_improvement(kn, base) for kn, base in sample]))

    lo_d, hi_d = stratified_bootstrap(strata, iqm_diff)
    lo_p, hi_p = stratified_bootstrap(strata, mean_improvement)
    return {
        "iqm_diff_pt": iqm_diff(strata),
        "iqm_diff_ci_low": lo_d,
        "iqm_diff_ci_high": hi_d,
        "p_improvement": mean_improvement(strata),
        "p_improvement_ci_low": lo_p,
        "p_improvement_ci_high": hi_p,
        "studies": float(len(strata)),
    }


def _forest(path: Path, rows: list[StudyComparison], totals: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.comparison.paired is not None]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * (len(shown) + 1)))
    colours = {"beats": "tab:green", "loses to": "tab:red", "equivalent": "tab:blue", "inconclusive": "tab:gray"}
    for y, r in enumerate(shown):
        d = r.comparison.paired
        ax.errorbar(d.diff, y, xerr=[[d.diff - d.ci_low], [d.ci_high - d.diff]], fmt="o", capsize=3,
                    color=colours[r.comparison.verdict])  # fmt: skip
    y, mid = len(shown), totals["iqm_diff_pt"]
    spread = [[mid - totals["iqm_diff_ci_low"]], [totals["iqm_diff_ci_high"] - mid]]
    ax.errorbar(mid, y, xerr=spread, fmt="D", color="black", capsize=3)
    labels = [
        f"{r.comparison.model} {r.comparison.kn} vs {r.comparison.base} ({r.dataset}): {r.comparison.verdict}"
        for r in shown
    ]
    ax.set_yticks(range(y + 1), [*labels, "IQM over studies"])
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set(
        xlabel="KN − published, test top-1 (pt), 95 % CI",
        title="Does KernelNorm beat the published norm?",
    )
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(tracking_uri: str | None, out_dir: str | Path) -> Path:
    """summary.md + forest.png under `out_dir`, logged to a new MLflow run; returns summary.md's path."""
    from kn_dist.runtime import say

    client = tracking.client(tracking.resolve_uri(tracking_uri))
    rows = collect(client)
    if not rows:
        raise UserError(f"no finished study in the MLflow store {client.tracking_uri}; run `kn-dist study FILE` first")
    totals = aggregate(rows)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _forest(out / "forest.png", rows, totals)
    lines = [
        "# Does KernelNorm beat the normalisation each architecture was published with?",
        "",
        f"Every finished study in `{client.tracking_uri}`; written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"**Across {int(totals['studies'])} comparison(s): IQM of KernelNorm − published norm = "
        f"{totals['iqm_diff_pt']:+.2f} pt (95 % CI {totals['iqm_diff_ci_low']:+.2f} to "
        f"{totals['iqm_diff_ci_high']:+.2f}), "
        f"P(KernelNorm > published) = {totals['p_improvement']:.2f} ({totals['p_improvement_ci_low']:.2f} – "
        f"{totals['p_improvement_ci_high']:.2f}); stratified bootstrap over studies and seeds.**",
        "",
        "| architecture | dataset | KN | published | seeds | KN − published (pt) | 95 % CI | P(KN > published) "
        "| verdict | study |",
        "|---|---|---|---|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        c, d = r.comparison, r.comparison.paired
        diff = f"{d.diff:+.2f}" if d else "—"
        ci = f"{d.ci_low:+.2f} to {d.ci_high:+.2f}" if d else "—"
        pi = f"{c.p_improvement:.2f} [{c.p_improvement_ci[0]:.2f}, {c.p_improvement_ci[1]:.2f}]"
        row = [c.model, r.dataset, c.kn, c.base, str(len(c.seeds)), diff, ci, pi, c.verdict, r.study]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![KernelNorm − published norm per study, 95 % CI; the IQM over studies last](forest.png)", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    experiment = tracking.experiment_id(client, SUMMARY_EXPERIMENT)
    run = client.create_run(
        experiment, run_name="summary", tags={"kn_dist.kind": "summary", "mlflow.note.content": "\n".join(lines)}
    )
    tracking.log_study_results(client, run.info.run_id, totals, out)
    client.set_terminated(run.info.run_id)
    say(lines[4].strip("*"))
    say(f"summary: {path}; MLflow run {run.info.run_id} in experiment {SUMMARY_EXPERIMENT!r}")
    return path
