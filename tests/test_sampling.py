"""Epoch samplers: class-balanced frequencies, within-class uniformity, random views."""

import numpy as np
import pytest

from wbc.errors import WbcError
from wbc.sampling import class_balanced, epoch_draws

COUNTS = np.array([4000, 900, 150, 30, 5])
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))
C = len(COUNTS)


def _tol(p: float, n: int, z: float = 5.0) -> float:
    """Stated tolerance: z binomial standard deviations of a frequency p estimated from n draws."""
    return z * np.sqrt(p * (1 - p) / n)


def test_class_balanced_frequencies_are_uniform_within_5_sigma():
    rng = np.random.default_rng(1)
    rows = np.concatenate([class_balanced(LABELS, C, rng) for _ in range(5)])  # 5 epochs
    freq = np.bincount(LABELS[rows], minlength=C) / len(rows)
    assert len(rows) == 5 * len(LABELS)
    np.testing.assert_allclose(freq, 1 / C, atol=_tol(1 / C, len(rows)))  # |f - 1/5| < 0.0039


def test_class_balanced_is_uniform_within_a_class_and_with_replacement():
    rng = np.random.default_rng(2)
    rows = np.concatenate([class_balanced(LABELS, C, rng) for _ in range(5)])
    tail = np.flatnonzero(LABELS == C - 1)  # 5 rows, each drawn ~ 5 * 5085 / 5 / 5 times
    hits = np.array([(rows == r).sum() for r in tail])
    expected = len(rows) / C / len(tail)
    np.testing.assert_allclose(hits, expected, atol=5 * np.sqrt(expected))
    assert len(np.unique(rows)) < len(rows)  # with replacement


def test_views_are_uniform_and_instance_sampler_is_a_permutation():
    rng = np.random.default_rng(3)
    rows, views = epoch_draws("instance", LABELS, C, 8, rng)
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(LABELS)))
    freq = np.bincount(views, minlength=8) / len(views)
    np.testing.assert_allclose(freq, 1 / 8, atol=_tol(1 / 8, len(views)))


def test_draws_are_reproducible_from_the_seed():
    a = epoch_draws("class_balanced", LABELS, C, 8, np.random.default_rng(7))
    b = epoch_draws("class_balanced", LABELS, C, 8, np.random.default_rng(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_missing_class_and_unknown_sampler_are_user_errors():
    with pytest.raises(WbcError, match="every class"):
        class_balanced(np.array([0, 0, 2]), 3, np.random.default_rng(0))
    with pytest.raises(WbcError, match="unknown sampler"):
        epoch_draws("balanced", LABELS, C, 8, np.random.default_rng(0))
