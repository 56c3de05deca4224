"""kn_dist.data.splits: the held-out split is stratified, disjoint, stable across runs and machines.

Pure numpy (no FFCV files): CIFAR-sized label arrays stand in for the real archives, which the
test suite never downloads. "Across machines" is pinned by SHA-256 of the sorted index lists,
computed here with hashlib; the split itself only uses np.random.RandomState, whose stream NumPy
freezes (NEP 19).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kn_dist.data.splits import SPLIT_SEED, class_quotas, holdout_split
from kn_dist.errors import UserError


def sha(indices: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(indices)).astype("<i8").tobytes()).hexdigest()


def cifar_like_labels(num_classes: int, n: int = 50_000) -> np.ndarray:
    """Balanced labels in a scrambled order (as CIFAR's batches are): n / num_classes per class."""
    return np.random.RandomState(123).permutation(np.arange(n) % num_classes)


@pytest.mark.parametrize(("num_classes", "per_class"), [(10, 500), (100, 50)])
def test_cifar_val_is_5000_stratified_exactly(num_classes, per_class):
    labels = cifar_like_labels(num_classes)
    train, val = holdout_split(labels, 5_000)
    assert len(val) == 5_000 and len(train) == 45_000
    assert np.array_equal(np.bincount(labels[val], minlength=num_classes), np.full(num_classes, per_class))
    assert np.intersect1d(train, val).size == 0 and np.array_equal(np.union1d(train, val), np.arange(50_000))


def test_split_is_stable_across_runs_and_pinned_across_machines():
    labels = cifar_like_labels(10)
    first, again = holdout_split(labels, 5_000), holdout_split(labels.copy(), 5_000)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    # Pinned once on this machine; a different NumPy, platform or a change to the algorithm fails here.
    assert sha(first[1]) == "e3efc162255ae1fabeb48325a0953df2bcfd4546dc08d8636cd5e4342560aeac"
    assert SPLIT_SEED == 0  # the seed recorded in every splits.json
    assert not np.array_equal(holdout_split(labels, 5_000, seed=1)[1], first[1])  # the seed matters


def test_imbalanced_classes_are_within_one_sample_of_the_exact_fraction():
    rng = np.random.RandomState(7)
    labels = np.repeat(np.arange(7), [3, 50, 101, 7, 999, 12, 1])
    labels = labels[rng.permutation(len(labels))]
    for n_holdout in (1, 5, 117, 500, len(labels) - 1):
        kept, held = holdout_split(labels, n_holdout)
        assert len(held) == n_holdout and len(kept) + len(held) == len(labels)
        exact = n_holdout * np.bincount(labels) / len(labels)
        assert np.all(np.abs(np.bincount(labels[held], minlength=7) - exact) < 1), n_holdout
        assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))


def test_quotas_follow_largest_remainder():
    # 3 classes of 1 sample, hold out 2: exact quotas 2/3 each; ties go to the lower class ids
    assert class_quotas(np.array([0, 1, 2]), 2).tolist() == [1, 1, 0]
    # 10 / 20 / 70 of 100, hold out 15: exact 1.5 / 3 / 10.5 -> 2 / 3 / 10 (class 0 wins the tie)
    labels = np.repeat([0, 1, 2], [10, 20, 70])
    assert class_quotas(labels, 15).tolist() == [2, 3, 10]


def test_holdout_within_a_class_is_a_random_choice_not_the_first_files():
    labels = np.zeros(1_000, dtype=np.int64)
    _, held = holdout_split(labels, 100)
    assert held.min() < 100 and held.max() > 900  # spread over the source, not a prefix


@pytest.mark.parametrize("n_holdout", [0, 10, -1])
def test_impossible_holdouts_are_one_sentence(n_holdout):
    with pytest.raises(UserError, match=rf"cannot hold out {n_holdout} of 10 samples"):
        holdout_split(np.arange(10) % 2, n_holdout)
