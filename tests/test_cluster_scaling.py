"""Sweeps on clusters that change under them (issue 12): Ray's own local autoscaler with fake nodes, and
a multi-node cluster that loses the node running a trial.

1. `ray.cluster_utils.AutoscalingCluster`: a head with 0 CPUs (it cannot hold a trial, like the shipped
   clusters' GPU-less heads) and a node type of 1 CPU, min 0, max 4. A 4-trial sweep must ask the
   autoscaler for nodes and run at least 3 trials at once: overlap measured from MLflow's own run start
   and end times, not from kn_dist's bookkeeping.
2. `ray.cluster_utils.Cluster`: a 0-CPU head and two 1-CPU nodes; the node running a trial is removed
   after the trial's first checkpoint. Tune restarts the trial on the other node from that checkpoint;
   MLflow holds one run with one value per epoch, started on two nodes.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _sweep(tmp: Path, name: str, *, trials: int, epochs: int, max_failures: int = 0) -> Path:
    raw = {
        "name": name,
        "epochs": epochs,
        "data": {"dataset": "digits", "root": str(tmp / "data16"), "image_size": 16, "batch_size": 64},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"storage_path": str(tmp / "runs"), "max_failures": max_failures},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": name},
        "tune": {
            "num_samples": trials,
            "scheduler": {"name": "fifo"},
            "space": {"optim.lr": {"loguniform": [0.001, 0.005]}},
            "architectures": [
                {
                    "model": "convmixer_256_8",
                    "kwargs": {"input_size": 16, "patch_size": 4, "kernel_size": 3},
                    "norms": ["bn"],
                }
            ],
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _trials(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`kn_dist.kind` = 'trial'") if exp else []


def _peak_overlap(runs: list) -> int:
    """Most runs alive at one instant, from MLflow's start_time / end_time (ms)."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    peak = alive = 0
    for _, step in events:
        alive += step
        peak = max(peak, alive)
    return peak


# Ray's fake multi-node provider: nodes are raylets on this machine, started and stopped by Ray's own
# autoscaler (its keys as in Ray's fake_multi_node/example.yaml, which the ray 2.60 wheel does not ship).
FAKE_PROVIDER_BASE = {
    "cluster_name": "kn_dist_fake",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


@pytest.fixture
def autoscaling_cluster(monkeypatch):
    import ray
    from ray.cluster_utils import AutoscalingCluster

    class Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            config = {**FAKE_PROVIDER_BASE, "available_node_types": dict(worker_node_types)}
            config["available_node_types"]["ray.head.default"] = {
                "resources": head_resources,
                "node_config": {},
                "max_workers": 0,
            }
            if autoscaler_v2:
                from ray.cluster_utils import FAKE_HEAD_NODE_ID

                config["provider"] = {**config["provider"], "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
            return {**config, **config_kwargs}

    # Ray's autoscaler monitor (a process of its own) fills the fake provider's defaults from this file of
    # the Ray package, which the 2.60 wheel lacks: put the base there for the test, and take it away after.
    example = Path(ray.__file__).parent / "autoscaler" / "_private" / "fake_multi_node" / "example.yaml"
    created = not example.exists()
    if created:
        example.parent.mkdir(parents=True, exist_ok=True)
        head = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
        example.write_text(yaml.safe_dump({**FAKE_PROVIDER_BASE, "available_node_types": head}))
    # AutoscalingCluster runs the `ray` CLI: the one of this virtual environment.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("ray") == str(Path(sys.executable).parent / "ray")
    cluster = Cluster(
        head_resources={"CPU": 0},
        worker_node_types={"cpu1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 4}},
        autoscaler_v2=True,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if created:
            example.unlink()


def test_sweep_grows_the_autoscaling_cluster_to_three_trials_at_once(autoscaling_cluster, tmp_path, capsys):
    from kn_dist.tune import run_sweep

    path = _sweep(tmp_path, "scale", trials=4, epochs=3)
    start = time.monotonic()
    results = run_sweep(path, address="auto")
    seconds = time.monotonic() - start
    out = capsys.readouterr().out
    assert "up to 4 at once (what the autoscaler can provide" in out, out[-2000:]
    assert len(results) == 4 and not results.errors
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = _trials(uri, "scale")
    assert len(trials) == 4 and len({t.data.tags["mlflow.parentRunId"] for t in trials}) == 1
    peak = _peak_overlap(trials)
    print(f"autoscaling sweep: peak {peak} trials at once, {seconds:.0f} s")  # for the note (pytest -s)
    assert peak >= 3, f"only {peak} trials ran at once"


@pytest.fixture
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_trial_moves_to_another_node_when_its_node_is_lost(three_nodes, tmp_path):
    from kn_dist.tune import run_sweep

    cluster, workers = three_nodes
    path = _sweep(tmp_path, "lost", trials=1, epochs=3, max_failures=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome: dict = {}

    def sweep() -> None:
        try:
            outcome["results"] = run_sweep(path, address=cluster.address)
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    deadline = time.monotonic() + 420
    victim = None
    while victim is None:  # the node that runs the trial, once its epoch-1 checkpoint exists
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.5)
        (trial,) = _trials(uri, "lost") or (None,)
        if trial is None or "val_top1" not in trial.data.metrics:
            continue
        folder = tmp_path / "runs" / "lost" / f"trial_{trial.data.tags['kn_dist.trial_id']}"
        if list(folder.glob("checkpoint_*")):
            time.sleep(2)  # Tune records the checkpoint in its state after the report
            node_id = trial.data.tags["kn_dist.nodes"]
            victim = next(w for w in workers if w.node_id == node_id)
    cluster.remove_node(victim)
    thread.join(timeout=420)
    assert not thread.is_alive() and "error" not in outcome, outcome
    (trial,) = _trials(uri, "lost")
    nodes = trial.data.tags["kn_dist.nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] == victim.node_id and nodes[1] != victim.node_id
    assert trial.info.status == "FINISHED" and trial.data.tags["kn_dist.resumed_from"] in ("1", "2")
    client = MlflowClient(uri)
    for key in ("val_top1", "train_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(trial.info.run_id, key)) == [1, 2, 3], key
