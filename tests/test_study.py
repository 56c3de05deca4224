"""`kn-dist study` end to end on digits under a real local Ray: killed mid-sweep, resumed, killed during
the finals, resumed with more seeds.

One small study (ConvMixer-256/8, bn vs kn, 2 configurations per cell under successive halving per cell:
both to epoch 1, the better one to epoch 4; 2 seeds) runs in a subprocess. It is killed with SIGKILL while
a promoted trial is mid-way with a checkpoint, resumed, killed again once one final has finished and
another is mid-way with a checkpoint, and finished with `--resume study.seeds=3`. Everything asserted is
read back through MLflow's own client: the halving rule and equal full-budget counts, paired draws and
seeds, that no final replays a trial, that each final opened test exactly once, and the answer on the
study run. The statistics are checked in tests/test_stats.py, the rules one by one in
tests/test_study_selection.py and tests/test_sweep_progress.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from kn_dist.cli import main

EPOCHS = 4
STUDY = {
    "name": "st",
    "epochs": EPOCHS,
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
        "scheduler": {"name": "halving", "grace_period": 1, "reduction_factor": 2},
        "space": {"optim.lr": {"loguniform": [0.0005, 0.006]}},
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


def _history(client: MlflowClient, run, key: str = "val_top1") -> dict[int, tuple[float, int]]:
    return {m.step: (m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, key)}


def _checkpointed_and_running(client: MlflowClient, runs: list, folder: Path) -> bool:
    """A run still RUNNING whose newest complete checkpoint on disk leaves it at least two epochs to train
    (a promoted trial: past its first rung), so the kill lands mid-run, not during its last epoch."""
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        done = [
            int(p.parent.name.removeprefix("epoch_")) for p in (folder / run.info.run_name).glob("epoch_*/state.pt")
        ]
        first = 1 if run.data.tags.get("kn_dist.kind") == "final" else 2
        if done and first <= max(done) <= EPOCHS - 2:
            return True
    return False


def _run_until(args, work: Path, env, client: MlflowClient, ready, log_name: str) -> dict:
    """Start the study, SIGKILL its process group once `ready()` holds; a snapshot of every run's epochs."""
    log = (work / log_name).open("w")
    driver = subprocess.Popen(
        _cli(*args), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )  # its own process group: the kill takes the local Ray it started with it
    deadline, killed = time.monotonic() + 900, False
    try:
        while not killed and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.25)
            if (work / "mlflow.db").exists() and ready():
                os.killpg(driver.pid, signal.SIGKILL)
                killed = True
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    assert killed, f"the study ended or stalled before the kill point: {(work / log_name).read_text()[-3000:]}"
    # Ray's worker processes outlive the driver by a moment (they go when their raylet notices): what they
    # record meanwhile belongs to the state the resume starts from.
    time.sleep(5)
    return {
        r.info.run_id: (r.info.status, _history(client, r), _history(client, r, "test_top1"))
        for kind in ("trial", "final")
        for r in _runs(client, kind)
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("study")
    (work / "study.yaml").write_text(yaml.safe_dump(STUDY))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ("study", "study.yaml", "--tracking-uri", uri, "--address", "local")
    client = MlflowClient(uri)
    in_sweep = _run_until(
        args,
        work,
        env,
        client,
        lambda: _checkpointed_and_running(client, _runs(client, "trial"), work / "runs" / "st-trials"),
        "first.log",
    )
    in_finals = _run_until(
        (*args, "--resume"),
        work,
        env,
        client,
        lambda: (
            any(r.info.status == "FINISHED" for r in _runs(client, "final"))
            and _checkpointed_and_running(client, _runs(client, "final"), work / "runs" / "st-finals-runs")
        ),
        "second.log",
    )
    resumed = subprocess.run(
        _cli(*args, "--resume", "study.seeds=3"), cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"client": client, "in_sweep": in_sweep, "in_finals": in_finals, "out": resumed.stdout}


def _cell(run) -> str:
    return f"{run.data.tags['kn_dist.model']}/{run.data.tags['kn_dist.norm']}"


@pytest.mark.slow
@pytest.mark.ray
def test_runs_nest_under_one_study_run_and_only_finals_open_test_once(study):
    client = study["client"]
    (study_run,) = _runs(client, "study")
    (sweep_run,) = _runs(client, "sweep")
    assert study_run.info.status == "FINISHED" and sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
    trials, finals = _runs(client, "trial"), _runs(client, "final")
    assert len(trials) == 4 and {t.data.tags["mlflow.parentRunId"] for t in trials} == {sweep_run.info.run_id}
    for trial in trials:
        assert not any(k.startswith("test_") for k in trial.data.metrics), "a sweep trial opened the test split"
    # seeds 0 and 1 from the first start, seed 2 added by the last resume: each (cell, seed) once
    assert sorted((f.data.tags["kn_dist.cell"], f.data.tags["kn_dist.seed"]) for f in finals) == sorted(
        (c, s) for c in CELLS for s in ("0", "1", "2")
    )
    for final in finals:
        assert final.info.status == "FINISHED" and 0.0 <= final.data.metrics["test_top1"] <= 1.0
        assert list(_history(client, final, "test_top1")) == [EPOCHS], "test opened more than once"
        assert sorted(_history(client, final)) == list(range(1, EPOCHS + 1))


@pytest.mark.slow
@pytest.mark.ray
def test_the_kills_lost_and_duplicated_nothing(study):
    client = study["client"]
    resumed_any = {"trial": False, "final": False}
    for snapshot, kind in ((study["in_sweep"], "trial"), (study["in_finals"], "final")):
        for run in _runs(client, kind):
            status, before, test_before = snapshot.get(run.info.run_id, (None, {}, {}))
            after, test_after = _history(client, run), _history(client, run, "test_top1")
            assert all(after[step] == value for step, value in before.items()), (
                "an epoch logged before the kill was redone"
            )
            assert all(test_after[step] == value for step, value in test_before.items())
            resumed_from = run.data.tags.get("kn_dist.resumed_from")
            if status == "RUNNING" and resumed_from is not None:  # continued from the checkpoint saved before
                assert int(resumed_from.split(",")[-1]) <= max(before)
                resumed_any[kind] = True
    assert resumed_any == {"trial": True, "final": True}, "an interrupted run did not continue from its checkpoint"


@pytest.mark.slow
@pytest.mark.ray
def test_halving_gave_every_cell_the_same_budget_and_the_same_draws(study):
    client = study["client"]
    trials = _runs(client, "trial")
    by_cell: dict[str, list] = {}
    for trial in trials:
        by_cell.setdefault(_cell(trial), []).append(trial)
    for cell, runs in by_cell.items():
        full = [r for r in runs if sorted(_history(client, r)) == list(range(1, EPOCHS + 1))]
        stopped = [r for r in runs if r not in full]
        # 2 configurations -> floor(2 / 2) = 1 survivor at epoch 1: the better val top-1 there
        assert len(full) == 1 and len(stopped) == 1, cell
        assert all(sorted(_history(client, r)) == [1] for r in stopped)
        assert all(r.info.status == "KILLED" and r.data.tags.get("kn_dist.stopped_early") == "true" for r in stopped)
        assert _history(client, full[0])[1][0] == max(_history(client, r)[1][0] for r in runs)
    # paired: sample i of every norm has the same lr and seed; KernelNorm's own key only in its cell
    shared = {}
    for trial in trials:
        sample = trial.data.tags["kn_dist.sample"]
        shared.setdefault(sample, set()).add((trial.data.params["optim.lr"], trial.data.params["seed"]))
        assert ("model.kwargs.kn_dropout_p" in trial.data.params) == (trial.data.tags["kn_dist.norm"] == "kn")
    assert len(shared) == 2 and all(len(v) == 1 for v in shared.values()), shared


@pytest.mark.slow
@pytest.mark.ray
def test_finals_retrain_the_selection_with_their_own_paired_seeds_and_never_replay_a_trial(study):
    client = study["client"]
    (study_run,) = _runs(client, "study")
    trials = _runs(client, "trial")
    full = {_cell(t): t for t in trials if EPOCHS in _history(client, t)}
    seeds: dict[str, set] = {}
    for final in _runs(client, "final"):
        chosen = full[final.data.tags["kn_dist.cell"]]
        assert final.data.tags["kn_dist.selected_trial"] == chosen.data.tags["kn_dist.trial_key"][:-2]  # c?s?
        same = {k: v for k, v in final.data.params.items() if k not in ("seed", "name") and not k.startswith("data.")}
        assert same == {k: v for k, v in chosen.data.params.items() if k in same}
        seeds.setdefault(final.data.tags["kn_dist.seed"], set()).add(
            (
                final.data.params["seed"],
                tuple(sorted((k, v) for k, v in final.data.params.items() if k.startswith("data."))),
            )
        )
        searched = ("seed", "optim.lr", "model.kwargs.kn_dropout_p")
        for trial in trials:
            if _cell(trial) == final.data.tags["kn_dist.cell"]:
                assert any(trial.data.params.get(k) != final.data.params.get(k) for k in searched), (
                    "a final replays a trial"
                )
    # seed s: the same training seed and data pipeline for every norm; not a trial's seed
    assert all(len(v) == 1 for v in seeds.values()) and len(seeds) == 3
    trial_seeds = {t.data.params["seed"] for t in trials}
    assert not {next(iter(v))[0] for v in seeds.values()} & trial_seeds
    assert "kn_dist.selection" in study_run.data.tags


@pytest.mark.slow
@pytest.mark.ray
def test_the_study_run_holds_the_answer(study, tmp_path):
    client = study["client"]
    (study_run,) = _runs(client, "study")
    finals = _runs(client, "final")
    for cell in CELLS:
        scores = [f.data.metrics["test_top1"] for f in finals if f.data.tags["kn_dist.cell"] == cell]
        key = "test_top1_mean." + cell.replace("/", ".")
        assert len(scores) == 3 and study_run.data.metrics[key] == pytest.approx(sum(scores) / len(scores))
    local = Path(client.download_artifacts(study_run.info.run_id, "report", str(tmp_path)))
    text = (local / "report.md").read_text()
    verdicts = ("beats", "loses to", "equivalent", "inconclusive")
    assert "convmixer_256_8" in text and "over 3 paired seeds" in text
    (verdict,) = [v for k, v in study_run.data.tags.items() if k.startswith("kn_dist.verdict.")]
    assert verdict in verdicts and f"**{verdict}**" in text
    assert "convmixer_256_8/bn 1 of 2; convmixer_256_8/kn 1 of 2" in text
    for final in finals:  # every seed's figure is listed, and its per-example record adds up to it
        assert f"s{final.data.tags['kn_dist.seed']}: {100 * final.data.metrics['test_top1']:.2f}" in text
        record = np.load(client.download_artifacts(final.info.run_id, "test_examples.npz", str(tmp_path)))
        assert record["correct"].mean() == pytest.approx(final.data.metrics["test_top1"], abs=1e-12)
    note = study_run.data.tags["mlflow.note.content"]  # the run page's description in the MLflow UI
    assert note.startswith("**") and verdict in note.splitlines()[0] and f"**{verdict}**" in note and "s0: " in note
    pngs = list(local.glob("*.png"))
    assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "report:" in study["out"] and "mlflow ui" in study["out"]


@pytest.mark.slow
@pytest.mark.ray
def test_the_console_is_our_lines_only(study):
    """One line per trial start, epoch and end, the stage lines and the answer: no Tune tables, TensorBoard
    hints, Ray deduplication notices or worker prefixes."""
    lines = [line for line in study["out"].splitlines() if line.strip()]
    assert lines and all(line.startswith("[kn-dist] ") for line in lines), [
        line for line in lines if not line.startswith("[kn-dist] ")
    ][:5]
    out = study["out"]
    assert not any(noise in out for noise in ("╭", "│", "Trial status", "TensorBoard", "repeated", "pid="))
    starts = [line for line in lines if " starts (" in line]
    ends = [line for line in lines if " ends at epoch " in line]
    assert len(starts) == len(ends) >= 2  # the finals of the resume: seed 2 of both cells, maybe more
    assert any("verdict" in line or "inconclusive" in line or "beats" in line or "equivalent" in line for line in lines)


BAD = [
    ({"study": {"seeds": 0}}, "study.seeds: seeds=0 must be at least 1"),
    ({"tune": {**STUDY["tune"], "scheduler": {"name": "asha"}}}, "tune.scheduler asha ranks all cells together"),
    ({"tune": {**STUDY["tune"], "search": "optuna"}}, "would not be offered the same values"),
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
