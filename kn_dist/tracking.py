"""MLflow bookkeeping: where runs go, which tags record provenance, and per-epoch logging.

Only this module and report.py import MLflow (DESIGN.md §1). Everything goes through an explicit
`MlflowClient(uri)` rather than mlflow's global "active run", because the writer is a Ray worker
whose process does not inherit the driver's tracking URI (DESIGN.md §7).

Naming (read by report.py and tune.py): params = `config.to_flat_dict`; tags `kn_dist.*`;
metrics per epoch with step = epoch (1-based); artifacts `config.yaml`, `model/weights.pt`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from kn_dist.config import ExperimentConfig, is_kn, to_flat_dict, to_yaml
from kn_dist.errors import UserError

STOPPED_TAG = "kn_dist.stopped_early"  # a sweep trial that a scheduler stopped before its full budget
RUN_KEY_TAG = "kn_dist.run_key"  # stable identity of a training run across restarts (see find_or_create_run)
PARENT_KINDS = ("sweep", "study")  # runs that hold other runs (tag mlflow.parentRunId on the children)
EPOCH_METRICS = (
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "lr",
    "epoch_seconds",
    "images_per_s",
    "peak_mem_mb",
)
_PACKAGES = ("torchvision", "ray", "mlflow", "ffcv", "numpy", "pydantic", "kn_dist")


def default_uri() -> str:
    """The embedded store: SQLite in the current working directory (absolute, so Ray workers find it)."""
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    """`None` -> the default store; a relative SQLite path -> absolute (workers run in another directory)."""
    if uri is None:
        return default_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise UserError if the tracking store cannot be used, before any compute is spent.

    A server must answer HTTP within `timeout` seconds (MLflow's own client would retry with
    back-off for minutes); a SQLite file must live in an existing, writable directory.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # the server answered (an auth proxy or an older server without /health)
        except (TimeoutError, urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(
                f"MLflow tracking server {uri!r} is not reachable ({reason}); start it, open the SSH tunnel, "
                "or pass --tracking-uri sqlite:///mlflow.db for a local store"
            ) from None
    elif parsed.scheme == "sqlite":
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise UserError(f"MLflow tracking URI {uri!r}: directory {str(folder)!r} does not exist")
    elif parsed.scheme in ("", "file"):
        raise UserError(
            f"MLflow tracking URI {uri!r} is a plain file store, which MLflow 3 refuses; "
            "use sqlite:///path/mlflow.db or an http(s):// server"
        )


def client(uri: str) -> MlflowClient:
    """An MLflow client bound to `uri` (never the process-global tracking URI)."""
    # No progress bar on the console for each artifact a report downloads (read at download time), and no
    # INFO lines of a new store's migrations ("Creating initial MLflow database tables..."): importing mlflow
    # sets its logger's level, so kn_dist.runtime.quiet_ray_logs' setting is repeated here.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(uri)


def git_revision() -> str:
    """HEAD of the kn_dist checkout (+"-dirty" with uncommitted changes), or "unknown" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers, plus Python and CUDA."""
    versions = {"python": platform.python_version(), "cuda": str(torch.version.cuda), "torch": torch.__version__}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def derived_params(cfg: ExperimentConfig) -> dict[str, str]:
    """Params that follow from the config but are worth reading at a glance in the MLflow UI.

    `derived.global_batch_size`: the batch one optimizer step sees (batch_size is per worker, DESIGN.md §9;
    scaling.global_batch_size when set, kept on any world size by gradient accumulation).
    `derived.lr_per_256`: optim.lr x 256 / global batch, the rate the linear scaling rule compares
    (Goyal et al. 2017: 0.1 per 256 images for ImageNet ResNets).
    `derived.kn_eval`: how KernelNorm evaluates — "deterministic" (kn_dist's default) or "stochastic"
    (dropout on the statistics left on in eval, as the official code and its published accuracies).
    """
    norm = cfg.model.norm or ""
    kn_eval = "n/a"
    if is_kn(norm):
        kn_eval = "stochastic" if cfg.model.kwargs.get("kn_eval_dropout") else "deterministic"
    global_batch = cfg.scaling.global_batch_size or cfg.data.batch_size * cfg.scaling.num_workers
    return {
        "derived.global_batch_size": str(global_batch),
        "derived.lr_per_256": f"{cfg.optim.lr * 256 / global_batch:.6g}",
        "derived.kn_eval": kn_eval,
    }


def run_tags(
    cfg: ExperimentConfig,
    *,
    run_key: str,
    kind: str = "train",
    trial_id: str | None = None,
    sweep: str | None = None,
    parent_run_id: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The provenance tags of one run: model, resolved norm, dataset, git revision, versions, kind.

    Sweep and study parent runs (kind "sweep" / "study") span models and norms and carry neither tag.
    """
    tags = {
        "kn_dist.dataset": cfg.data.dataset,
        "kn_dist.git_revision": git_revision(),
        "kn_dist.versions": json.dumps(package_versions(), sort_keys=True),
        "kn_dist.kind": kind,
        RUN_KEY_TAG: run_key,
    }
    if kind not in PARENT_KINDS:
        tags["kn_dist.model"], tags["kn_dist.norm"] = cfg.model.name, str(cfg.model.norm)
    if trial_id is not None:
        tags["kn_dist.trial_id"] = trial_id
    if sweep is not None:
        tags["kn_dist.sweep"] = sweep
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra or {})
    return tags


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of experiment `name`, created if needed (SQLite stores keep artifacts beside the .db file)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        location = (Path(client.tracking_uri[len("sqlite:///") :]).parent / "mlruns").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def find_run(client: MlflowClient, experiment: str, run_key: str) -> str | None:
    """The newest run of `experiment` tagged with `run_key`, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    key = run_key.replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", order_by=["start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


def create_run(client: MlflowClient, experiment: str, cfg: ExperimentConfig, tags: dict[str, str]) -> str:
    """A new run named after the config, holding the flattened config (and `derived_params`) as params."""
    run = client.create_run(experiment_id(client, experiment), run_name=cfg.name, tags=tags)
    log_params(client, run.info.run_id, cfg)
    return run.info.run_id


def find_or_create_run(client: MlflowClient, experiment: str, cfg: ExperimentConfig, tags: dict[str, str]) -> str:
    """Reuse the run carrying the same run key (a restarted trial), else create one."""
    run_id = find_run(client, experiment, tags[RUN_KEY_TAG])
    if run_id is None:
        return create_run(client, experiment, cfg, tags)
    mark_running(client, run_id)
    return run_id


def mark_running(client: MlflowClient, run_id: str) -> None:
    """A resumed run is RUNNING again (its earlier attempt ended KILLED or FAILED)."""
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def append_tag(client: MlflowClient, run_id: str, key: str, value: str) -> None:
    """Tag `key` = its previous value + "," + `value` (a history kept in one tag)."""
    previous = client.get_run(run_id).data.tags.get(key)
    client.set_tag(run_id, key, f"{previous},{value}" if previous else value)


def log_params(client: MlflowClient, run_id: str, cfg: ExperimentConfig) -> None:
    """Flattened config plus `derived_params` as params (MLflow takes at most 100 per batch)."""
    flat = {**{k: str(v) for k, v in to_flat_dict(cfg).items()}, **derived_params(cfg)}
    params = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def log_text_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Free-form params (a sweep's `tune.*` section), each cut to MLflow's 6,000-character limit."""
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def child_runs(client: MlflowClient, experiment: str, parent_run_id: str, status: str | None = None) -> list:
    """Runs nested under `parent_run_id` (tag mlflow.parentRunId), optionally only those in `status`."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    where = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    if status is not None:
        where += f" and attributes.status = '{status}'"
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], where, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def param_differences(client: MlflowClient, run_id: str, cfg: ExperimentConfig) -> list[str]:
    """Config keys whose value differs from the params the run was started with.

    scaling.num_workers counts: batch_size is per worker, so another world size is another global batch
    (another experiment), and `kn-dist train --resume` refuses it with this list; unless
    scaling.global_batch_size fixes the global batch, which accumulation keeps on any world size: then a
    run may continue on fewer (or more) workers (`WORLD_KEYS`). Where the loop runs (`EXECUTION_ONLY`)
    does not change the experiment and may differ.
    """
    logged = client.get_run(run_id).data.params
    free = EXECUTION_ONLY | (WORLD_KEYS if cfg.scaling.global_batch_size is not None else frozenset())
    return sorted(k for k, v in to_flat_dict(cfg).items() if k in logged and logged[k] != str(v) and k not in free)


# Config keys that say how a run executes, not what it computes: a resume may change them.
EXECUTION_ONLY = frozenset({"scaling.in_process"})
# With a fixed global batch, the world a run continues on is execution too (metric world_size records it).
WORLD_KEYS = frozenset({"scaling.num_workers", "scaling.min_workers", "scaling.placement_strategy"})


def logged_epochs(client: MlflowClient, run_id: str, key: str = "val_top1") -> set[int]:
    """Steps (epochs) for which `key` is already recorded: a restart must not log them twice."""
    return {m.step for m in client.get_metric_history(run_id, key)}


def log_epoch(client: MlflowClient, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    """One value per metric at step = epoch, in one request."""
    now = int(time.time() * 1000)  # MLflow timestamps are milliseconds since 1970
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])


def log_final(client: MlflowClient, run_id: str, cfg: ExperimentConfig, state_dict: dict[str, Any]) -> None:
    """Artifacts: the resolved config (loadable by config.load) and the final weights."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(to_yaml(cfg))
        client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        (Path(tmp) / "weights.pt").write_bytes(buffer.getvalue())
        client.log_artifact(run_id, str(Path(tmp) / "weights.pt"), artifact_path="model")


