"""Multi-node for real (issue 8): a Ray cluster of two raylet nodes on this machine
(`ray.cluster_utils.Cluster`, 1 CPU each). A 2-worker DDP training with placement strategy
STRICT_SPREAD puts its workers on different nodes (read back from Ray's GCS actor table, not from
kn_dist), and its result equals the same training packed onto one node (STRICT_PACK): same final
weights, same per-epoch validation metrics."""

from __future__ import annotations

import pytest
import ray
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 2


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    # On a loaded machine starting a worker group can exceed Ray Train's 60 s default; a retried group
    # would add workers to the actor table (the raylets inherit this process's environment).
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        patch.undo()


def _config(tmp, name: str, strategy: str):
    from kn_dist import config

    return config.from_dict(
        {
            "name": name,
            "seed": 0,
            "epochs": EPOCHS,
            "deterministic": True,
            # Digits at 16 px; no random augmentation, so both runs see identical batches.
            "data": {
                "dataset": "digits",
                "root": str(tmp / "data16"),
                "image_size": 16,
                "batch_size": 32,
                "crop_padding": 0,
                "hflip": False,
                "num_workers": 1,
            },
            # ConvMixer with KernelNorm (no statistics dropout: no randomness besides the seeded init).
            "model": {
                "name": "convmixer_256_8",
                "norm": "kn",
                "kwargs": {"input_size": 16, "patch_size": 4, "kernel_size": 3, "kn_dropout_p": 0.0},
            },
            "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01},
            "schedule": {"name": "cosine"},
            # Half a CPU per worker: both fit one 1-CPU node (STRICT_PACK) or one per node (STRICT_SPREAD).
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": strategy},
            "checkpoint": {"storage_path": str(tmp / "runs")},
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "multinode"},
        }
    )


def _train_workers() -> dict[str, dict]:
    """Ray Train V2 worker actors (alive or dead) by actor id, straight from the GCS actor table."""
    return {a: info for a, info in ray._private.state.actors().items() if info["ActorClassName"] == "RayTrainWorker"}


def _final_weights(uri: str, run_id: str, tmp) -> dict[str, torch.Tensor]:
    from mlflow.tracking import MlflowClient

    path = MlflowClient(uri).download_artifacts(run_id, "model/weights.pt", str(tmp))
    return torch.load(path, map_location="cpu")


def _run(tmp, name: str, strategy: str, address: str):
    """Train once; return (node ids of its workers, MLflow run id, val_top1 history, weights)."""
    from mlflow.tracking import MlflowClient

    from kn_dist.trainer import run_training

    before = set(_train_workers())
    cfg = _config(tmp, name, strategy)
    result = run_training(cfg, address=address)
    assert result.metrics["epoch"] == EPOCHS
    # The worker group that trained is the last one started (a group that timed out while starting is
    # replaced by a new one).
    workers = sorted((w for a, w in _train_workers().items() if a not in before), key=lambda w: w["StartTime"])
    nodes = sorted(w["Address"]["NodeID"] for w in workers[-cfg.scaling.num_workers :])

    uri = cfg.tracking.uri
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("multinode")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.params.get("name") == name]
    assert len(runs) == 1, f"{name}: expected one MLflow run, got {len(runs)}"
    run_id = runs[0].info.run_id
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_top1"))
    (tmp / name).mkdir()
    return nodes, run_id, history, _final_weights(uri, run_id, tmp / name)


def test_strict_spread_spans_nodes_and_matches_one_node(two_nodes, tmp_path):
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2

    spread_nodes, _, spread_hist, spread_w = _run(tmp_path, "spread", "STRICT_SPREAD", two_nodes.address)
    pack_nodes, _, pack_hist, pack_w = _run(tmp_path, "pack", "STRICT_PACK", two_nodes.address)

    assert len(spread_nodes) == 2 and len(set(spread_nodes)) == 2, f"workers share a node: {spread_nodes}"
    assert set(spread_nodes) == node_ids
    assert len(pack_nodes) == 2 and len(set(pack_nodes)) == 1, f"packed workers span nodes: {pack_nodes}"

    assert [s for s, _ in spread_hist] == [s for s, _ in pack_hist] == list(range(1, EPOCHS + 1))
    assert [v for _, v in spread_hist] == pytest.approx([v for _, v in pack_hist], abs=1e-6)
    assert spread_hist[-1][1] > 0.5, "training on digits should be well above chance (10 %)"
    assert spread_w.keys() == pack_w.keys()
    for key in spread_w:
        torch.testing.assert_close(spread_w[key], pack_w[key], rtol=1e-5, atol=1e-6, msg=key)
