"""The answer of a study, read back from MLflow: tables, intervals, differences, curves, one sentence each.

Per architecture: test top-1 of every cell (mean ± sd over seeds, 95 % t-interval), each KernelNorm cell
minus the architecture's published norm with Welch's 95 % CI and p-value (kn_dist.stats), the cost
(s / epoch, images / s, peak memory, parameters), epochs to a target val accuracy, learning curves with
a band over seeds, and the KernelNorm evaluation mode. Written to report.md + PNGs, logged to the
study's MLflow run as artifacts with per-cell summary metrics.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kn_dist import tracking
from kn_dist.stats import Difference, Summary, summarize, welch
from kn_dist.sweep import is_kn


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


@dataclass
class Cell:
    model: str
    norm: str
    finals: list[Final] = field(default_factory=list)

    @property
    def summary(self) -> Summary:
        return summarize([100 * f.test_top1 for f in self.finals])


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


def sentence(model: str, kn: str, base: str, d: Difference | None, seeds: tuple[int, int]) -> str:
    """The answer for one (architecture, KernelNorm variant) in words."""
    n = f"{seeds[0]} seeds" if seeds[0] == seeds[1] else f"{seeds[0]} and {seeds[1]} seeds"
    if d is None:
        return f"{model}: {kn} vs {base} cannot be compared with a confidence interval ({n}; at least 2 each needed)."
    ci = f"95 % CI {d.ci_low:+.2f} to {d.ci_high:+.2f}, Welch p = {d.p_value:.3g}, {n}"
    if not d.detected:
        return f"{model}: no difference detected between {kn} and {base} ({kn} − {base} = {d.diff:+.2f} pt, {ci})."
    if d.diff > 0:
        return f"{kn} beats {base} on {model} by {d.diff:+.2f} pt ({ci})."
    return f"{base} beats {kn} on {model} by {-d.diff:.2f} pt ({kn} − {base} = {d.diff:+.2f} pt, {ci})."


def _fmt(s: Summary) -> tuple[str, str]:
    if s.n == 1:
        return f"{s.mean:.2f} (1 seed)", "—"
    return f"{s.mean:.2f} ± {s.sd:.2f}", f"{s.ci_low:.2f} – {s.ci_high:.2f}"


def _epochs_to(curve: list[float], target: float) -> str:
    return next((str(i + 1) for i, v in enumerate(curve) if v >= target), "not reached")


def _mean_curve(cell: Cell) -> tuple[list[float], list[float]]:
    length = min(len(f.val_curve) for f in cell.finals)
    columns = [[f.val_curve[i] for f in cell.finals] for i in range(length)]
    means = [statistics.fmean(c) for c in columns]
    sds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    return means, sds


def _plot(path: Path, model: str, cells: dict[str, Cell], val_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for norm, cell in sorted(cells.items()):
        means, sds = _mean_curve(cell)
        epochs = list(range(1, len(means) + 1))
        lo = [100 * (m - s) for m, s in zip(means, sds, strict=True)]
        hi = [100 * (m + s) for m, s in zip(means, sds, strict=True)]
        line = ax.plot(epochs, [100 * m for m in means], "-" if is_kn(norm) else "--", marker="o", label=norm)[0]
        ax.fill_between(epochs, lo, hi, alpha=0.2, color=line.get_color())
    n = max(len(c.finals) for c in cells.values())
    ax.set(xlabel="epoch", ylabel=f"{val_label} top-1 (%)", title=f"{model}: final runs, mean ± sd over {n} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_study_report(client: Any, study: Any, study_run_id: str, selected: list[Any], out_dir: str | Path) -> Path:
    """report.md + one PNG per architecture under `out_dir`, logged to the study run; returns report.md's path.

    Also prints the answer sentences, the report path and the MLflow UI command.
    """
    from kn_dist.runtime import say

    experiment = study.base.tracking.experiment
    picked = {(s.model, s.norm): s for s in selected}
    chosen_by_cell = {s.cell: s.candidate for s in selected}
    cells = collect_finals(client, experiment, study_run_id, chosen_by_cell, study.spec.seed_list)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seen = study.spec.final_train_on == "train+val"
    val_label = "val (also trained on)" if seen else "val"
    target = study.sweep.tune.target_top1
    tune = study.sweep.tune
    budget = "; ".join(f"{s.cell} {s.full_budget} of {s.offered}" for s in selected)
    replicated = f", each the mean of {len(tune.seeds)} seeds" if tune.seeds else ""
    lines = [
        f"# Does KernelNorm beat the published norm? Study `{study.name}`",
        "",
        f"MLflow experiment `{experiment}` at `{study.base.tracking.uri}`, study run `{study_run_id}`; written "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Protocol (DESIGN.md §8): every cell was offered the same "
        f"{selected[0].offered if selected else 0} configuration(s) of the shared keys (paired random draws, "
        f"KernelNorm's own keys drawn apart) for up to {study.base.epochs} epochs on `{study.base.data.dataset}`, "
        f"scored on val ({study.spec.select_epoch} epoch{replicated}); scheduler `{tune.scheduler.name}`; "
        f"configurations that ran the full budget: {budget}. The best of them per cell was retrained once per "
        f"study seed ({study.spec.seed_list}; training seeds from the finals' own stream, the same for every "
        f"norm, never a trial's) on {study.spec.final_train_on} and evaluated once on the test split.",
        "",
        "## The answer",
        "",
    ]
    answers, metrics, sections = [], {}, []
    for model in sorted(cells):
        by_norm = cells[model]
        base = published_norm(model, list(by_norm))
        goal = target if target is not None else 0.95 * min(_mean_curve(c)[0][-1] for c in by_norm.values())
        rows = [
            f"## {model}",
            "",
            f"Published norm: `{base}`. Epochs to target: to {100 * goal:.1f} % {val_label} top-1 on the mean "
            "curve of the finals.",
            "",
            "| norm | seeds | test top-1 % (mean ± sd) | 95 % CI | selected trial (val %) | epochs to target "
            "| s / epoch | images / s | peak MB | parameters | KN eval |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for norm, cell in sorted(by_norm.items(), key=lambda kv: (is_kn(kv[0]), kv[0])):
            s = cell.summary
            mean_sd, ci = _fmt(s)
            choice = picked.get((model, norm))
            chosen = f"{choice.candidate} ({100 * choice.score:.2f})" if choice else "—"
            secs = statistics.median(x for f in cell.finals for x in f.epoch_seconds)
            ips = statistics.median(x for f in cell.finals for x in f.images_per_s)
            peak = max(f.peak_mem_mb for f in cell.finals)
            peak_text = f"{peak:.0f}" if peak > 0 else "n/a (CPU)"  # the CUDA allocator's peak; none on CPU
            params = cell.finals[0].num_params
            shown = f"{int(params):,}" if params is not None else "—"
            rows.append(
                f"| {norm} | {s.n} | {mean_sd} | {ci} | {chosen} | {_epochs_to(_mean_curve(cell)[0], goal)} | "
                f"{secs:.2f} | {ips:.0f} | {peak_text} | {shown} | {cell.finals[0].kn_eval} |"
            )
            key = f"{model}.{norm.replace('+', '_')}"
            metrics[f"test_top1_mean.{key}"] = s.mean / 100
            if s.n > 1:
                metrics[f"test_top1_sd.{key}"] = s.sd / 100
        rows.append("")
        for norm in sorted(n for n in by_norm if is_kn(n) and n != base):
            if base is None:
                continue
            a, b = by_norm[norm], by_norm[base]
            scores_a, scores_b = [100 * f.test_top1 for f in a.finals], [100 * f.test_top1 for f in b.finals]
            d = welch(scores_a, scores_b) if min(len(scores_a), len(scores_b)) >= 2 else None
            text = sentence(model, norm, base, d, (len(scores_a), len(scores_b)))
            answers.append(text)
            rows.append(f"**{text}**")
            rows.append("")
            if d is not None:
                key = f"{model}.{norm.replace('+', '_')}_minus_{base.replace('+', '_')}"
                metrics[f"diff_pt.{key}"] = d.diff
                metrics[f"diff_p.{key}"] = d.p_value
        png = out / f"curves_{model}.png"
        _plot(png, model, by_norm, val_label)
        rows += [f"![{val_label} top-1 per epoch of the final runs, {model}]({png.name})", ""]
        sections += rows
    lines += [f"- {a}" for a in answers] or ["- (no KernelNorm cell next to a baseline)"]
    lines += ["", *sections]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    tracking.log_study_results(client, study_run_id, metrics, out)
    for text in answers:
        say(text)
    db = study.base.tracking.uri
    say(f"report: {path}")
    say(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {db} --host 127.0.0.1 --port 5000")
    say(f"           then open http://127.0.0.1:5000, experiment {experiment!r}, study run {study_run_id}")
    return path