TEST_EXAMPLES_ARTIFACT = "test_examples.npz"  # a final's per-example test record: correct (0/1) and label


def log_test_examples(client: MlflowClient, run_id: str, correct: Any, labels: Any) -> None:
    """The final's per-example test record as an artifact (numpy arrays, one entry per test example)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TEST_EXAMPLES_ARTIFACT
        np.savez_compressed(path, correct=correct, label=labels)
        client.log_artifact(run_id, str(path))


def load_test_examples(client: MlflowClient, run_id: str) -> Any | None:
    """The `correct` array of a final's per-example test record, or None when the run has none."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, TEST_EXAMPLES_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            return None
        with np.load(path) as record:
            return record["correct"].copy()


def finish(client: MlflowClient, run_id: str, ok: bool = True, status: str | None = None) -> None:
    """Mark the run FINISHED or FAILED (or an explicit MLflow status such as KILLED)."""
    client.set_terminated(run_id, status or RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def close_children(
    client: MlflowClient, experiment: str, parent_run_id: str, failed_run_keys: set[str], stopped_run_keys: set[str]
) -> None:
    """End the children a Tune run left RUNNING: FAILED where the trial failed; KILLED and tagged
    kn_dist.stopped_early where a scheduler stopped it (its worker was killed mid-run or its segment ended
    and it was not promoted); KILLED otherwise (interrupted: a later pass continues it)."""
    for run in child_runs(client, experiment, parent_run_id, status="RUNNING"):
        key = run.data.tags.get(RUN_KEY_TAG)
        if key in failed_run_keys:
            finish(client, run.info.run_id, ok=False)
            continue
        if key in stopped_run_keys:
            client.set_tag(run.info.run_id, STOPPED_TAG, "true")
        finish(client, run.info.run_id, status="KILLED")


def log_study_results(client: MlflowClient, run_id: str, metrics: dict[str, float], report_dir: Path) -> None:
    """A study's per-cell summary metrics and its report folder (report.md + PNGs) on the study run."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])
    client.log_artifacts(run_id, str(report_dir), artifact_path="report")
