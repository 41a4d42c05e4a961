"""Epoch samplers over cache rows: each draw is (row, view), the view picked at random.

Views act as augmentation: a row drawn twice usually shows two different test-time views.
An epoch is `len(labels)` draws for both samplers, so epochs of the two are the same size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from wbc.errors import WbcError
from wbc.registry import Registry

Sampler = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
SAMPLERS: Registry[Sampler] = Registry("sampler")


@SAMPLERS.register("class_balanced")
def class_balanced(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """N draws with replacement, P(row i) proportional to 1/n_{y_i}. labels: (N,) -> rows (N,) int64.

    Equivalent to multinomial sampling with those weights: a class uniformly at random, then a
    row of that class uniformly at random (O(N), no per-sample Python work).
    """
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # rows grouped by class
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise WbcError(f"class-balanced sampling needs every class; classes {missing} have no row")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cls = rng.integers(num_classes, size=len(labels))
    within = (rng.random(len(labels)) * counts[cls]).astype(np.int64)
    return order[starts[cls] + np.minimum(within, counts[cls] - 1)]


@SAMPLERS.register("instance")
def instance(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Every row once per epoch, in random order (the plain instance-balanced sampler)."""
    return rng.permutation(len(labels)).astype(np.int64)


def epoch_draws(
    sampler: str, labels: np.ndarray, num_classes: int, num_views: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's draws: rows (N,) int64 into `labels` and views (N,) int64 in [0, num_views)."""
    rows = SAMPLERS.get(sampler)(labels, num_classes, rng)
    views = rng.integers(num_views, size=len(rows))
    return rows, views
