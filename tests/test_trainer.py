"""`kn-dist train` end to end under a real local Ray, real FFCV data and a real MLflow store (issue 6).

Three TorchTrainer runs in all (they cost ~40 s each on 2 cores): the digits_quick run through the
CLI, and the same config stopped after epoch 2 and resumed. Bad configs (exit 2, one line, nothing
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
from kn_dist.trainer import run_training
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


@pytest.mark.slow
@pytest.mark.ray
def test_resume_gives_the_uninterrupted_weights(digits_run, tmp_path, digits_root):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config.load(
        DIGITS, [f"checkpoint.storage_path={tmp_path / 'runs'}", f"data.root={digits_root}", f"tracking.uri={uri}"]
    )
    first = run_training(cfg, stop_after_epoch=2)
    assert first.metrics["epoch"] == 2
    with pytest.raises(UserError, match="pass --resume"):
        run_training(cfg)  # an existing run is never silently restarted or overwritten
    final = run_training(cfg, resume=True)
    assert final.metrics["epoch"] == cfg.epochs

    client, run = _single_run(uri, cfg.tracking.experiment)  # the same MLflow run continued
    _assert_one_value_per_epoch(client, run.info.run_id, cfg.epochs)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kn_dist.resumed_from"] == "2"  # restored from the epoch-2 checkpoint, not from scratch

    with final.checkpoint.as_directory() as folder:
        resumed = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)["model"]
    reference_client, reference_run = _single_run(digits_run["uri"], cfg.tracking.experiment)
    out = tmp_path / "reference"
    out.mkdir()
    reference_dir = reference_client.download_artifacts(reference_run.info.run_id, "model", str(out))
    reference = torch.load(Path(reference_dir) / "weights.pt")
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
