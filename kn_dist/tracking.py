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

from kn_dist.config import ExperimentConfig, to_flat_dict, to_yaml
from kn_dist.errors import UserError

RUN_KEY_TAG = "kn_dist.run_key"  # stable identity of a training run across restarts (see find_or_create_run)
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


def run_tags(
    cfg: ExperimentConfig,
    *,
    norm: str,
    run_key: str,
    kind: str = "train",
    trial_id: str | None = None,
    sweep: str | None = None,
    parent_run_id: str | None = None,
) -> dict[str, str]:
    """The provenance tags of one run (contract: model, norm resolved, dataset, git revision, versions)."""
    tags = {
        "kn_dist.model": cfg.model.name,
        "kn_dist.norm": norm,
        "kn_dist.dataset": cfg.data.dataset,
        "kn_dist.git_revision": git_revision(),
        "kn_dist.versions": json.dumps(package_versions(), sort_keys=True),
        "kn_dist.kind": kind,
        RUN_KEY_TAG: run_key,
    }
    if trial_id is not None:
        tags["kn_dist.trial_id"] = trial_id
    if sweep is not None:
        tags["kn_dist.sweep"] = sweep
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
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
    """A new run named after the config, holding the flattened config as params."""
    run = client.create_run(experiment_id(client, experiment), run_name=cfg.name, tags=tags)
    log_params(client, run.info.run_id, cfg)
    return run.info.run_id


def find_or_create_run(client: MlflowClient, experiment: str, cfg: ExperimentConfig, tags: dict[str, str]) -> str:
    """Reuse the run carrying the same run key (a restarted trial), else create one."""
    run_id = find_run(client, experiment, tags[RUN_KEY_TAG])
    if run_id is None:
        return create_run(client, experiment, cfg, tags)
    client.update_run(run_id, status="RUNNING")
    return run_id


def log_params(client: MlflowClient, run_id: str, cfg: ExperimentConfig) -> None:
    """Flattened config as params (MLflow takes at most 100 per batch)."""
    params = [Param(k, str(v)) for k, v in to_flat_dict(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def param_differences(client: MlflowClient, run_id: str, cfg: ExperimentConfig) -> list[str]:
    """Config keys whose value differs from the params the run was started with."""
    logged = client.get_run(run_id).data.params
    return sorted(k for k, v in to_flat_dict(cfg).items() if k in logged and logged[k] != str(v))


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


def finish(client: MlflowClient, run_id: str, ok: bool = True, status: str | None = None) -> None:
    """Mark the run FINISHED or FAILED (or an explicit MLflow status such as KILLED)."""
    client.set_terminated(run_id, status or RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))
