"""The answer of a study, read back from MLflow: per-seed figures, intervals, verdicts, cost, plots.

Per architecture: every cell's test top-1 per study seed, its mean ± sd and 95 % t-interval cut to
[0, 100] % (flagged), the test set's sampling error beside the seed spread; each KernelNorm cell against
the published norm paired by seed, with its verdict (kn_dist.study_answer); the cost (s / epoch,
images / s, peak memory, parameters), epochs to a target val accuracy, learning curves and the tuning cost
of each norm (kn_dist.study_plots). Written to report.md + PNGs, logged to the study's MLflow run as
artifacts with per-cell metrics, and the answer with its table as the run's MLflow description
(`mlflow.note.content`: the run page of the MLflow UI shows it).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kn_dist import tracking
from kn_dist.stats import Summary, binomial_se, summarize
from kn_dist.study_answer import Comparison, compare, seed_looks
from kn_dist.study_plots import mean_curve, plot_curves, plot_tuning_cost, tuning_cost
from kn_dist.sweep import is_kn
from kn_dist.sweep_progress import TrialKey, rung_epochs

NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
NOTE_LIMIT = 5000  # characters MLflow keeps of a tag value


@dataclass
class Final:
    """One final run (a cell, a seed) as the report needs it."""

    model: str
    norm: str
    seed: int
    test_top1: float
    val_curve: list[float]  # val top-1 per epoch
    epoch_seconds: list[float]
    images_per_s: list[float]
    peak_mem_mb: float
    num_params: float | None
    kn_eval: str
    run_id: str = ""


@dataclass
class Cell:
    model: str
    norm: str
    finals: list[Final] = field(default_factory=list)

    @property
    def summary(self) -> Summary:
        """Test top-1 in % over seeds: the t-interval cut to [0, 100] (kn_dist.stats)."""
        return summarize([100 * f.test_top1 for f in self.finals], bounds=(0.0, 100.0))


def collect_finals(
    client: Any,
    experiment: str,
    study_run_id: str,
    selected: dict[str, str] | None = None,
    seeds: list[int] | None = None,
) -> dict[str, dict[str, Cell]]:
    """model -> norm -> Cell, from the FINISHED final runs nested under the study run.

    `selected` (cell -> selected configuration) and `seeds` keep only the finals of this selection and
    these study seeds: a final of another configuration or a dropped seed is never pooled in.
    """
    cells: dict[str, dict[str, Cell]] = defaultdict(dict)
    for run in tracking.child_runs(client, experiment, study_run_id, status="FINISHED"):
        tags, metrics = run.data.tags, run.data.metrics
        if tags.get("kn_dist.kind") != "final" or "test_top1" not in metrics:
            continue
        if selected is not None and tags.get("kn_dist.selected_trial") != selected.get(tags.get("kn_dist.cell")):
            continue
        if seeds is not None and tags.get("kn_dist.seed") not in {str(s) for s in seeds}:
            continue

        def history(key: str, run_id: str = run.info.run_id) -> list[float]:
            return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

        model, norm = tags["kn_dist.model"], tags["kn_dist.norm"]
        cell = cells[model].setdefault(norm, Cell(model, norm))
        cell.finals.append(
            Final(
                model=model,
                norm=norm,
                seed=int(tags.get("kn_dist.seed", -1)),
                test_top1=metrics["test_top1"],
                val_curve=history("val_top1"),
                epoch_seconds=history("epoch_seconds"),
                images_per_s=history("images_per_s"),
                peak_mem_mb=metrics.get("peak_mem_mb", 0.0),
                num_params=metrics.get("num_params"),
                kn_eval=run.data.params.get("derived.kn_eval", "n/a"),
                run_id=run.info.run_id,
            )
        )
    return cells


def published_norm(model: str, norms: list[str]) -> str | None:
    """The norm the architecture was published with, if the study trained it (else its first non-KN norm)."""
    from kn_dist.models import model_info

    try:
        default = model_info(model).default_norm
    except ValueError:
        default = None
    if default in norms:
        return default
    return next((n for n in norms if not is_kn(n)), None)


def answer(
    client: Any, study: Any, study_run_id: str, selected: list[Any], seeds: list[int], *, examples: bool = False
) -> list[Comparison]:
    """The study's comparisons over `seeds` (with the per-example interval when `examples`)."""
    chosen = {s.cell: s.candidate for s in selected}
    cells = collect_finals(client, study.base.tracking.experiment, study_run_id, chosen, seeds)
    pairs, predictions = [], {}
    for model, by_norm in sorted(cells.items()):
        base = published_norm(model, list(by_norm))
        for kn in sorted(n for n in by_norm if is_kn(n) and n != base and base is not None):
            scores = [{f.seed: 100 * f.test_top1 for f in by_norm[n].finals} for n in (kn, base)]
            pairs.append((model, kn, base, *scores))
            if examples:
                for norm in (kn, base):
                    records = {f.seed: tracking.load_test_examples(client, f.run_id) for f in by_norm[norm].finals}
                    predictions[(model, norm)] = {s: r for s, r in records.items() if r is not None}
    spec = study.spec
    return compare(
        pairs, delta=spec.delta, alpha=spec.alpha, looks=len(seed_looks(spec.seeds)), predictions=predictions
    )


