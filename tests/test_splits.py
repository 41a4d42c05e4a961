"""Splits: stratified, grouped (no patient in two parts), reproducible, disjoint, stored."""

import numpy as np
import pytest

from tests.fixtures import make_tiny_store
from wbc.errors import WbcError
from wbc.splits import SplitConfig, make_split, split_store
from wbc.store import open_store

CLASSES = ["A", "B", "C"]


def _data(n_per=(60, 30, 15), groups_per_patient=0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, k) for k, n in enumerate(n_per)])
    rng.shuffle(y)
    g = [f"p{i // groups_per_patient}" for i in range(len(y))] if groups_per_patient else [""] * len(y)
    return y, g, [""] * len(y)


def test_stratified_disjoint_complete():
    y, g, s = _data()
    fold, info = make_split(y, g, s, CLASSES, SplitConfig(test=0.2, folds=5, seed=0))
    assert set(fold.tolist()) == {-1, 0, 1, 2, 3, 4}  # every row in exactly one part
    for k, n in enumerate((60, 30, 15)):
        assert (fold[y == k] == -1).sum() == round(0.2 * n)  # exact per-class test share
        per_fold = [(fold[y == k] == f).sum() for f in range(5)]
        assert max(per_fold) - min(per_fold) <= 1  # stratified folds
    assert info["n_test"] == (fold == -1).sum() and not info["grouped"]


def test_reproducible_and_seed_dependent():
    y, g, s = _data()
    a, ia = make_split(y, g, s, CLASSES, SplitConfig(seed=0))
    b, ib = make_split(y, g, s, CLASSES, SplitConfig(seed=0))
    c, _ = make_split(y, g, s, CLASSES, SplitConfig(seed=1))
    np.testing.assert_array_equal(a, b)
    assert ia["split_id"] == ib["split_id"] and not np.array_equal(a, c)


def test_grouped_no_patient_in_two_parts():
    y, g, s = _data((120, 60, 40), groups_per_patient=4)
    fold, info = make_split(y, g, s, CLASSES, SplitConfig(test=0.2, folds=5, seed=0))
    assert info["grouped"]
    parts = {}
    for gi, f in zip(g, fold):
        parts.setdefault(gi, set()).add(int(f))
    assert all(len(p) == 1 for p in parts.values())
    assert 0.12 < info["test_fraction"] < 0.28
    for k in range(3):  # still roughly stratified
        assert 0.1 < (fold[y == k] == -1).mean() < 0.32


def test_source_split_honoured_and_unlabelled_unused():
    y, g, _ = _data()
    y[:5] = -1  # unlabelled (e.g. WBCBench test rows)
    s = ["test" if i % 4 == 0 else "train" for i in range(len(y))]
    fold, info = make_split(y, g, s, CLASSES, SplitConfig(test=0.5))
    assert info["source_test_used"]
    assert (fold[:5] == -2).all()
    marked = np.array([x == "test" for x in s]) & (y >= 0)
    np.testing.assert_array_equal(fold == -1, marked)


def test_class_smaller_than_folds_is_clear_error():
    y, g, s = _data((40, 30, 4))
    with pytest.raises(WbcError, match="'C' has 3 labelled image.*fewer than --folds 5"):
        make_split(y, g, s, CLASSES, SplitConfig(folds=5))
    with pytest.raises(WbcError, match="--test must be"):
        make_split(y, g, s, CLASSES, SplitConfig(test=1.5))


def test_split_store_round_trip(tmp_path):
    p = make_tiny_store(tmp_path / "s.h5", n_per_class=12, folds=3)
    with pytest.raises(WbcError, match="already split"):
        split_store(p, SplitConfig(test=0.25, folds=3, seed=0))
    info = split_store(p, SplitConfig(test=0.25, folds=3, seed=0), overwrite=True)
    folds = open_store(p).folds
    assert info["n_test"] == (folds == -1).sum() == 9
    assert split_store(p, SplitConfig(test=0.25, folds=3, seed=0)) == info  # same settings: kept
    np.testing.assert_array_equal(open_store(p).folds, folds)
