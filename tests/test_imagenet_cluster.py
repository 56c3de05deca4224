"""ImageNet-style training across nodes (issue 26), for real, on this machine.

A Ray cluster of three raylets (`ray.cluster_utils.Cluster`): a head without CPUs (it holds the driver,
Ray Train's controller and the autoscaling coordinator, like the shipped clusters' GPU-less heads) and
two 1-CPU nodes. An imagefolder of real JPEGs (sklearn digits at random sizes) is written to FFCV (half
JPEG, half raw), then one run trains for two epochs with progressive resizing (16 px, then 24 px), seeded
RandomResizedCrop + flip, test-time flip, a global batch of 16 and elastic workers (1..2), gloo:

- epoch 1 runs on two Ray Train workers, one per node (read back from Ray's GCS actor table);
- in epoch 2 one rank stalls (the fault drill's "hang") and the test removes a worker node: Ray Train
  restarts the run from the epoch-1 checkpoint on the one node left, and the run keeps its global
  batch by accumulating two micro-batches per step;
- a one-worker run in this process (no Ray) trains the same config from scratch as the reference.

DDP promises equal steps here (a batch-independent KernelNorm ConvMixer without dropout, the same 16
samples per step on any world size): the final weights and every epoch's metrics must equal the
reference's up to floating-point summation order. MLflow (read with MlflowClient) must hold one run for
the elastic run, each epoch once, resumed from epoch 1, with the resolution of each epoch (16, 24), the
world it ran on (2, 1) and its accumulation (1, 2).
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch
from imagefolder_helpers import write_digit_jpegs
from mlflow_helpers import the_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS, GLOBAL_BATCH, PER_WORKER = 2, 16, 8


@pytest.fixture(scope="module")
def three_raylets():
    from ray.cluster_utils import Cluster

    patch = pytest.MonkeyPatch()
    # Right after a node dies, Ray Train's elastic policy still counts it (the autoscaling coordinator
    # refreshes its view every 20 s) and waits for a placement group of the old size; after this timeout
    # it retries on the workers the cluster has (default 60 s; the raylets inherit this environment). The
    # first start finds its two CPUs free at once, so 10 s only shortens the wait after the loss.
    patch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        patch.undo()


def _config(tmp, name: str, workers: int, min_workers: int | None, store: str = "mlflow.db"):
    from kn_dist import config

    return config.from_dict(
        {
            "name": name,
            "seed": 3,
            "epochs": EPOCHS,
            "deterministic": True,
            "data": {
                "dataset": "imagefolder",
                "root": str(tmp / "data"),
                "image_size": 24,
                "batch_size": PER_WORKER,
                "num_workers": 1,
                "progressive": {"min_res": 16, "max_res": 24, "start_ramp": 0, "end_ramp": 1, "step": 8},
                "tta_flip": True,
            },
            # KernelNorm ConvMixer, no statistics dropout: batch-independent, no randomness but the seeded init.
            "model": {
                "name": "convmixer_256_8",
                "norm": "kn",
                "kwargs": {"input_size": 24, "patch_size": 4, "kernel_size": 3, "kn_dropout_p": 0.0},
            },
            # SGD: its step is linear in the gradient, so DDP's equal gradients give equal weights. (Adam divides by
            # sqrt(v): a gradient that is zero but for rounding moves a weight by +-lr, whichever sign it rounds to.)
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005},
            "schedule": {"name": "cosine"},
            "scaling": {
                "num_workers": workers,
                "min_workers": min_workers,
                "global_batch_size": GLOBAL_BATCH,
                "placement_strategy": "SPREAD",
            },
            "checkpoint": {"storage_path": str(tmp / "runs"), "keep": 4, "max_failures": 1},
            "tracking": {"uri": f"sqlite:///{tmp / store}", "experiment": name},
        }
    )


def _history(client, run, key: str) -> list[float]:
    metrics = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    assert [m.step for m in metrics] == list(range(1, EPOCHS + 1)), f"{key}: one value per epoch"
    return [m.value for m in metrics]


def _weights(client, run, tmp) -> dict[str, torch.Tensor]:
    folder = tmp / run.info.run_id
    folder.mkdir()
    return torch.load(client.download_artifacts(run.info.run_id, "model/weights.pt", str(folder)), map_location="cpu")


def _train_workers() -> dict[str, dict]:
    return {a: info for a, info in ray._private.state.actors().items() if info["ActorClassName"] == "RayTrainWorker"}


def test_elastic_imagenet_run_loses_a_node_and_matches_one_worker(three_raylets, tmp_path):
    from kn_dist import tracking
    from kn_dist.data import write_dataset
    from kn_dist.models import create_model
    from kn_dist.trainer import prepare_config, run_training

    cluster, worker_nodes = three_raylets
    source = write_digit_jpegs(tmp_path / "src", train_per_class=10, val_per_class=3)
    write_dataset(
        "imagefolder", tmp_path / "data" / "imagefolder", source_dir=source, max_side=40, compress_probability=0.5
    )
    cfg = _config(tmp_path, "elastic", workers=2, min_workers=1)
    run_dir = tmp_path / "runs" / "elastic"
    outcome: dict = {}
    # The reference: the same training on one worker in this process (no Ray), while Ray starts the workers.
    ref_cfg = _config(tmp_path, "reference", workers=1, min_workers=None, store="reference.db")

    def train_reference() -> None:
        try:
            outcome["reference"] = run_training(ref_cfg)
        except BaseException as err:  # surfaced below
            outcome["reference_error"] = err

    reference = threading.Thread(target=train_reference, daemon=True)
    reference.start()

    def train() -> None:
        try:
            drill = {"fail_after_epoch": 1, "fail_rank": 1, "fail_mode": "hang"}
            outcome["result"] = run_training(cfg, address=cluster.address, fault_drill=drill)
        except BaseException as err:  # surfaced below
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while True:  # epoch 1 checkpointed and logged; rank 1 then stalls in epoch 2
        assert thread.is_alive(), f"the run ended before its first checkpoint: {outcome}"
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        client, run = the_run(cfg)
        if run and client.get_metric_history(run.info.run_id, "val_top1") and (run_dir / "epoch_0001").is_dir():
            break
        time.sleep(0.5)
    # Ray Train registers the checkpoint when its controller next polls the workers (its snapshot file).
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.monotonic() < deadline and not (snapshot.is_file() and "epoch_0001" in snapshot.read_text()):
        time.sleep(0.5)
    first_group = list(_train_workers().values())
    assert len(first_group) == 2, first_group
    assert len({w["Address"]["NodeID"] for w in first_group}) == 2, "the two workers share a node"
    lost = next(n for n in worker_nodes if n.node_id == first_group[-1]["Address"]["NodeID"])
    cluster.remove_node(lost)

    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish within 10 minutes of the node loss"
    assert "error" not in outcome, f"the run failed instead of resuming: {outcome.get('error')!r}"
    client, run = the_run(cfg)  # one MLflow run for the whole elastic run
    assert run.info.status == "FINISHED" and run.data.tags.get("kn_dist.resumed_from") == "1"
    assert _history(client, run, "world_size") == [2, 1]
    assert _history(client, run, "accumulation_steps") == [1, 2]  # the global batch kept: 2 x 8, then 1 x 2 x 8
    assert run.data.params["derived.global_batch_size"] == str(GLOBAL_BATCH)
    # By hand too: with a fixed global batch `kn-dist train --resume` may continue on fewer workers...
    resolved = prepare_config(cfg)  # what the run logged: paths and classes resolved
    fewer = {"num_workers": 1, "min_workers": None}
    one = resolved.model_copy(update={"scaling": resolved.scaling.model_copy(update=fewer)})
    assert tracking.param_differences(client, run.info.run_id, one) == []
    # ...and without one, another world size is another global batch: refused.
    loose = one.model_copy(update={"scaling": one.scaling.model_copy(update={"global_batch_size": None})})
    assert "scaling.num_workers" in tracking.param_differences(client, run.info.run_id, loose)

    reference.join(timeout=300)
    assert "reference" in outcome, f"the one-worker reference run failed: {outcome.get('reference_error')!r}"
    ref_client, ref = the_run(ref_cfg)
    assert _history(ref_client, ref, "accumulation_steps") == [2, 2]
    # ffcv-imagenet's ramp from 16 to 24 px over epochs 0..1: the resumed epoch trained at the second side.
    assert _history(client, run, "resolution") == _history(ref_client, ref, "resolution") == [16, 24]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "lr"):
        assert _history(client, run, key) == pytest.approx(_history(ref_client, ref, key), rel=1e-4, abs=1e-5), key
    ours, theirs = _weights(client, run, tmp_path), _weights(ref_client, ref, tmp_path)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    # ...and the equality is not that of two untouched models: every weight moved from its seeded init.
    torch.manual_seed(cfg.seed)
    init = create_model("convmixer_256_8", norm="kn", num_classes=10, **cfg.model.kwargs).state_dict()
    moved = [k for k in init if (ours[k] - init[k]).abs().max() > 1e-4]
    assert len(moved) == len(init), sorted(set(init) - set(moved))
