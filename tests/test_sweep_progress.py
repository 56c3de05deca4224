"""Successive halving per cell (kn_dist.sweep_progress), driven through the real Tune searcher in random
orders of trial completion, against a naive synchronous-halving reference written here: the same
configurations reach the full budget however the trials interleave, and every cell gets the same count."""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest
import yaml

from kn_dist.sweep import load_sweep
from kn_dist.sweep_progress import SweepProgress, TrialKey, full_budget_count, rung_epochs, survivors
from kn_dist.tune_search import make_searcher

ARCHS = [
    {"model": "vit_cifar", "kwargs": {"input_size": 16}, "norms": ["ln", "kn"]},
    {"model": "convmixer_256_8", "kwargs": {"input_size": 16, "patch_size": 4}, "norms": ["bn", "kn"]},
]


def _sweep(tmp_path: Path, *, epochs: int, samples: int, scheduler: dict, seeds: list[int] | None = None):
    tune = {"num_samples": samples, "scheduler": scheduler, "architectures": ARCHS}
    tune |= {"space": {"optim.lr": {"loguniform": [0.001, 0.1]}}} | ({"seeds": seeds} if seeds else {})
    raw = {"name": "h", "epochs": epochs, "data": {"dataset": "digits", "image_size": 16}, "tune": tune}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    return load_sweep(tmp_path / "s.yaml")


def _score(key: TrialKey, epoch: int) -> float:
    """A fixed pseudo-random val score per (trial, epoch), rising with the epoch."""
    return (zlib.crc32(f"{key.name}@{epoch}".encode()) % 1000) / 2000 + epoch / 100


def _reference(sweep, label_cells: list[int]) -> set[tuple[int, int]]:
    """Naive synchronous successive halving of one cell: rank everything alive at each rung, keep the top."""
    samples, reps = sweep.tune.num_samples, len(sweep.tune.seeds or [0])
    alive = [(c, s) for s in range(samples) for c in label_cells]  # sample-major, as the sweep orders them
    rungs = rung_epochs(sweep)
    for rung in rungs[:-1]:
        if len(alive) == 1:
            break
        means = {c: sum(_score(TrialKey(*c, r), rung) for r in range(reps)) / reps for c in alive}
        keep = max(1, int(len(alive) // sweep.tune.scheduler.reduction_factor))
        alive = sorted(alive, key=lambda c: (-means[c], alive.index(c)))[:keep]
    return set(alive)


def _drive(sweep, rng: random.Random, concurrency: int) -> SweepProgress:
    """Run the searcher to the end, finishing a random running segment at a time."""
    progress = SweepProgress(sweep)
    searcher, running, n = make_searcher(sweep, progress, {}), {}, 0
    while True:
        while len(running) < concurrency:
            suggestion = searcher.suggest(f"t{n}")
            if suggestion in (None, "FINISHED"):
                break
            running[f"t{n}"], n = suggestion, n + 1
        if not running:
            assert suggestion == "FINISHED"
            return progress
        trial_id = rng.choice(sorted(running))
        trial = running.pop(trial_id)
        stop = trial["kn_dist.stop"]
        key = TrialKey.parse(trial["kn_dist.trial"])
        # a segment logs every epoch it trains; the searcher hears of its last
        for epoch in range(max(progress.scores.get(key, {0: 0})) + 1, stop):
            progress.record(key, epoch, _score(key, epoch))
        searcher.on_trial_complete(trial_id, {"val_top1": _score(key, stop), "epoch": stop})


@pytest.mark.parametrize(
    ("epochs", "samples", "scheduler", "seeds"),
    [
        (9, 6, {"name": "halving", "grace_period": 1, "reduction_factor": 3}, None),
        (20, 7, {"name": "halving", "grace_period": 2, "reduction_factor": 2}, [0, 1]),
        (5, 3, {"name": "fifo"}, None),
    ],
)
def test_every_cell_ends_with_the_same_full_budget_configurations_in_any_order(
    tmp_path, epochs, samples, scheduler, seeds
):
    sweep = _sweep(tmp_path, epochs=epochs, samples=samples, scheduler=scheduler, seeds=seeds)
    labels: dict[str, list[int]] = {}
    for i, cell in enumerate(sweep.cells):
        labels.setdefault(cell.label, []).append(i)
    expected = {label: _reference(sweep, cells) for label, cells in labels.items()}
    for order in range(6):
        progress = _drive(sweep, random.Random(order), concurrency=1 + order % 4)
        for label in labels:
            full = set(progress.full_budget(label))
            assert full == expected[label], (order, label)
            assert len(full) == full_budget_count(sweep)
        # stopped = everything that did not reach the end; nothing failed
        reached = {t for t, epochs_seen in progress.scores.items() if sweep.base.epochs in epochs_seen}
        assert progress.stopped_trials() | reached == set(progress.scores) and not progress.failed


def test_rungs_and_survivors(tmp_path):
    halving = _sweep(tmp_path, epochs=150, samples=6, scheduler={"name": "halving", "grace_period": 15})
    assert rung_epochs(halving) == [15, 45, 135, 150] and full_budget_count(halving) == 1  # 6 -> 2 -> 1
    fifo = _sweep(tmp_path, epochs=150, samples=6, scheduler={"name": "fifo"})
    assert rung_epochs(fifo) == [150] and full_budget_count(fifo) == 6
    asha = _sweep(tmp_path, epochs=150, samples=6, scheduler={"name": "asha", "grace_period": 15})
    assert rung_epochs(asha) == [150] and full_budget_count(asha) is None
    assert [survivors(n, 3.0) for n in (1, 2, 3, 6, 7, 9)] == [1, 1, 1, 2, 2, 3]


def test_a_failed_trial_blocks_only_its_cell_and_the_sweep_still_ends(tmp_path):
    sweep = _sweep(tmp_path, epochs=3, samples=3, scheduler={"name": "halving", "grace_period": 1})
    progress = SweepProgress(sweep)
    searcher = make_searcher(sweep, progress, {})
    suggestions = {}
    while (s := searcher.suggest(f"t{len(suggestions)}")) not in (None, "FINISHED"):
        suggestions[f"t{len(suggestions)}"] = s
    doomed = next(t for t, s in suggestions.items() if s["kn_dist.trial"] == "c0s0r0")
    for trial_id, s in suggestions.items():
        if trial_id == doomed:
            searcher.on_trial_complete(trial_id, None, error=True)
        else:
            searcher.on_trial_complete(trial_id, {"val_top1": 0.5, "epoch": s["kn_dist.stop"]})
    while (s := searcher.suggest(f"t{len(suggestions)}")) not in (None, "FINISHED"):
        suggestions[f"t{len(suggestions)}"] = s
        searcher.on_trial_complete(f"t{len(suggestions) - 1}", {"val_top1": 0.5, "epoch": s["kn_dist.stop"]})
    assert s == "FINISHED" and set(progress.failed) == {TrialKey(0, 0, 0)}
    blocked = sweep.cells[0].label
    assert progress.full_budget(blocked) == [] and all(
        len(progress.full_budget(c.label)) == 1 for c in sweep.cells if c.label != blocked
    )
