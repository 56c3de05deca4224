"""Read a sweep back from MLflow: the best configuration per (architecture, norm) and the comparison report.

Pure MLflow reading (no Ray). A run's score is its last logged `val_top1` — the value MLflow itself
stores as the run's metric and orders by in `search_runs(order_by=["metrics.val_top1 DESC"])`, and
the value ASHA judged the trial on when it stopped it.
"""

from __future__ import annotations

import ast
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient

from kn_dist import config
from kn_dist.errors import UserError
from kn_dist.tracking import resolve_uri

RUN_KINDS = ("trial", "train")
_IDENTITY_PARAMS = ("name", "seed")  # differ between replicates of one configuration


@dataclass
class RunRecord:
    """What the report needs of one MLflow run."""

    run_id: str
    model: str
    norm: str
    params: dict[str, str]
    score: float | None  # last val_top1
    trial_id: str | None
    val_top1: list[tuple[int, float]] = field(default_factory=list)  # (epoch, value), one per epoch
    epoch_seconds: list[float] = field(default_factory=list)
    num_params: float | None = None

    @property
    def config_key(self) -> tuple[tuple[str, str], ...]:
        """The configuration without its seed and name: replicates share it."""
        return tuple(sorted((k, v) for k, v in self.params.items() if k not in _IDENTITY_PARAMS))


def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(resolve_uri(tracking_uri))


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str, **kw) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token, **kw)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def resolve_experiment(client: MlflowClient, experiment: str | None) -> tuple[str, str]:
    """(id, name) of `experiment`, or of the experiment holding the most recently started sweep."""
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "(none)"
            raise UserError(f"MLflow experiment {experiment!r} does not exist at {client.tracking_uri}; have: {names}")
        return exp.experiment_id, exp.name
    ids = [e.experiment_id for e in client.search_experiments()]
    sweeps = client.search_runs(ids, "tags.`kn_dist.kind` = 'sweep'", max_results=1, order_by=["start_time DESC"])
    if not ids or not sweeps:
        raise UserError(f"no sweep runs at {client.tracking_uri}; run `kn-dist tune SWEEP` or pass --experiment")
    exp = client.get_experiment(sweeps[0].info.experiment_id)
    return exp.experiment_id, exp.name


def load_runs(client: MlflowClient, experiment_id: str, *, histories: bool = True) -> list[RunRecord]:
    """Every training run (sweep trial or `kn-dist train`) of the experiment."""
    records = []
    for run in _search_all(client, [experiment_id], ""):
        tags = run.data.tags
        if tags.get("kn_dist.kind") not in RUN_KINDS or "kn_dist.model" not in tags:
            continue
        record = RunRecord(
            run_id=run.info.run_id,
            model=tags["kn_dist.model"],
            norm=tags.get("kn_dist.norm", "?"),
            params=dict(run.data.params),
            score=run.data.metrics.get("val_top1"),
            trial_id=tags.get("kn_dist.trial_id"),
            num_params=run.data.metrics.get("num_params"),
        )
        if histories:
            # A restarted run may log an epoch twice; keep the latest value per epoch.
            history = sorted(client.get_metric_history(run.info.run_id, "val_top1"), key=lambda m: m.timestamp)
            per_step = {m.step: m.value for m in history}
            record.val_top1 = sorted(per_step.items())
            record.epoch_seconds = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
        records.append(record)
    return records


def best_per_group(records: list[RunRecord]) -> dict[tuple[str, str], RunRecord]:
    """The highest-scoring run of each (model, norm); runs without a val_top1 yet are skipped."""
    best: dict[tuple[str, str], RunRecord] = {}
    for r in records:
        if r.score is not None and ((r.model, r.norm) not in best or r.score > best[(r.model, r.norm)].score):
            best[(r.model, r.norm)] = r
    return dict(sorted(best.items()))


def _varying_params(records: list[RunRecord]) -> list[str]:
    keys = sorted({k for r in records for k in r.params} - {"name"})
    return [k for k in keys if len({r.params.get(k) for r in records}) > 1]


def run_config(client: MlflowClient, record: RunRecord) -> config.ExperimentConfig:
    """The run's resolved config: its config.yaml artifact, else rebuilt from its params.

    A trial stopped early by ASHA is killed before it logs artifacts, so its params (the flattened
    config) are the record; the rebuilt config is accepted only if it flattens back to exactly them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(record.run_id, "config.yaml", tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            path = None
        if path is not None:
            return config.load(path)
    raw: dict = {}
    for key, text in record.params.items():
        try:
            value = ast.literal_eval(text)  # params are str(value): numbers, None, bools, tuples, lists, dicts
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = config.from_dict(raw)
    rebuilt = {k: str(v) for k, v in config.to_flat_dict(cfg).items()}
    if rebuilt != record.params:
        bad = sorted(k for k in set(rebuilt) | set(record.params) if rebuilt.get(k) != record.params.get(k))
        raise UserError(f"run {record.run_id} has no config.yaml and its params do not rebuild a config exactly: {bad}")
    return cfg


def best_command(
    tracking_uri: str | None, experiment: str | None, model: str | None, norm: str | None, out: str | None
) -> int:
    """`kn-dist best`: print the best configuration per (architecture, norm); --out writes the best of them."""
    client = _client(tracking_uri)
    exp_id, exp_name = resolve_experiment(client, experiment)
    records = load_runs(client, exp_id, histories=False)
    varying = _varying_params(records)
    chosen = {g: r for g, r in best_per_group(records).items() if model in (None, g[0]) and norm in (None, g[1])}
    if not chosen:
        raise UserError(f"experiment {exp_name!r} has no runs with val_top1 for model={model!r} norm={norm!r}")
    print(f"experiment {exp_name!r} ({client.tracking_uri}): best val_top1 per (model, norm)")
    for (m, n), r in chosen.items():
        trial = f" trial={r.trial_id}" if r.trial_id else ""
        print(f"{m:24s} {n:10s} val_top1={r.score:.4f} run={r.run_id}{trial}")
        shown = " ".join(f"{k}={r.params.get(k, '-')}" for k in varying)
        print(f"    {shown}")
    if out is not None:
        top = max(chosen.values(), key=lambda r: r.score)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(config.to_yaml(run_config(client, top)))
        print(
            f"wrote the config of run {top.run_id} ({top.model}, {top.norm}) to {out}; train it with "
            f"`kn-dist train {out}`"
        )
    return 0


# ---------------------------------------------------------------------------------------------------
# report


def _family(model: str) -> str:
    from kn_dist.models import model_info

    try:
        return model_info(model).family
    except ValueError:
        return model


def _target(client: MlflowClient, exp_id: str, groups: dict[tuple[str, str], RunRecord]) -> tuple[float, str]:
    """The sweep's tune.target_top1, else 95 % of the weakest best in the architecture (so each row can reach it)."""
    sweeps = client.search_runs([exp_id], "tags.`kn_dist.kind` = 'sweep'", max_results=1, order_by=["start_time DESC"])
    text = sweeps[0].data.params.get("tune.target_top1", "None") if sweeps else "None"
    if text not in ("None", ""):
        return float(text), "tune.target_top1 of the sweep"
    return 0.95 * min(r.score for r in groups.values()), "95 % of the weakest best val top-1 in this architecture"


