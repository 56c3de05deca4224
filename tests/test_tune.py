"""Sweeps: the schema and its checks (fast), the concurrency limit, and one real ASHA sweep of
multi-worker (TorchTrainer) trials on a 2-CPU local Ray, where each stopped trial must give its workers'
CPUs back for the next trial to start. The kill-and-resume path of a sweep is tested through
`kn-dist study` (tests/test_study.py); the autoscaling cluster in tests/test_cluster_scaling.py."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import pytest
import yaml

from kn_dist.errors import UserError
from kn_dist.study import load_study
from kn_dist.sweep import is_kn, load_sweep, sample_values, trial_plan, trial_seed, validate_sweep
from kn_dist.sweep_progress import SweepProgress, TrialKey
from kn_dist.tune import concurrency_limit
from kn_dist.tune_search import make_searcher

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "studies" / "digits_demo.yaml"


def _write(tmp_path: Path, tune: dict, **base) -> Path:
    raw = {"name": "t", "epochs": 2, "data": {"dataset": "digits", "image_size": 16}, **base, "tune": tune}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


VIT = {"model": "vit_cifar", "kwargs": {"input_size": 16}, "norms": ["ln", "kn"]}


def test_demo_sweep_cells_give_baseline_and_kn_the_same_budget():
    raw = yaml.safe_load(DEMO.read_text())["tune"]
    sweep = load_study(DEMO).sweep
    pairs = [(c.values["model.name"], c.values["model.norm"]) for c in sweep.cells]
    expected = [(a["model"], n) for a in raw["architectures"] for n in a["norms"]]
    assert pairs == expected and len({n for _, n in pairs}) >= 2
    for cell, (_, norm) in zip(sweep.cells, pairs, strict=True):
        arch = next(a for a in raw["architectures"] if a["model"] == cell.values["model.name"])
        kn_keys = set(arch.get("kn_space", {}))
        assert kn_keys <= set(cell.space) if is_kn(norm) else not kn_keys & set(cell.space)
    plan = trial_plan(sweep)
    per_cell = [sum(1 for c, _, _ in plan if c == i) for i in range(len(sweep.cells))]
    assert per_cell == [raw["num_samples"]] * len(sweep.cells)


def test_overrides_reach_base_and_tune_sections():
    sweep = load_study(DEMO, ["optim.lr=0.05", "tune.num_samples=3", "name=other"]).sweep
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


def _finish(searcher, trial_id: str, trial: dict, value: float) -> None:
    searcher.on_trial_complete(trial_id, {"val_top1": value, "epoch": trial["kn_dist.stop"]})


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_searcher_samples_inside_the_space_and_continues_from_the_records(tmp_path, search):
    tune = {
        "search": search,
        "num_samples": 3,
        "scheduler": {"name": "fifo"},
        "space": {"optim.lr": {"loguniform": [0.001, 0.1]}},
        "architectures": [{**VIT, "kn_space": {"model.kwargs.kn_dropout_p": {"choice": [0.0, 0.1]}}}],
    }
    sweep = load_sweep(_write(tmp_path, tune))
    progress, values = SweepProgress(sweep), {}
    searcher = make_searcher(sweep, progress, values)
    first = [searcher.suggest(f"t{i}") for i in range(3)]
    for i, trial in enumerate(first):
        assert 0.001 <= trial["optim.lr"] <= 0.1 and trial["kn_dist.stop"] == sweep.base.epochs
        assert ("model.kwargs.kn_dropout_p" in trial) == (trial["model.norm"] == "kn")
        assert trial["model.kwargs.kn_dropout_p"] in (0.0, 0.1) if trial["model.norm"] == "kn" else True
        _finish(searcher, f"t{i}", trial, 0.5)
    # A new pass (a resumed sweep) knows only what the trials recorded: it hands out the rest, once each.
    later = SweepProgress(sweep)
    for trial in first:
        later.record(TrialKey.parse(trial["kn_dist.trial"]), sweep.base.epochs, 0.5)
    again = make_searcher(sweep, later, dict(values))
    rest = [again.suggest(f"u{i}") for i in range(4)]
    assert rest[-1] is None  # three trials run, none finished: the sweep waits, it is not done
    for i, trial in enumerate(rest[:-1]):
        _finish(again, f"u{i}", trial, 0.4)
    assert again.suggest("u9") == "FINISHED"
    names = [t["kn_dist.trial"] for t in first + rest[:-1]]
    assert sorted(names) == sorted(f"c{c}s{s}r0" for c in range(2) for s in range(3))
    assert len({t["optim.lr"] for t in first + rest[:-1]}) == (3 if search == "random" else 6)


def test_random_draws_are_paired_across_norms_and_kn_keys_have_their_own_stream(tmp_path):
    arch = {**VIT, "space": {"optim.weight_decay": {"loguniform": [1e-5, 1e-3]}}}
    tune = {"num_samples": 40, "space": {"optim.lr": {"loguniform": [0.001, 0.1]}}, "architectures": [arch]}
    plain = load_sweep(_write(tmp_path, tune))
    kn_space = {"model.kwargs.kn_dropout_p": {"uniform": [0.0, 0.2]}, "model.kwargs.kn_kernel_size": {"choice": [1, 2]}}
    with_kn = load_sweep(_write(tmp_path, {**tune, "architectures": [{**arch, "kn_space": kn_space}]}))
    assert [c.norm for c in with_kn.cells] == ["ln", "kn"]
    shared = ("optim.lr", "optim.weight_decay")
    for sample in range(40):
        ln, kn = sample_values(with_kn, 0, sample), sample_values(with_kn, 1, sample)
        assert {k: kn[k] for k in shared} == ln == sample_values(plain, 0, sample)  # adding kn keys moved nothing
        assert set(kn) == {*shared, *kn_space} and 0.0 <= kn["model.kwargs.kn_dropout_p"] <= 0.2
        assert trial_seed(with_kn, sample, 0) == with_kn.base.seed + sample  # the same for every norm
    # loguniform: log10(lr) uniform on [-3, -1]; 40 draws' mean lies within 4 standard errors of -2
    logs = [math.log10(sample_values(plain, 0, s)["optim.lr"]) for s in range(40)]
    assert abs(statistics.fmean(logs) + 2) < 4 * (2 / math.sqrt(12)) / math.sqrt(40)
    assert len(set(logs)) == 40


def test_concurrency_follows_what_the_cluster_can_grow_to(tmp_path):
    sweep = load_sweep(_write(tmp_path, {"num_samples": 4, "architectures": [VIT]}, scaling={"num_workers": 2}))
    assert len(trial_plan(sweep)) == 8
    assert concurrency_limit(sweep, {"CPU": 2.0}, None)[0] == 1
    assert concurrency_limit(sweep, {"CPU": 9.0}, None)[0] == 4
    # The shipped clusters: a head without GPUs, GPU nodes from 0 up to their max_workers.
    gpu = load_sweep(_write(tmp_path, {"num_samples": 4, "architectures": [VIT]}, scaling={"use_gpu": True}))
    limit, source = concurrency_limit(gpu, {"CPU": 8.0}, {"CPU": 8.0 + 6 * 8, "GPU": 6.0})
    assert limit == 6 and "autoscaler" in source
    assert concurrency_limit(gpu, {"CPU": 8.0}, None)[0] == 1  # no autoscaler, no GPU: one trial waits
    assert concurrency_limit(gpu, {"CPU": 64.0, "GPU": 64.0}, None)[0] == 8  # never more than the trials
    fixed = load_sweep(_write(tmp_path, {"max_concurrent_trials": 3, "architectures": [VIT]}))
    assert concurrency_limit(fixed, {"CPU": 1.0}, None) == (3, "tune.max_concurrent_trials")


# ---------------------------------------------------------------------------------------------------
# one real sweep of TorchTrainer trials: 3 trials x 2 workers on 2 CPUs, so they run one after another

WORKER_GROUP_SWEEP = {
    "name": "pg_t",
    "epochs": 3,
    "data": {"dataset": "digits", "root": "data16", "image_size": 16, "batch_size": 64, "hflip": False},
    "optim": {"name": "adamw", "weight_decay": 0.01},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    "checkpoint": {"storage_path": "runs"},
    "tracking": {"experiment": "pg_t"},
    "tune": {
        "num_samples": 1,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 3},
        # The first trial learns (BN ConvMixer: ~70 % val after one epoch); the second's lr is far too
        # small, so ASHA stops it at epoch 1; the third can only start once the second's CPUs are free.
        "space": {"optim.lr": {"grid": [0.003, 1e-7, 0.002]}},
        "architectures": [
            {
                "model": "convmixer_256_8",
                "kwargs": {"input_size": 16, "patch_size": 4, "kernel_size": 3},
                "norms": ["bn"],
            }
        ],
    },
}


@pytest.mark.slow
@pytest.mark.ray
def test_a_stopped_worker_group_trial_frees_its_cpus_for_the_next(tmp_path):
    """ASHA stops a TorchTrainer trial by killing its driver function; its workers' placement group must
    be released (Ray Train's cleaner, which needs the dashboard's state API) or the next trial waits forever."""
    from mlflow import MlflowClient

    from kn_dist.tune import run_sweep

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(WORKER_GROUP_SWEEP))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        results = run_sweep("sweep.yaml", tracking_uri=uri, address="local")
    finally:
        os.chdir(old)
    epochs = {r.config["optim.lr"]: int(r.metrics["epoch"]) for r in results}
    # 2 CPUs, 2 workers per trial: one trial at a time, so the third trial ran only because the stopped
    # second one gave its CPUs back.
    assert set(epochs) == {0.003, 1e-7, 0.002} and epochs[1e-7] == 1 and epochs[0.003] == 3, epochs
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pg_t")
    trials = {
        r.data.params["optim.lr"]: r for r in client.search_runs([exp.experiment_id], "tags.`kn_dist.kind` = 'trial'")
    }
    assert len(trials) == 3
    for lr, run in trials.items():
        full = epochs[float(lr)] == 3
        assert run.info.status == ("FINISHED" if full else "KILLED"), (lr, run.info.status)
        assert run.data.tags.get("kn_dist.stopped_early") == (None if full else "true")
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1"))
        if full:
            assert steps == [1, 2, 3]
        else:  # its workers die shortly after Tune stops it: at most the epoch under way gets logged too
            assert steps in ([1], [1, 2]), steps
