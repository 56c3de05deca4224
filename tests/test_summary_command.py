"""`kn-dist summary` (kn_dist.summary) against a real MLflow store holding two finished studies, written
with plain MLflow calls; the expected figures come from scipy and numpy on the numbers put in."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats as sps

from kn_dist.cli import main
from kn_dist.stats import iqm

# (study, dataset, model, published norm, {norm: test top-1 per seed})
STUDIES = [
    ("s-vit", "cifar10", "vit_cifar", "ln", {"ln": [0.900, 0.905, 0.898, 0.902], "kn": [0.910, 0.914, 0.905, 0.913]}),
    ("s-mix", "cifar100", "convmixer_256_8", "bn", {"bn": [0.700, 0.720, 0.710], "kn": [0.701, 0.719, 0.712]}),
]


def _fill(client: MlflowClient) -> None:
    for study, dataset, model, _, scores in STUDIES:
        exp = client.create_experiment(study)
        seeds = list(range(len(next(iter(scores.values())))))
        selection = {
            f"{model}/{norm}": {"candidate": f"c{i}s0", "runs": [], "score": 0.9} for i, norm in enumerate(scores)
        }
        tags = {
            "kn_dist.kind": "study",
            "kn_dist.study": study,
            "kn_dist.dataset": dataset,
            "kn_dist.selection": json.dumps(selection),
            "kn_dist.study_seeds": json.dumps(seeds),
            "kn_dist.seed_looks": "1",
        }
        parent = client.create_run(exp, run_name=study, tags=tags).info.run_id
        client.log_param(parent, "study.delta", "0.5")
        client.log_param(parent, "study.alpha", "0.05")
        for i, (norm, values) in enumerate(scores.items()):
            for seed, value in zip(seeds, values, strict=True):
                final_tags = {
                    "kn_dist.kind": "final",
                    "kn_dist.model": model,
                    "kn_dist.norm": norm,
                    "kn_dist.cell": f"{model}/{norm}",
                    "kn_dist.seed": str(seed),
                    "kn_dist.selected_trial": f"c{i}s0",
                    "mlflow.parentRunId": parent,
                }
                run = client.create_run(exp, tags=final_tags).info.run_id
                client.log_metric(run, "test_top1", value, step=3)
                client.set_terminated(run)
        # a final of another configuration, not selected: never pooled in
        stray = client.create_run(exp, tags={**final_tags, "kn_dist.selected_trial": "c9s9"}).info.run_id
        client.log_metric(stray, "test_top1", 0.01, step=3)
        client.set_terminated(stray)
        client.set_terminated(parent)


@pytest.mark.slow  # an MLflow SQLite store takes seconds to create
def test_summary_table_forest_plot_and_aggregate(tmp_path, mlflow_uri, capsys):
    client = MlflowClient(mlflow_uri)
    _fill(client)
    assert main(["summary", "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "forest.png").read_bytes()[:4] == b"\x89PNG"
    diffs = []
    for _, dataset, model, base, scores in STUDIES:
        kn, ref = 100 * np.array(scores["kn"]), 100 * np.array(scores[base])
        ci = sps.ttest_rel(kn, ref).confidence_interval(0.95)
        row = next(line for line in text.splitlines() if line.startswith(f"| {model} | {dataset} |"))
        assert f"{(kn - ref).mean():+.2f}" in row and f"{ci.low:+.2f} to {ci.high:+.2f}" in row
        diffs += (kn - ref).tolist()
    assert "| beats |" in text.split("| vit_cifar |")[1].splitlines()[0]  # +1.0 pt, tight: decided
    assert f"IQM of KernelNorm − published norm = {iqm(diffs):+.2f} pt" in text
    summary_runs = client.search_runs(
        [client.get_experiment_by_name("kn_dist-summary").experiment_id], "tags.`kn_dist.kind` = 'summary'"
    )
    (run,) = summary_runs
    assert run.data.metrics["iqm_diff_pt"] == pytest.approx(iqm(diffs)) and run.data.metrics["studies"] == 2
    assert "vit_cifar" in run.data.tags["mlflow.note.content"]
    assert "IQM of KernelNorm" in capsys.readouterr().out


def test_summary_of_an_empty_store_is_one_line(tmp_path, mlflow_uri, capsys):
    assert main(["summary", "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished study" in err[0]
