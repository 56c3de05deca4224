"""Reading a training run back through MLflow's own client, shared by the fault-tolerance tests."""

from __future__ import annotations

from mlflow import MlflowClient


def the_run(cfg):
    """(client, the one MLflow run of cfg's experiment, or None before it exists); more than one fails."""
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert len(runs) <= 1, [r.info.run_id for r in runs]
    return client, (runs[0] if runs else None)
