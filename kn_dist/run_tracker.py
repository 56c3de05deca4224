"""Rank 0's MLflow run of a training loop (kn_dist.worker): each epoch once, the test figures, the artifacts.

A restarted run finds its run by its run key and logs only the epochs MLflow does not hold yet.
"""

from __future__ import annotations

from typing import Any

import torch

from kn_dist import tracking
from kn_dist.config import ExperimentConfig

RESUMED_FROM_TAG = "kn_dist.resumed_from"


class RunTracker:
    """Rank 0's MLflow run: per-epoch metrics once each, the test figures, the final artifacts."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.logged = tracking.logged_epochs(client, run_id)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch not in self.logged:
            tracking.log_epoch(self.client, self.run_id, epoch, metrics)

    def record_resume(self, epoch: int) -> None:
        """Tag kn_dist.resumed_from: every checkpoint epoch this run restarted from, in order ("2,5")."""
        tracking.append_tag(self.client, self.run_id, RESUMED_FROM_TAG, str(epoch))

    def log_test(self, epoch: int, test: dict[str, float], shards: list[list[torch.Tensor]]) -> None:
        correct = torch.cat([c for c, _ in shards]).numpy()
        labels = torch.cat([y for _, y in shards]).numpy()
        tracking.log_test_examples(self.client, self.run_id, correct, labels)  # before the figure: it marks done
        tracking.log_epoch(self.client, self.run_id, epoch, {"test_loss": test["loss"], "test_top1": test["top1"]})

    def test_logged(self) -> bool:
        return bool(tracking.logged_epochs(self.client, self.run_id, "test_top1"))

    def finish(self, cfg: ExperimentConfig, state_dict: dict[str, Any]) -> None:
        tracking.log_final(self.client, self.run_id, cfg, state_dict)
        tracking.finish(self.client, self.run_id)

    def finish_once(self, cfg: ExperimentConfig, state_dict: dict[str, Any]) -> None:
        if self.client.get_run(self.run_id).info.status != "FINISHED":
            self.finish(cfg, state_dict)


def open_run(loop: Any, run_id: str | None, num_params: int) -> RunTracker:
    """Rank 0's MLflow run of `loop` (a kn_dist.worker.LoopConfig): `run_id`, else the run of its run key."""
    cfg = loop.config
    client = tracking.client(cfg.tracking.uri)
    if run_id is None:
        tags = tracking.run_tags(
            cfg,
            run_key=loop.run_key,
            kind=loop.kind,
            trial_id=loop.trial_id,
            sweep=loop.sweep,
            parent_run_id=loop.mlflow_parent_run_id,
            extra=loop.tags,
        )
        run_id = tracking.find_or_create_run(client, cfg.tracking.experiment, cfg, tags)
    else:
        tracking.mark_running(client, run_id)
    tracker = RunTracker(client, run_id)
    if not tracking.logged_epochs(client, run_id, "num_params"):
        tracking.log_epoch(client, run_id, 0, {"num_params": num_params})
    return tracker
