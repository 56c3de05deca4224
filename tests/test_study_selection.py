"""The study's fairness rules against a real MLflow store filled with runs (no Ray, no training).

Each test guards one fault of issue 22: selection on the mean of replicates (not the luckiest run),
equal full-budget counts per cell, a selection pinned and read back, a changed study refused on resume,
finals keyed by (cell, seed) with seeds of their own stream that may grow, and no final replaying a trial.
"""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from kn_dist import tracking
from kn_dist.errors import UserError
from kn_dist.study import _study_run, check_no_replay, final_loops, final_seed, finished_finals, load_study
from kn_dist.study_report import collect_finals
from kn_dist.study_selection import check_unchanged, pin_or_check_selection, select_configurations
from kn_dist.sweep import sample_values, trial_seed
from kn_dist.sweep_progress import TrialKey
from kn_dist.tune_trial import TRIAL_KEY_TAG

STUDY = {
    "name": "sel",
    "epochs": 2,
    "data": {"dataset": "digits", "image_size": 16},
    "optim": {"name": "adamw", "lr": 0.003},
    "tracking": {"experiment": "sel"},
    "tune": {
        "num_samples": 2,
        "seeds": [0, 1],
        "scheduler": {"name": "fifo"},
        "space": {"optim.lr": {"loguniform": [0.001, 0.01]}},
        "architectures": [
            {
                "model": "convmixer_256_8",
                "kwargs": {"input_size": 16, "patch_size": 4, "kernel_size": 3},
                "norms": ["bn", "kn"],
                "kn_space": {"model.kwargs.kn_dropout_p": {"choice": [0.0, 0.05]}},
            }
        ],
    },
    "study": {"seeds": 3},
}


@pytest.fixture
def store(tmp_path, mlflow_uri):
    def load(*overrides: str):
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(STUDY))
        study = load_study(path, list(overrides))
        study.base.tracking.uri = mlflow_uri
        return study

    study = load()
    client = MlflowClient(mlflow_uri)
    study_run = _study_run(study, resume=False)
    tags = tracking.run_tags(study.base, run_key="sweep:sel", kind="sweep", parent_run_id=study_run)
    sweep_run = tracking.create_run(client, "sel", study.base, tags)
    return {"study": study, "load": load, "client": client, "study_run": study_run, "sweep_run": sweep_run}


def _trial(s, cell: int, sample: int, rep: int, history: list[float], status: str = "FINISHED", seed=None) -> str:
    study, client = s["study"], s["client"]
    sweep = study.sweep
    key = TrialKey(cell, sample, rep)
    values = {**sweep.cells[cell].values, **sample_values(sweep, cell, sample)}
    seed = trial_seed(sweep, sample, rep) if seed is None else seed
    cfg = sweep.trial_config(values, seed=seed, name=f"sel-{key.name}")
    tags = tracking.run_tags(
        cfg,
        run_key=f"trial:sel:{key.name}",
        kind="trial",
        trial_id=key.name,
        parent_run_id=s["sweep_run"],
        extra={TRIAL_KEY_TAG: key.name, "kn_dist.cell": sweep.cells[cell].label},
    )
    run_id = tracking.create_run(client, "sel", cfg, tags)
    for epoch, value in enumerate(history, 1):
        tracking.log_epoch(client, run_id, epoch, {"val_top1": value})
    tracking.finish(client, run_id, status=status)
    return run_id


def _fill(s, kn_second_rep: float = 0.74) -> None:
    """bn: sample 0 has the luckiest single run (0.9) but the worse mean (0.7); sample 1 the better mean."""
    _trial(s, 0, 0, 0, [0.5, 0.9]), _trial(s, 0, 0, 1, [0.5, 0.5])
    _trial(s, 0, 1, 0, [0.5, 0.75]), _trial(s, 0, 1, 1, [0.5, 0.74])
    _trial(s, 1, 0, 0, [0.5, 0.6]), _trial(s, 1, 0, 1, [0.5, 0.6])
    _trial(s, 1, 1, 0, [0.5, 0.8]), _trial(s, 1, 1, 1, [0.5, kn_second_rep])


def test_selection_takes_the_best_mean_over_replicates_not_the_luckiest_run(store):
    _fill(store)
    _trial(store, 1, 0, 0, [0.99, 0.99, 0.99], status="KILLED")  # not a full-budget record: ignored
    picked = {s.cell: s for s in select_configurations(store["client"], store["study"], store["sweep_run"])}
    assert picked["convmixer_256_8/bn"].candidate == "c0s1" and picked["convmixer_256_8/bn"].score == pytest.approx(
        0.745
    )
    assert picked["convmixer_256_8/kn"].candidate == "c1s1" and len(picked["convmixer_256_8/kn"].run_ids) == 2
    assert {(s.full_budget, s.offered) for s in picked.values()} == {(2, 2)}
    assert (
        picked["convmixer_256_8/kn"].config.model.kwargs["kn_dropout_p"]
        == sample_values(store["study"].sweep, 1, 1)["model.kwargs.kn_dropout_p"]
    )


