"""`kn-dist train` end to end under a real local Ray, real FFCV data and a real MLflow store (issue 6).

Two TorchTrainer runs in all (they cost ~40 s each on 2 cores): the digits_quick run through the CLI
(2 workers), and a one-worker run begun in kn-dist's own process (kn_dist.in_process), resumed under
Ray Train, checked against the same run uninterrupted in process. Bad configs (exit 2, one line, nothing
started) are tests/test_bad_input.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from kn_dist import cli, config, data, engine, tracking
from kn_dist.errors import UserError
from kn_dist.models import create_model
from kn_dist.trainer import run_training, runs_in_process
from kn_dist.worker import CHECKPOINT_FILE

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "experiments" / "digits_quick.yaml"


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def digits_run(ray_local, tmp_path_factory, digits_root):
    """`kn-dist train experiments/digits_quick.yaml` (in-process CLI, reusing the test Ray)."""
    work = tmp_path_factory.mktemp("digits")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    overrides = [f"checkpoint.storage_path={work / 'runs'}", f"data.root={digits_root}"]
    code = cli.main(["train", str(DIGITS), *overrides, "--tracking-uri", uri])
    return {"code": code, "uri": uri, "overrides": overrides, "work": work}


def _single_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _assert_one_value_per_epoch(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in tracking.EPOCH_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), (key, steps)
    assert len(client.get_metric_history(run_id, "num_params")) == 1


@pytest.mark.slow
@pytest.mark.ray
def test_digits_quick_reaches_95_percent_and_is_tracked(digits_run, tmp_path):
    assert digits_run["code"] == 0
    raw = config.load(DIGITS)
    client, run = _single_run(digits_run["uri"], raw.tracking.experiment)
    _assert_one_value_per_epoch(client, run.info.run_id, raw.epochs)
    val_top1 = client.get_metric_history(run.info.run_id, "val_top1")
    assert max(val_top1, key=lambda m: m.step).value >= 0.95
    assert run.info.status == "FINISHED"

    # Params: every key of the YAML file with the YAML's value (an independent source: the file itself),
    # the command line's overrides, and the derived global batch (2 workers x 64).
    params = run.data.params
    raw_yaml = yaml.safe_load(DIGITS.read_text())

    def leaves(node: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    for key, value in leaves(raw_yaml).items():
        if key not in ("checkpoint.storage_path",):
            # MLflow stores the typed config's value: an int field given as 1 reads back "1", a float "1.0".
            assert params[key] == str(value) or yaml.safe_load(params[key]) == value, (key, params[key], value)
    assert params["checkpoint.storage_path"] == str(digits_run["work"] / "runs")
    assert params["derived.global_batch_size"] == str(
        raw_yaml["data"]["batch_size"] * raw_yaml["scaling"]["num_workers"]
    )
    assert Path(params["data.train_path"]).is_file() and Path(params["data.test_path"]).is_file()
    tags = run.data.tags
    assert (tags["kn_dist.model"], tags["kn_dist.norm"], tags["kn_dist.dataset"]) == ("convmixer_256_8", "bn", "digits")
    assert tags["kn_dist.kind"] == "train" and "kn_dist.git_revision" in tags and "kn_dist.versions" in tags

    # Artifacts: the resolved config loads back; the final weights reproduce the logged accuracy when
    # evaluated here in one process (the 2-rank metric counted each validation image exactly once).
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    resolved = config.load(local / "config.yaml")
    assert {k: str(v) for k, v in config.to_flat_dict(resolved).items()} == {
        k: v for k, v in params.items() if not k.startswith("derived.")
    }
    model = create_model("convmixer_256_8", norm="bn", num_classes=10, patch_size=8)
    model.load_state_dict(torch.load(local / "model" / "weights.pt"))
    _, val_loader = data.loaders(resolved.data, 0, 1, torch.device("cpu"))
    here = engine.evaluate(model, val_loader, device=torch.device("cpu"))
    assert here["images"] == data.open_beton(resolved.data.val_path).num_samples  # every val image once
    assert here["top1"] == pytest.approx(max(val_top1, key=lambda m: m.step).value, abs=1e-9)


def _weights(result) -> dict:
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.ray
def test_resume_across_process_and_ray_train_gives_the_uninterrupted_weights(ray_local, tmp_path, digits_root):
    """One worker: epoch 1 in kn-dist's own process, the rest resumed under Ray Train (a worker actor),
    against the same run uninterrupted in process. Same weights, bit for bit; the same MLflow records."""
    base = [f"data.root={digits_root}", "scaling.num_workers=1", "epochs=3"]
    cfg = config.load(
        DIGITS, [*base, f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'a.db'}"]
    )
    assert runs_in_process(cfg, None) and not runs_in_process(cfg.model_copy(deep=True), "auto")
    first = run_training(cfg, stop_after_epoch=1)
    assert first.metrics["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "runs" / cfg.name).iterdir()) == ["epoch_0001"]
    with pytest.raises(UserError, match="pass --resume"):
        run_training(cfg)  # an existing run is never silently restarted or overwritten
    on_ray = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"in_process": False})})
    final = run_training(on_ray, resume=True)
    assert final.metrics["epoch"] == cfg.epochs

    client, run = _single_run(cfg.tracking.uri, cfg.tracking.experiment)  # the same MLflow run continued
    _assert_one_value_per_epoch(client, run.info.run_id, cfg.epochs)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kn_dist.resumed_from"] == "1"  # restored from the epoch-1 checkpoint, not from scratch
    nodes = run.data.tags["kn_dist.nodes"].split(",")
    assert nodes[0].startswith("local:") and len(nodes) == 2 and len(nodes[1]) == 56  # then a Ray node id

    whole_cfg = config.load(
        DIGITS, [*base, f"checkpoint.storage_path={tmp_path / 'whole'}", f"tracking.uri=sqlite:///{tmp_path / 'b.db'}"]
    )
    reference = _weights(run_training(whole_cfg))
    resumed = _weights(final)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    whole_client, whole = _single_run(whole_cfg.tracking.uri, cfg.tracking.experiment)
    for key in tracking.EPOCH_METRICS:
        if key in ("epoch_seconds", "images_per_s"):
            continue
        a = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        b = [m.value for m in sorted(whole_client.get_metric_history(whole.info.run_id, key), key=lambda m: m.step)]
        assert a == b, key
    differ = {k for k in run.data.params if run.data.params[k] != whole.data.params.get(k)}
    assert differ == {"checkpoint.storage_path", "tracking.uri"}, differ
