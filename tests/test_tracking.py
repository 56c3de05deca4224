"""tracking.py against a real MLflow SQLite store and real sockets (no mocks)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest
import torch
from mlflow import MlflowClient

from kn_dist import config, tracking
from kn_dist.errors import UserError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


def test_unreachable_server_fails_fast():
    start = time.perf_counter()
    with pytest.raises(UserError, match="not reachable"):
        tracking.check_reachable(f"http://127.0.0.1:{_closed_port()}", timeout=2)
    # A server that accepts but never answers: the timeout bounds the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(UserError, match="not reachable"):
            tracking.check_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1)
    assert time.perf_counter() - start < 10


def test_answering_server_passes():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}", timeout=2)
    finally:
        server.shutdown()


def test_sqlite_and_file_uris(tmp_path):
    tracking.check_reachable(f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(UserError, match="does not exist"):
        tracking.check_reachable(f"sqlite:///{tmp_path / 'missing' / 'm.db'}")
    with pytest.raises(UserError, match="file store"):
        tracking.check_reachable(str(tmp_path / "mlruns"))
    assert tracking.resolve_uri(None).startswith("sqlite:////")  # absolute: workers run elsewhere
    assert tracking.resolve_uri("sqlite:///rel.db") == f"sqlite:///{(tmp_path.cwd() / 'rel.db').resolve()}"


def test_run_lifecycle_follows_the_naming_contract(mlflow_uri, tmp_path):
    cfg = config.load(None, ["name=life", "model.norm=bn", "model.kwargs.kn_dropout_p=0.1", "data.batch_size=48"])
    cfg.scaling.num_workers = 3
    client = tracking.client(mlflow_uri)
    tags = tracking.run_tags(cfg, run_key="/runs/life", trial_id="t1", sweep="s", extra={"kn_dist.seed": "7"})
    run_id = tracking.find_or_create_run(client, "exp", cfg, tags)
    assert tracking.find_or_create_run(client, "exp", cfg, tags) == run_id  # same key: the same run

    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["model.kwargs.kn_dropout_p"] == "0.1"
    assert run.data.tags["kn_dist.model"] == "resnet18_cifar" and run.data.tags["kn_dist.norm"] == "bn"
    assert run.data.tags["kn_dist.trial_id"] == "t1" and run.data.tags["kn_dist.kind"] == "train"
    assert json.loads(run.data.tags["kn_dist.versions"])["torch"] == torch.__version__
    assert run.data.tags["kn_dist.git_revision"] and run.data.tags["kn_dist.seed"] == "7"
    assert "mlflow.parentRunId" not in run.data.tags
    # DDP: the batch one optimizer step sees is 48 per worker x 3 workers; BN evaluates without KernelNorm.
    assert run.data.params["derived.global_batch_size"] == "144" and run.data.params["derived.kn_eval"] == "n/a"

    for epoch in (1, 2):
        tracking.log_epoch(client, run_id, epoch, {"val_top1": 0.5 * epoch, "lr": 0.1})
    assert tracking.logged_epochs(client, run_id) == {1, 2}
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "val_top1")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 1.0)]

    changed = config.load(
        None, ["name=life", "model.norm=bn", "model.kwargs.kn_dropout_p=0.1", "data.batch_size=48", "optim.lr=0.2"]
    )
    changed.scaling.num_workers = 2  # another world size: another global batch, so a resume is refused
    assert tracking.param_differences(client, run_id, changed) == ["optim.lr", "scaling.num_workers"]

    weights = {"w": torch.arange(4.0)}
    tracking.log_final(client, run_id, cfg, weights)
    tracking.finish(client, run_id)
    out = tmp_path / "download"
    out.mkdir()
    local = MlflowClient(mlflow_uri).download_artifacts(run_id, "", str(out))
    assert config.load(f"{local}/config.yaml") == cfg
    assert torch.equal(torch.load(f"{local}/model/weights.pt")["w"], weights["w"])
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"
