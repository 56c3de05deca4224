"""Sweeps: the schema and its checks (fast), then one real ASHA sweep on digits under a local Ray whose
driver is killed mid-way and resumed; every assertion about MLflow is checked against MLflow's own
search, and the geometry error against the arithmetic of the token grid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kn_dist import config
from kn_dist.errors import UserError
from kn_dist.tune import (
    _make_searcher,
    _plan,
    is_kn,
    load_sweep,
    max_concurrent_trials,
    reap_orphaned_placement_groups,
    validate_sweep,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "sweeps" / "digits_demo.yaml"


def _write(tmp_path: Path, tune: dict, **base) -> Path:
    raw = {"name": "t", "epochs": 2, "data": {"dataset": "digits", "image_size": 16}, **base, "tune": tune}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


VIT = {"model": "vit_cifar", "kwargs": {"input_size": 16}, "norms": ["ln", "kn"]}


def test_demo_sweep_cells_give_baseline_and_kn_the_same_budget():
    raw = yaml.safe_load(DEMO.read_text())["tune"]
    sweep = load_sweep(DEMO)
    pairs = [(c.values["model.name"], c.values["model.norm"]) for c in sweep.cells]
    expected = [(a["model"], n) for a in raw["architectures"] for n in a["norms"]]
    assert pairs == expected and len({m for m, _ in pairs}) >= 2
    for cell, (_, norm) in zip(sweep.cells, pairs, strict=True):
        arch = next(a for a in raw["architectures"] if a["model"] == cell.values["model.name"])
        kn_keys = set(arch.get("kn_space", {}))
        assert kn_keys <= set(cell.space) if is_kn(norm) else not kn_keys & set(cell.space)
    plan = _plan(sweep)
    per_cell = [sum(1 for c, _, _ in plan if c == i) for i in range(len(sweep.cells))]
    assert per_cell == [raw["num_samples"]] * len(sweep.cells)


def test_overrides_reach_base_and_tune_sections():
    sweep = load_sweep(DEMO, ["optim.lr=0.05", "tune.num_samples=3", "name=other"])
    assert sweep.base.optim.lr == 0.05 and sweep.tune.num_samples == 3 and sweep.name == "other"


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"architectures": [VIT], "serach": "random"}, "unknown key 'serach'"),
        ({"architectures": [{**VIT, "kn_space": {"model.kwargs.kn_kernel_size": {"grid": [1, 2]}}}]}, "use choice"),
        ({"architectures": [VIT], "space": {"checkpoint.keep": {"choice": [1, 2]}}}, "'checkpoint.keep' cannot"),
        ({"architectures": [{**VIT, "norms": ["bn"]}]}, "norm 'bn' is not supported"),
        ({"architectures": [VIT], "space": {"optim.lr": {"uniform": [0.1, 0.01]}}}, "not \\[low, high\\]"),
    ],
)
def test_bad_sweep_files_are_user_errors_naming_the_key(tmp_path, tune, message):
    with pytest.raises(UserError, match=message):
        load_sweep(_write(tmp_path, tune))


@pytest.mark.slow  # builds the ViT a few times
def test_impossible_kernel_is_refused_before_any_trial(tmp_path):
    # At 16 px with patch 4 the token grid is 4x4: windows of 1, 2, 4 tile it, 3 does not.
    space = {"model.kwargs.kn_kernel_size": {"choice": [2, 3]}}
    sweep = load_sweep(_write(tmp_path, {"architectures": [{**VIT, "kn_space": space}]}))
    with pytest.raises(UserError, match="kn_kernel_size=3"):
        validate_sweep(sweep)
    sweep = load_sweep(
        _write(tmp_path, {"architectures": [{**VIT, "kn_space": {"model.kwargs.kn_kernel_size": {"choice": [1, 4]}}}]})
    )
    validate_sweep(sweep)


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_searcher_samples_inside_the_space_and_restores(tmp_path, search):
    tune = {
        "search": search,
        "num_samples": 3,
        "space": {"optim.lr": {"loguniform": [0.001, 0.1]}},
        "architectures": [{**VIT, "kn_space": {"model.kwargs.kn_dropout_p": {"choice": [0.0, 0.1]}}}],
    }
    sweep = load_sweep(_write(tmp_path, tune))
    searcher = _make_searcher(sweep)
    first = [searcher.suggest(f"t{i}") for i in range(3)]
    for i, trial in enumerate(first):
        assert 0.001 <= trial["optim.lr"] <= 0.1 and trial["seed"] == sweep.base.seed + i
        assert ("model.kwargs.kn_dropout_p" in trial) == (trial["model.norm"] == "kn")
        assert trial["model.kwargs.kn_dropout_p"] in (0.0, 0.1) if trial["model.norm"] == "kn" else True
        searcher.on_trial_complete(f"t{i}", {"val_top1": 0.5, "epoch": 2})
    searcher.save(str(tmp_path / "state.pkl"))
    rest = [searcher.suggest(f"t{i}") for i in range(3, 7)]
    assert rest[-1] == "FINISHED" and len({r["optim.lr"] for r in first + rest[:-1]}) == 6
    restored = _make_searcher(sweep)
    restored.restore(str(tmp_path / "state.pkl"))
    again = [restored.suggest(f"t{i}") for i in range(3, 6)]
    if search == "random":  # seeded per (cell, sample): the restored searcher continues identically
        assert again == rest[:-1]
    assert [(a["model.norm"], a["seed"]) for a in again] == [(r["model.norm"], r["seed"]) for r in rest[:-1]]


def test_concurrency_follows_cluster_and_trial_resources(tmp_path):
    sweep = load_sweep(_write(tmp_path, {"architectures": [VIT]}, scaling={"num_workers": 2}))
    assert max_concurrent_trials(sweep, {"CPU": 2.0}) == 1
    assert max_concurrent_trials(sweep, {"CPU": 9.0}) == 4
    gpu = load_sweep(_write(tmp_path, {"architectures": [VIT]}, scaling={"num_workers": 2, "use_gpu": True}))
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_placement_group_of_a_killed_actor_is_released():
    """What happens to a TorchTrainer controller when ASHA stops its trial: its actor dies holding a
    placement group. Without the reaper the CPUs stay reserved (Ray scopes the group to the job)."""
    import ray
    from ray.util.placement_group import placement_group

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self) -> None:
            self.pg = placement_group([{"CPU": 0.75}, {"CPU": 0.75}])
            ray.get(self.pg.ready(), timeout=60)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        driver_pg = placement_group([{"CPU": 0.5}])  # made by the driver (as Tune's trial groups): kept
        ray.get(driver_pg.ready(), timeout=60)
        creator = Creator.remote()
        ray.get(creator.make.remote(), timeout=60)
        ray.kill(creator)
        time.sleep(2)
        assert ray.available_resources().get("CPU", 0) == 0  # the dead actor's group still holds its 1.5 CPUs
        assert reap_orphaned_placement_groups() == 1
        deadline = time.time() + 30
        while ray.available_resources().get("CPU", 0) < 1.5 and time.time() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == 1.5  # 2 CPUs minus the driver's group
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------
# one real sweep: 2 norms x 2 samples = 4 trials, 2 Ray workers each, ASHA; killed and resumed

SWEEP = {
    "name": "digits_t",
    "epochs": 2,
    "data": {"dataset": "digits", "root": "data", "image_size": 8, "batch_size": 128, "hflip": False},
    "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.01},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    "checkpoint": {"storage_path": "runs"},
    "tracking": {"experiment": "digits_t"},
    "tune": {
        "num_samples": 2,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": {"optim.lr": {"loguniform": [0.001, 0.005]}},
        "architectures": [
            {
                "model": "vit_cifar",
                "kwargs": {"input_size": 8},  # 2x2 patch grid
                "norms": ["ln", "kn"],
                "kn_space": {"model.kwargs.kn_kernel_size": {"choice": [1, 2]}},
            }
        ],
    },
}
N_TRIALS = 4


def _children(client, exp_id: str) -> list:
    return client.search_runs([exp_id], "tags.`kn_dist.kind` = 'trial'")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kn_dist.cli", *args]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("sweep")
    (work / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    # A Ray of its own ("local"): ray.init() without an address joins any `ray start` cluster on the machine.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (work / "first.log").open("w")
    driver = subprocess.Popen(
        _cli("tune", "sweep.yaml", "--tracking-uri", uri, "--address", "local"), cwd=work, env=env, stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes the local Ray it started with it
    )  # fmt: skip
    client, deadline = MlflowClient(uri), time.time() + 1500  # generous: a loaded machine
    snapshot = None
    try:  # kill once one trial has finished and a later one has logged an epoch (it is mid-run)
        while snapshot is None and driver.poll() is None and time.time() < deadline:
            time.sleep(1)
            exp = client.get_experiment_by_name("digits_t") if (work / "mlflow.db").exists() else None
            runs = _children(client, exp.experiment_id) if exp else []
            done = [r for r in runs if r.info.status == "FINISHED"]
            mid = [r for r in runs if r.info.status == "RUNNING" and "val_top1" in r.data.metrics]
            if done and mid:
                os.killpg(driver.pid, signal.SIGKILL)
                snapshot = {
                    r.info.run_id: (
                        r.info.status,
                        [(m.step, m.timestamp) for m in client.get_metric_history(r.info.run_id, "val_top1")],
                    )
                    for r in runs
                }
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert snapshot is not None, (
        f"the driver ended or stalled before the kill point: {(work / 'first.log').read_text()[-3000:]}"
    )
    time.sleep(2)
    resume = _cli("tune", "sweep.yaml", "--tracking-uri", uri, "--resume", "--address", "local")
    resumed = subprocess.run(resume, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    exp = client.get_experiment_by_name("digits_t")
    return work, uri, client, exp.experiment_id, snapshot


@pytest.mark.slow
@pytest.mark.ray
def test_every_trial_is_one_child_of_one_sweep_run_across_the_kill(sweep_run):
    _, _, client, exp_id, snapshot = sweep_run
    parents = client.search_runs([exp_id], "tags.`kn_dist.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = _children(client, exp_id)
    assert len(children) == N_TRIALS
    assert len({c.data.tags["kn_dist.trial_id"] for c in children}) == N_TRIALS
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["kn_dist.norm"] for c in children} == {"ln", "kn"}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_top1")
        steps = [m.step for m in history]
        assert sorted(steps) == list(range(1, len(steps) + 1)), "an epoch was logged twice or skipped"
        before = snapshot.get(child.info.run_id)
        if before and before[0] == "FINISHED":  # finished before the kill: not re-run
            assert [(m.step, m.timestamp) for m in sorted(history, key=lambda m: m.step)] == sorted(before[1])


@pytest.mark.slow
@pytest.mark.ray
def test_interrupted_trial_resumed_from_its_checkpoint(sweep_run):
    work, _, client, exp_id, snapshot = sweep_run
    mid = [rid for rid, (status, hist) in snapshot.items() if status == "RUNNING" and hist]
    assert mid
    for run_id in mid:
        trial_id = client.get_run(run_id).data.tags["kn_dist.trial_id"]
        # Tune's own record of the trial: the epochs its TorchTrainer reported, before and after the kill.
        results = [
            yaml.safe_load(line)
            for line in (work / "runs" / "digits_t" / f"trial_{trial_id}" / "result.json").read_text().splitlines()
        ]
        epochs = [r["epoch"] for r in results]
        assert len(epochs) == len(set(epochs)), f"trial {trial_id} re-ran an epoch: {epochs}"


@pytest.mark.slow
@pytest.mark.ray
def test_best_is_mlflows_top_run_and_round_trips_to_train(sweep_run, capsys):
    from kn_dist.cli import main
    from kn_dist.trainer import prepare_config

    work, uri, client, exp_id, _ = sweep_run
    assert main(["best", "--tracking-uri", uri]) == 0  # no --experiment: the latest sweep's
    out = capsys.readouterr().out
    for norm in ("ln", "kn"):
        flt = f"tags.`kn_dist.kind` = 'trial' and tags.`kn_dist.norm` = '{norm}'"
        top = client.search_runs([exp_id], flt, order_by=["metrics.val_top1 DESC"])[0]
        line = next(ln for ln in out.splitlines() if ln.startswith("vit_cifar ") and f" {norm} " in ln)
        chosen = client.get_run(line.split("run=")[1].split()[0])
        # The highest val_top1 MLflow holds (a tie may be broken either way).
        assert chosen.data.metrics["val_top1"] == top.data.metrics["val_top1"]
        assert chosen.data.tags["kn_dist.norm"] == norm
    best_yaml = work / "best.yaml"
    assert main(["best", "--tracking-uri", uri, "--norm", "kn", "--out", str(best_yaml)]) == 0
    run_id = capsys.readouterr().out.split("wrote the config of run ")[1].split()[0]
    cfg = config.load(best_yaml)
    # Exactly the trial's config: every param MLflow recorded for it, as kn-dist train would record it.
    assert {k: str(v) for k, v in config.to_flat_dict(cfg).items()} == client.get_run(run_id).data.params
    assert prepare_config(cfg) == cfg  # `kn-dist train best.yaml` accepts it unchanged (checks, no Ray)


@pytest.mark.slow
@pytest.mark.ray
def test_report_lists_every_model_norm_with_plots(sweep_run):
    from kn_dist.report import write_report

    work, uri, _, _, _ = sweep_run
    path = write_report(uri, None, work / "report")
    text = path.read_text()
    assert "| vit_cifar | ln |" in text and "| vit_cifar | kn (KN) |" in text
    pngs = list((work / "report").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