def test_cells_with_unequal_full_budget_counts_are_refused(store):
    _fill(store)
    failed = store["client"].search_runs(
        [store["client"].get_experiment_by_name("sel").experiment_id], f"tags.`{TRIAL_KEY_TAG}` = 'c1s1r1'"
    )[0]
    store["client"].set_terminated(failed.info.run_id, "FAILED")
    with pytest.raises(UserError, match=r"unequal full-budget configurations \(convmixer_256_8/bn 2 of 2, .*kn 1 of 2"):
        select_configurations(store["client"], store["study"], store["sweep_run"])


def test_the_pinned_selection_is_read_back_and_a_different_one_refused(store):
    _fill(store)
    client, study = store["client"], store["study"]
    selected = select_configurations(client, study, store["sweep_run"])
    pin_or_check_selection(client, study, store["study_run"], selected)
    pin_or_check_selection(client, study, store["study_run"], selected)  # the same selection again: fine
    # The records change under the study (a better replicate appears): its finals would mix configurations.
    exp = client.get_experiment_by_name("sel").experiment_id
    (old,) = client.search_runs([exp], f"tags.`{TRIAL_KEY_TAG}` = 'c1s0r1'")
    client.delete_run(old.info.run_id)
    _trial(store, 1, 0, 1, [0.5, 0.99])
    moved = select_configurations(client, study, store["sweep_run"])
    with pytest.raises(UserError, match="convmixer_256_8/kn: c1s1 -> c1s0"):
        pin_or_check_selection(client, study, store["study_run"], moved)


def test_a_changed_study_is_refused_on_resume_but_more_seeds_are_not(store):
    client = store["client"]
    check_unchanged(client, store["load"]("study.seeds=5"), store["study_run"])
    with pytest.raises(UserError, match=r"changed since it started \(tune.num_samples: 2 -> 3\)"):
        check_unchanged(client, store["load"]("tune.num_samples=3"), store["study_run"])
    with pytest.raises(UserError, match="optim.weight_decay"):
        check_unchanged(client, store["load"]("optim.weight_decay=0.1"), store["study_run"])


def test_finals_are_keyed_by_cell_and_seed_and_growing_seeds_adds_only_new_ones(store):
    _fill(store)
    client, study = store["client"], store["study"]
    selected = select_configurations(client, study, store["sweep_run"])
    three = final_loops(study, selected, store["study_run"], [0, 1, 2])
    five = final_loops(store["load"]("study.seeds=5"), selected, store["study_run"], [0, 1, 2, 3, 4])
    assert set(three) < set(five) and len(five) == 10
    assert all(five[k].config == three[k].config for k in three)  # a finished final is the same run
    by_seed = {}
    for loop in five.values():
        by_seed.setdefault(loop.tags["kn_dist.seed"], set()).add(loop.config.seed)
    # paired: study seed s trains every cell with the same seed; from the finals' own stream
    assert {s: seeds for s, seeds in by_seed.items()} == {str(s): {final_seed(0, s)} for s in range(5)}
    assert not {final_seed(0, s) for s in range(5)} & {0, 1}  # the trials' seeds (tune.seeds)
    check_no_replay(client, study, store["sweep_run"], five)
    # Three finals finished (one of them for a configuration no longer selected), one still running.
    for key in sorted(three)[:3]:
        loop = three[key]
        tags = tracking.run_tags(
            loop.config, run_key=key, kind="final", parent_run_id=store["study_run"], extra=loop.tags
        )
        run_id = tracking.create_run(client, "sel", loop.config, tags)
        tracking.log_epoch(client, run_id, 2, {"test_top1": 0.5, "val_top1": 0.5})
        tracking.finish(client, run_id)
    stray = tracking.create_run(client, "sel", loop.config, {**tags, "kn_dist.selected_trial": "c1s0"})
    tracking.log_epoch(client, stray, 2, {"test_top1": 0.1, "val_top1": 0.1})
    tracking.finish(client, stray)
    assert finished_finals(client, study) == set(sorted(three)[:3])
    cells = collect_finals(client, "sel", store["study_run"], {s.cell: s.candidate for s in selected}, [0, 1, 2])
    assert sum(len(c.finals) for by_norm in cells.values() for c in by_norm.values()) == 3


def test_a_final_that_would_replay_a_trial_is_refused(store):
    _fill(store)
    client, study = store["client"], store["study"]
    # A trial that happened to use the seed the finals give study seed 1, with the selected values.
    _trial(store, 0, 1, 0, [0.1, 0.1], status="KILLED", seed=final_seed(0, 1))
    loops = final_loops(study, select_configurations(client, study, store["sweep_run"]), store["study_run"], [0, 1, 2])
    with pytest.raises(UserError, match="would replay a sweep trial"):
        check_no_replay(client, study, store["sweep_run"], loops)
