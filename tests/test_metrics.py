"""Metrics against scikit-learn and a hand-computed specificity example."""

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
)

from wbc.metrics import classification_metrics, expected_calibration_error, mean_std


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    c = 5
    y = rng.integers(0, c, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, c, 300))
    m = classification_metrics(y, p, c)
    assert m["mf1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["bacc"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["mp"] == pytest.approx(precision_score(y, p, average="macro", zero_division=0))
    np.testing.assert_array_equal(m["confusion"], confusion_matrix(y, p, labels=range(c)))


def test_absent_class_is_stated_and_excluded():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0, 2, 1, 1, 0])  # class 2 never true, predicted once
    m = classification_metrics(y, p, 3)
    assert list(m["absent"]) == [2]
    present = [0, 1]
    assert m["mf1"] == pytest.approx(f1_score(y, p, labels=present, average="macro"))
    assert m["bacc"] == pytest.approx(balanced_accuracy_score(y, p))


def test_macro_specificity_by_hand():
    # cm rows true, cols pred: [[2,1,0],[0,3,0],[1,0,1]]; N = 8
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    p = np.array([0, 0, 1, 1, 1, 1, 0, 2])
    # class 0: FP=1 (a 2 predicted 0), TN = 8-3(true 0)-1 = 4 -> 4/5
    # class 1: FP=1, TN = 8-3-1 = 4 -> 4/5;  class 2: FP=0, TN = 6 -> 1
    m = classification_metrics(y, p, 3)
    assert m["mspec"] == pytest.approx((0.8 + 0.8 + 1.0) / 3)


def test_mean_std_and_ece():
    ms = mean_std([{"mf1": 0.5, "bacc": 1, "mp": 0, "mspec": 1}, {"mf1": 0.7, "bacc": 1, "mp": 0, "mspec": 1}])
    assert ms["mf1"] == pytest.approx((0.6, 0.1))
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    # confidence 0.9, accuracy 0.5 -> ECE 0.4
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.4)
