"""Fault tolerance (issue 8): SIGKILL one Ray Train worker process mid-run during a real 2-worker DDP
training. Ray Train restarts the worker group (checkpoint.max_failures = 1), the run continues from its
last checkpoint and finishes every epoch, and MLflow holds a single run with one value per epoch.

Evidence comes from outside kn_dist: the worker pid and the restart from Ray's GCS actor table, the
epochs of the checkpoints from the storage directory Ray Train writes, the metrics from MlflowClient."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import ray
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 3


@pytest.fixture
def local_ray(monkeypatch):
    # A slow start of the worker group (a loaded machine) must not use up max_failures; the raylet
    # inherits this process's environment.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _config(tmp):
    from kn_dist import config

    return config.from_dict(
        {
            "name": "ft",
            "seed": 0,
            "epochs": EPOCHS,
            # Digits at 16 px (no flips: a mirrored digit is another symbol).
            "data": {
                "dataset": "digits",
                "root": str(tmp / "data16"),
                "image_size": 16,
                "batch_size": 32,
                "crop_padding": 1,
                "hflip": False,
            },
            "model": {
                "name": "convmixer_256_8",
                "norm": "kn",
                "kwargs": {"input_size": 16, "patch_size": 4, "kernel_size": 3},
            },
            "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01},
            "schedule": {"name": "cosine"},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            # Keep every checkpoint so the test can list the epochs that were checkpointed.
            "checkpoint": {"storage_path": str(tmp / "runs"), "every_epochs": 1, "keep": 2 * EPOCHS, "max_failures": 1},
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "fault_tolerance"},
        }
    )


def _committed(run_dir) -> list[dict]:
    """Checkpoints Ray Train has registered for the run (its snapshot file; what a restart resumes from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or being written
        return []


def _checkpoints(run_dir) -> list:
    """The checkpoint files Ray Train persisted for the run (one directory per reported checkpoint)."""
    from kn_dist.worker import CHECKPOINT_FILE

    return sorted(run_dir.glob(f"*/{CHECKPOINT_FILE}")) if run_dir.is_dir() else []


def _alive_train_workers() -> dict[str, dict]:
    return {
        a: info
        for a, info in ray._private.state.actors().items()
        if info["ActorClassName"] == "RayTrainWorker" and info["State"] == "ALIVE"
    }


def _logged_epochs(uri: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fault_tolerance")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    return sorted(m.step for r in runs for m in client.get_metric_history(r.info.run_id, "val_top1"))


def test_worker_killed_mid_run_recovers_from_checkpoint(local_ray, tmp_path):
    from mlflow.tracking import MlflowClient

    from kn_dist.trainer import run_training
    from kn_dist.worker import CHECKPOINT_FILE

    cfg = _config(tmp_path)
    run_dir = tmp_path / "runs" / "ft"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(cfg)
        except BaseException as err:  # surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()

    # Wait until Ray Train has registered the first checkpoint, then kill one worker while the next
    # epoch runs (a checkpoint directory alone is not enough: it is registered after the report barrier).
    deadline = time.monotonic() + 600
    while not _committed(run_dir):
        assert thread.is_alive(), f"training ended before its first checkpoint: {outcome}"
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.2)
    committed_at_kill = _committed(run_dir)
    time.sleep(1.0)  # into the next epoch's training steps, not at its boundary
    workers = _alive_train_workers()
    assert len(workers) == 2
    victim_id, victim = sorted(workers.items())[-1]
    killed_at = time.time()
    os.kill(victim["Pid"], signal.SIGKILL)
    logged_at_kill = _logged_epochs(cfg.tracking.uri)
    assert len(committed_at_kill) < EPOCHS and len(logged_at_kill) < EPOCHS, "the kill came too late to test anything"

    thread.join(timeout=900)
    assert not thread.is_alive(), "training did not finish within 15 minutes of the kill"
    assert "error" not in outcome, f"run failed instead of recovering: {outcome.get('error')!r}"
    assert outcome["result"].metrics["epoch"] == EPOCHS

    # Ray restarted the worker group: the victim is dead and new workers were started.
    table = {a: i for a, i in ray._private.state.actors().items() if i["ActorClassName"] == "RayTrainWorker"}
    assert table[victim_id]["State"] == "DEAD"
    assert len(table) >= 4, f"expected a second worker group after the failure, saw {len(table)} workers"

    # Continued from the last registered checkpoint: every epoch is checkpointed exactly once, and the
    # checkpoints registered before the kill were kept as they were (a restart from scratch would have
    # recomputed and rewritten them).
    final = _committed(run_dir)
    assert [r["metrics"]["epoch"] for r in final] == list(range(1, EPOCHS + 1)), final
    for before in committed_at_kill:
        assert before in final, f"checkpoint {before['checkpoint_dir_name']} was recomputed after the failure"
        state = run_dir / before["checkpoint_dir_name"] / CHECKPOINT_FILE
        assert state.stat().st_mtime < killed_at, f"{state} was rewritten after the failure"
    epochs = sorted(torch.load(p, map_location="cpu", weights_only=False)["epoch"] for p in _checkpoints(run_dir))
    assert epochs == list(range(1, EPOCHS + 1)), epochs

    # MLflow: a single run, one value per epoch for every per-epoch metric, finished.
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("fault_tolerance")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), f"{key}: {steps}"
    assert run.info.status == "FINISHED"
    # Epochs logged before the failure are the ones of the checkpoints it resumed from.
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top1")}
    for before in committed_at_kill:
        assert logged[before["metrics"]["epoch"]] == pytest.approx(before["metrics"]["val_top1"])
    assert client.get_metric_history(run.info.run_id, "val_top1")[-1].value > 0.5