def sweep_scores(client: Any, study: Any, sweep_run_id: str) -> tuple[dict[str, dict[str, list[float]]], int]:
    """model -> norm -> each configuration's mean val score at the sweep's first rung, where every
    configuration was scored; and that epoch."""
    epoch = rung_epochs(study.sweep)[0]
    found: dict[tuple[int, int], list[float]] = defaultdict(list)
    for run in tracking.child_runs(client, study.base.tracking.experiment, sweep_run_id):
        name = run.data.tags.get("kn_dist.trial_key")
        if run.data.tags.get("kn_dist.kind") != "trial" or name is None:
            continue
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, study.sweep.tune.metric)}
        if epoch in history:
            found[TrialKey.parse(name).candidate].append(history[epoch])
    reps = len(study.sweep.tune.seeds or [0])
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (cell, _), values in sorted(found.items()):
        if len(values) == reps:
            spec = study.sweep.cells[cell]
            out[spec.values["model.name"]][spec.norm].append(statistics.fmean(values))
    return out, epoch


def _epochs_to(curve: list[float], target: float) -> str:
    return next((str(i + 1) for i, v in enumerate(curve) if v >= target), "not reached")


def _cell_rows(model: str, by_norm: dict[str, Cell], picked: dict, goal: float, examples: dict) -> list[str]:
    rows = [
        "| norm | seeds | test top-1 per seed (%) | mean ± sd | 95 % CI | test-set SE | selected (val %) "
        "| epochs to target | s / epoch | images / s | peak MB | parameters | KN eval |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for norm, cell in sorted(by_norm.items(), key=lambda kv: (is_kn(kv[0]), kv[0])):
        s = cell.summary
        finals = sorted(cell.finals, key=lambda f: f.seed)
        per_seed = ", ".join(f"s{f.seed}: {100 * f.test_top1:.2f}" for f in finals)
        mean_sd = f"{s.mean:.2f} (1 seed)" if s.n == 1 else f"{s.mean:.2f} ± {s.sd:.2f}"
        ci = "—" if s.n == 1 else f"{s.ci_low:.2f} – {s.ci_high:.2f}" + (" (cut at 0/100)" if s.clipped else "")
        sizes = [examples.get(f.run_id) for f in finals]
        se = (
            f"± {statistics.fmean(100 * binomial_se(f.test_top1, n) for f, n in zip(finals, sizes, strict=True)):.2f}"
            if all(sizes) else "—"
        )  # fmt: skip
        choice = picked.get((model, norm))
        chosen = f"{choice.candidate} ({100 * choice.score:.2f})" if choice else "—"
        secs = statistics.median(x for f in finals for x in f.epoch_seconds)
        ips = statistics.median(x for f in finals for x in f.images_per_s)
        peak = max(f.peak_mem_mb for f in finals)
        peak_text = f"{peak:.0f}" if peak > 0 else "n/a (CPU)"  # the CUDA allocator's peak; none on CPU
        params = finals[0].num_params
        shown = f"{int(params):,}" if params is not None else "—"
        epochs = _epochs_to(mean_curve([f.val_curve for f in finals])[0], goal)
        rows.append(
            f"| {norm} | {s.n} | {per_seed} | {mean_sd} | {ci} | {se} | {chosen} | {epochs} | {secs:.2f} | "
            f"{ips:.0f} | {peak_text} | {shown} | {finals[0].kn_eval} |"
        )
    return rows


def _comparison_table(comparisons: list[Comparison]) -> list[str]:
    rows = [
        "| comparison | paired seeds | KN − published (pt) | 95 % CI (seeds) | 95 % CI (seeds + test examples) "
        "| P(KN > published) | p (Holm) | TOST p (Holm) | verdict |",
        "|---|---:|---:|---|---|---|---:|---:|---|",
    ]
    for c in comparisons:
        d = c.paired
        with_examples = (
            f"{c.with_test_sampling[0]:+.2f} to {c.with_test_sampling[1]:+.2f}" if c.with_test_sampling else "—"
        )
        figures = (
            [f"{d.diff:+.2f}", f"{d.ci_low:+.2f} to {d.ci_high:+.2f}", with_examples]
            if d else ["—", "—", "—"]
        )  # fmt: skip
        pi = f"{c.p_improvement:.2f} [{c.p_improvement_ci[0]:.2f}, {c.p_improvement_ci[1]:.2f}]"
        ps = [f"{c.p_diff_adjusted:.3g}", f"{c.p_equivalent_adjusted:.3g}"] if d else ["—", "—"]
        row = [f"{c.model}: {c.kn} vs {c.base}", str(len(c.seeds)), *figures, pi, *ps, f"**{c.verdict}**"]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def write_study_report(
    client: Any, study: Any, study_run_id: str, selected: list[Any], seeds: list[int], out_dir: str | Path
) -> Path:
    """report.md + PNGs under `out_dir`, logged to the study run with its description; returns report.md's path.

    Also prints the answer sentences, the report path and the MLflow UI command.
    """
    from kn_dist.runtime import say

    experiment = study.base.tracking.experiment
    picked = {(s.model, s.norm): s for s in selected}
    cells = collect_finals(client, experiment, study_run_id, {s.cell: s.candidate for s in selected}, seeds)
    comparisons = answer(client, study, study_run_id, selected, seeds, examples=True)
    examples = {
        f.run_id: (len(r) if (r := tracking.load_test_examples(client, f.run_id)) is not None else None)
        for by_norm in cells.values() for cell in by_norm.values() for f in cell.finals
    }  # fmt: skip
    sweep_run = tracking.find_run(client, experiment, f"sweep:{study.sweep.name}")
    tuning, rung = sweep_scores(client, study, sweep_run) if sweep_run else ({}, 0)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    val_label = "val (also trained on)" if study.spec.final_train_on == "train+val" else "val"
    tune, spec = study.sweep.tune, study.spec
    looks = seed_looks(spec.seeds)
    level = spec.alpha / len(looks)
    budget = "; ".join(f"{s.cell} {s.full_budget} of {s.offered}" for s in selected)
    offered = selected[0].offered if selected else 0
    replicated = f", each the mean of {len(tune.seeds)} seeds" if tune.seeds else ""
    plan = (
        f"seed rounds until decided ({spec.seeds.min} to {spec.seeds.max} seeds, looks at {looks}): each look "
        f"judged at α = {spec.alpha:g} / {len(looks)} = {level:.3g}"
        if len(looks) > 1 else f"a fixed {len(seeds)} seeds, judged at α = {spec.alpha:g}"
    )  # fmt: skip
    answers = [c.sentence() for c in comparisons] or ["(no KernelNorm cell next to a baseline)"]
    lines = [
        f"# Does KernelNorm beat the published norm? Study `{study.name}`",
        "",
        "## The answer",
        "",
        *[f"- {a}" for a in answers],
        "",
        *_comparison_table(comparisons),
        "",
        f"Verdicts: beats / loses to (Holm-adjusted paired t-test p < α) / equivalent within ±{spec.delta:g} pt "
        f"(Holm-adjusted TOST p < α) / inconclusive; Holm's correction over the {len(comparisons)} comparison(s) "
        f"of this report; {plan}. Differences are paired by study seed (seed s gives every norm the same data "
        "order and augmentation); P(KN > published) is the probability of improvement (rliable) with a "
        "bootstrap interval; the last interval adds the test set's sampling error (from each final's per-example "
        "test record) to the seeds' spread.",
        "",
        "## Protocol",
        "",
        f"MLflow experiment `{experiment}` at `{study.base.tracking.uri}`, study run `{study_run_id}`; written "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Every cell was offered the same {offered} "
        f"configuration(s) of the shared keys (paired random draws, KernelNorm's own keys drawn apart) for up to "
        f"{study.base.epochs} epochs on `{study.base.data.dataset}`, scored on val ({spec.select_epoch} epoch"
        f"{replicated}); scheduler `{tune.scheduler.name}`; configurations that ran the full budget: {budget}. The "
        f"best of them per cell was retrained once per study seed ({seeds}; training seeds from the finals' own "
        f"stream, the same for every norm, never a trial's) on {spec.final_train_on} and evaluated once on the "
        "test split.",
        "",
    ]
    metrics, note_tables = {}, []
    target = tune.target_top1
    for model in sorted(cells):
        by_norm = cells[model]
        goal = (
            target
            if target is not None
            else 0.95 * min(mean_curve([f.val_curve for f in c.finals])[0][-1] for c in by_norm.values())
        )
        table = _cell_rows(model, by_norm, picked, goal, examples)
        note_tables += [f"**{model}**", "", *table, ""]
        lines += [
            f"## {model}",
            "",
            f"Published norm: `{published_norm(model, list(by_norm))}`. Epochs to target: to {100 * goal:.1f} % "
            f"{val_label} top-1 on the mean curve of the finals. Test-set SE: the binomial sampling error of one "
            "final's test top-1, beside the seed spread (sd).",
            "",
            *table,
            "",
        ]
        for norm, cell in by_norm.items():
            key = f"{model}.{norm.replace('+', '_')}"
            metrics[f"test_top1_mean.{key}"] = cell.summary.mean / 100
            if cell.summary.n > 1:
                metrics[f"test_top1_sd.{key}"] = cell.summary.sd / 100
        png = out / f"curves_{model}.png"
        plot_curves(png, model, {n: [f.val_curve for f in c.finals] for n, c in by_norm.items()}, val_label)
        lines += [f"![{val_label} top-1 per epoch of the final runs, {model}]({png.name})", ""]
        if model in tuning:
            cost = out / f"tuning_{model}.png"
            plot_tuning_cost(cost, model, tuning[model], rung)
            best = ", ".join(
                f"{norm} {100 * tuning_cost(v)[0]:.2f} → {100 * tuning_cost(v)[-1]:.2f} % ({len(v)} configurations)"
                for norm, v in sorted(tuning[model].items())
            )
            lines += [
                f"Tuning cost: expected best val top-1 at epoch {rung} from 1 to all configurations tried: {best}.",
                "",
                f"![expected best val top-1 against configurations tried, {model}]({cost.name})",
                "",
            ]
    for c in comparisons:
        if c.paired is not None:
            key = f"{c.model}.{c.kn.replace('+', '_')}_minus_{c.base.replace('+', '_')}"
            metrics[f"diff_pt.{key}"] = c.paired.diff
            metrics[f"diff_p_holm.{key}"] = c.p_diff_adjusted
            metrics[f"p_improvement.{key}"] = c.p_improvement
            client.set_tag(study_run_id, f"kn_dist.verdict.{key}", c.verdict)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    tracking.log_study_results(client, study_run_id, metrics, out)
    # The run page shows a description's first lines until "Show more": the answer comes first.
    note = "\n".join([*(f"**{a}**" for a in answers), "", *_comparison_table(comparisons), "", *note_tables])
    more = "\n\n(cut; the whole report is the artifact report/report.md)"
    client.set_tag(study_run_id, NOTE_TAG, note if len(note) <= NOTE_LIMIT else note[: NOTE_LIMIT - len(more)] + more)
    for text in answers:
        say(text)
    say(f"report: {path}")
    say(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {study.base.tracking.uri} --host 127.0.0.1 --port 5000")
    say(f"           then open http://127.0.0.1:5000, experiment {experiment!r}, study run {study_run_id}")
    return path