def _epochs_to(history: list[tuple[int, float]], target: float) -> str:
    return next((str(step) for step, value in history if value >= target), "not reached")


def _plot_curves(path: Path, family: str, groups: dict[tuple[str, str], RunRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from kn_dist.sweep import is_kn

    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, norm), r in groups.items():
        steps, values = zip(*r.val_top1, strict=True) if r.val_top1 else ((), ())
        style = "-" if is_kn(norm) else "--"
        ax.plot(steps, [100 * v for v in values], style, marker="o", label=f"{model} / {norm}")
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title=f"{family}: best run per norm (solid: KernelNorm)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_kn_param(path: Path, key: str, records: list[RunRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_model: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        by_model[r.model].append((float(r.params[key]), 100 * r.score))
    for model, points in sorted(by_model.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.scatter(xs, ys, label=model)
    ax.set(xlabel=key, ylabel="final val top-1 (%)", title=f"KernelNorm runs: accuracy vs {key.split('.')[-1]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(tracking_uri: str | None, experiment: str | None, out_dir: str | Path) -> Path:
    """`kn-dist report`: report.md with one table per architecture (baseline vs KernelNorm) and PNG plots."""
    from kn_dist.sweep import is_kn

    client = _client(tracking_uri)
    exp_id, exp_name = resolve_experiment(client, experiment)
    records = [r for r in load_runs(client, exp_id) if r.score is not None]
    if not records:
        raise UserError(f"experiment {exp_name!r} has no runs with val_top1 yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_family: dict[str, dict[tuple[str, str], RunRecord]] = defaultdict(dict)
    for group, r in best_per_group(records).items():
        by_family[_family(group[0])][group] = r

    lines = [
        f"# kn_dist report: experiment `{exp_name}`",
        "",
        f"Tracking store `{client.tracking_uri}`, {len(records)} runs, written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "Best val top-1 is the best run's last logged val_top1; mean ± sd is over the seeds of that run's "
        "configuration (sample sd); s / epoch is the median over every epoch of the (model, norm).",
        "",
    ]
    for family, groups in sorted(by_family.items()):
        target, why = _target(client, exp_id, groups)
        lines += [
            f"## {family}",
            "",
            f"Target accuracy {100 * target:.2f} % ({why}).",
            "",
            "| model | norm | runs | best val top-1 (%) | mean ± sd over seeds (%) | epochs to target | s / epoch "
            "| parameters |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for (model, norm), best in groups.items():
            group_runs = [r for r in records if (r.model, r.norm) == (model, norm)]
            seeds = [100 * r.score for r in group_runs if r.config_key == best.config_key]
            spread = "— (1 seed)"
            if len(seeds) > 1:
                spread = f"{statistics.mean(seeds):.2f} ± {statistics.stdev(seeds):.2f} (n={len(seeds)})"
            seconds = [s for r in group_runs for s in r.epoch_seconds]
            per_epoch = f"{statistics.median(seconds):.2f}" if seconds else "—"
            params = f"{int(best.num_params):,}" if best.num_params is not None else "—"
            lines.append(
                f"| {model} | {norm}{' (KN)' if is_kn(norm) else ''} | {len(group_runs)} | {100 * best.score:.2f} "
                f"| {spread} | {_epochs_to(best.val_top1, target)} | {per_epoch} | {params} |"
            )
        png = out / f"val_top1_{family}.png"
        _plot_curves(png, family, groups)
        lines += ["", f"![validation accuracy per epoch, {family}]({png.name})", ""]

    kn_runs = [r for r in records if is_kn(r.norm)]
    kn_keys = sorted({k for r in kn_runs for k in r.params if k.startswith("model.kwargs.kn_")})
    lines += ["## KernelNorm hyperparameters", ""]
    for key in kn_keys:
        runs = [r for r in kn_runs if key in r.params and _is_number(r.params[key])]
        if len({r.params[key] for r in runs}) < 2:
            continue
        png = out / f"kn_{key.rsplit('.', 1)[-1]}.png"
        _plot_kn_param(png, key, runs)
        lines += [f"![val top-1 vs {key}]({png.name})", ""]
    if lines[-2] == "## KernelNorm hyperparameters":
        lines.append("No KernelNorm hyperparameter varied between runs.")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
