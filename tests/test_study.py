"""`kn-dist study` end to end on digits under a real local Ray, killed mid-sweep and resumed.

One small study (ConvMixer-256/8, bn vs kn, 2 trials per cell, 2 seeds) runs in a subprocess, is killed
with SIGKILL once one trial has finished and another is mid-run with a checkpoint, and is finished with
`--resume`. Everything asserted is read back through MLflow's own client: the nesting of runs, which
runs hold test metrics, the selection (recomputed here from the trials' val histories), the finals per
cell and seed, and the report on the study run. The statistics are checked in tests/test_stats.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kn_dist.cli import main

STUDY = {
    "name": "st",
    "epochs": 5,  # the kill point needs a trial still running 1.5-2.5 s after a checkpoint: 3 epochs of ~1 s raced
    "data": {
        "dataset": "digits",
        "root": "data16",
        "image_size": 16,
        "batch_size": 64,
        "crop_padding": 1,
        "hflip": False,
    },
    "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
    "schedule": {"name": "onecycle"},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    "checkpoint": {"storage_path": "runs"},
    "tracking": {"experiment": "st"},
    "tune": {
        "num_samples": 2,
        "scheduler": {"name": "fifo"},
        "space": {"optim.lr": {"loguniform": [0.001, 0.006]}},
        "architectures": [
            {
                "model": "convmixer_256_8",
                "kwargs": {"input_size": 16, "patch_size": 4, "kernel_size": 3},
                "norms": ["bn", "kn"],
                "kn_space": {"model.kwargs.kn_dropout_p": {"choice": [0.0, 0.05]}},
            }
        ],
    },
    "study": {"seeds": 2, "select_epoch": "last"},
}
CELLS = {"convmixer_256_8/bn", "convmixer_256_8/kn"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kn_dist.cli", *args]


def _runs(client: MlflowClient, kind: str) -> list:
    exp = client.get_experiment_by_name("st")
    return client.search_runs([exp.experiment_id], f"tags.`kn_dist.kind` = '{kind}'") if exp else []


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("study")
    (work / "study.yaml").write_text(yaml.safe_dump(STUDY))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    # Tune saves its experiment state (which checkpoint each trial has) every second, not every ~10 s.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
    args = ("study", "study.yaml", "--tracking-uri", uri, "--address", "local")
    log = (work / "first.log").open("w")
    # Its own process group: the kill takes the local Ray it started with it.
    driver = subprocess.Popen(
        _cli(*args), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client, deadline, snapshot = MlflowClient(uri), time.monotonic() + 420, None
    try:
        while snapshot is None and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.25)
            trials = _runs(client, "trial") if (work / "mlflow.db").exists() else []
            done = [r for r in trials if r.info.status == "FINISHED"]
            # A trial counts as resumable once Tune's experiment state was saved after its first checkpoint.
            states = list((work / "runs" / "st").glob("experiment_state-*.json"))
            saved_at = max((p.stat().st_mtime for p in states), default=0.0)
            checkpointed = [
                r
                for r in trials
                if r.info.status == "RUNNING"
                and "val_top1" in r.data.metrics
                and any(
                    c.stat().st_mtime + 1.5 < saved_at  # the report that registers it comes just after
                    for c in (work / "runs" / "st").glob(f"trial_{r.data.tags['kn_dist.trial_id']}/checkpoint_*")
                )
            ]
            if done and checkpointed:
                os.killpg(driver.pid, signal.SIGKILL)
                snapshot = {
                    r.info.run_id: (
                        r.info.status,
                        {m.step: m.timestamp for m in client.get_metric_history(r.info.run_id, "val_top1")},
                    )
                    for r in _runs(client, "trial")
                }
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    assert snapshot is not None, (
        f"the study ended or stalled before the kill point: {(work / 'first.log').read_text()[-3000:]}"
    )
    time.sleep(2)
    resumed = subprocess.run(_cli(*args, "--resume"), cwd=work, env=env, capture_output=True, text=True, timeout=480)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"work": work, "uri": uri, "client": client, "snapshot": snapshot, "out": resumed.stdout}


@pytest.mark.slow
@pytest.mark.ray
def test_runs_nest_under_one_study_run_and_only_finals_open_test(study):
    client = study["client"]
    (study_run,) = _runs(client, "study")
    (sweep_run,) = _runs(client, "sweep")
    assert study_run.info.status == "FINISHED" and sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
    trials, finals = _runs(client, "trial"), _runs(client, "final")
    assert len(trials) == 4 and {t.data.tags["mlflow.parentRunId"] for t in trials} == {sweep_run.info.run_id}
    for trial in trials:
        assert not any(k.startswith("test_") for k in trial.data.metrics), "a sweep trial opened the test split"
    assert len(finals) == 4 and {f.data.tags["mlflow.parentRunId"] for f in finals} == {study_run.info.run_id}
    assert {(f.data.tags["kn_dist.cell"], f.data.tags["kn_dist.seed"]) for f in finals} == {
        (c, s) for c in CELLS for s in ("0", "1")
    }
    for final in finals:
        assert final.info.status == "FINISHED" and 0.0 <= final.data.metrics["test_top1"] <= 1.0
        assert [m.step for m in client.get_metric_history(final.info.run_id, "test_top1")] == [STUDY["epochs"]]


@pytest.mark.slow
@pytest.mark.ray
def test_the_kill_lost_and_duplicated_nothing(study):
    client, snapshot = study["client"], study["snapshot"]
    resumed_any = False
    for trial in _runs(client, "trial"):
        history = client.get_metric_history(trial.info.run_id, "val_top1")
        assert sorted(m.step for m in history) == list(range(1, STUDY["epochs"] + 1)), (
            "an epoch was lost or logged twice"
        )
        status, before = snapshot.get(trial.info.run_id, (None, {}))
        after = {m.step: m.timestamp for m in history}
        assert all(after[step] == stamp for step, stamp in before.items()), "an epoch logged before the kill was redone"
        if status == "RUNNING" and before:
            resumed_from = trial.data.tags.get("kn_dist.resumed_from")
            # The checkpoint written before the kill is the one resumed (a restart from scratch has no tag).
            assert resumed_from is None or int(resumed_from) <= max(before)
            resumed_any |= resumed_from is not None
    assert resumed_any, "no interrupted trial continued from its checkpoint"


@pytest.mark.slow
@pytest.mark.ray
def test_selection_is_the_best_full_budget_trial_on_val_and_finals_retrain_it(study):
    client = study["client"]
    best: dict[str, tuple[float, str]] = {}
    # The documented rule: the best val score at the last epoch; a tie goes to the trial that started first.
    for trial in sorted(_runs(client, "trial"), key=lambda r: r.info.start_time):
        cell = f"{trial.data.tags['kn_dist.model']}/{trial.data.tags['kn_dist.norm']}"
        history = {m.step: m.value for m in client.get_metric_history(trial.info.run_id, "val_top1")}
        score = history[STUDY["epochs"]]
        if cell not in best or score > best[cell][0]:
            best[cell] = (score, trial.info.run_id)
    assert set(best) == CELLS
    for final in _runs(client, "final"):
        chosen = client.get_run(best[final.data.tags["kn_dist.cell"]][1])
        assert final.data.tags["kn_dist.selected_trial"] == chosen.data.tags["kn_dist.trial_id"]
        same = {k: v for k, v in final.data.params.items() if k not in ("seed", "name") and not k.startswith("data.")}
        assert same == {k: v for k, v in chosen.data.params.items() if k in same}
        assert final.data.params["seed"] == final.data.tags["kn_dist.seed"]


@pytest.mark.slow
@pytest.mark.ray
def test_the_study_run_holds_the_answer(study, tmp_path):
    client = study["client"]
    (study_run,) = _runs(client, "study")
    finals = _runs(client, "final")
    for cell in CELLS:
        scores = [f.data.metrics["test_top1"] for f in finals if f.data.tags["kn_dist.cell"] == cell]
        key = "test_top1_mean." + cell.replace("/", ".")
        assert study_run.data.metrics[key] == pytest.approx(sum(scores) / len(scores))
    local = Path(client.download_artifacts(study_run.info.run_id, "report", str(tmp_path)))
    text = (local / "report.md").read_text()
    assert "convmixer_256_8" in text and ("beats" in text or "no difference detected" in text)
    assert "(2 seeds" in text or ", 2 seeds)" in text
    pngs = list(local.glob("*.png"))
    assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "report:" in study["out"] and "mlflow ui" in study["out"]


BAD = [
    ({"study": {"seeds": 0}}, "study.seeds: seeds=0 must be at least 1"),
    ({"study": {"seed": 3}}, "unknown key 'study.seed'"),
    ({"tune": {**STUDY["tune"], "architectures": [{"model": "vit_cifar", "kwargs": {"input_size": 16},
        "norms": ["kn"], "kn_space": {"model.kwargs.kn_kernel_size": {"choice": [3]}}}]}}, "cannot be built"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_study_files_exit_2_with_one_line_before_anything_runs(tmp_path, capsys, change, message):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep.txt").write_text("earlier results")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "study.yaml").write_text(
        yaml.safe_dump({**STUDY, **change, "data": {**STUDY["data"], "root": str(tmp_path / "d")}})
    )
    code = main(["study", str(tmp_path / "study.yaml"), "--tracking-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert (tmp_path / "runs" / "keep.txt").read_text() == "earlier results"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["keep.txt"]
