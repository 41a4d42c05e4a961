"""Imbalance-aware metrics: Macro-F1, balanced accuracy, macro precision, macro specificity.

All values are fractions in [0, 1]. Macro averages run over the classes PRESENT in `y_true`
(a class with no true sample has undefined recall); classes absent from the set are listed in
`absent` so reports can state it. This matches scikit-learn's `balanced_accuracy_score` and
`f1_score(average="macro", labels=present)`.
"""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    idx = y_true * num_classes + y_pred
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # 0/0 -> 0, scikit-learn's zero_division=0 convention.
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1, specificity and support per class from a confusion matrix."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    fp = predicted - tp
    fn = support - tp
    tn = cm.sum() - tp - fp - fn
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    specificity = _safe_div(tn, tn + fp)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "specificity": specificity,
        "support": support.astype(np.int64),
    }


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    """Headline metrics plus per-class table and confusion matrix.

    y_true, y_pred: (N,) int class indices in [0, num_classes).
    Returns keys: mf1, bacc, mp, mspec, acc, per_class (dict of (C,) arrays), confusion (C, C),
    present (indices averaged over), absent (indices with no true sample).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D shapes")
    cm = confusion(y_true, y_pred, num_classes)
    pc = per_class(cm)
    present = np.flatnonzero(pc["support"] > 0)
    absent = np.flatnonzero(pc["support"] == 0)

    def macro(v: np.ndarray) -> float:
        return float(v[present].mean()) if len(present) else float("nan")

    return {
        "mf1": macro(pc["f1"]),
        "bacc": macro(pc["recall"]),
        "mp": macro(pc["precision"]),
        "mspec": macro(pc["specificity"]),
        "acc": float(np.trace(cm) / max(cm.sum(), 1)),
        "per_class": pc,
        "confusion": cm,
        "present": present,
        "absent": absent,
    }


HEADLINE = ("mf1", "bacc", "mp", "mspec")


def mean_std(runs: list[dict], keys=HEADLINE) -> dict[str, tuple[float, float]]:
    """Mean and (population, ddof=0) std over folds of each headline metric."""
    out = {}
    for k in keys:
        v = np.array([r[k] for r in runs], dtype=np.float64)
        out[k] = (float(v.mean()), float(v.std()))
    return out


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (top-label calibration).

    probs: (N, C) rows summing to 1; y_true: (N,) int.
    """
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    correct = (probs.argmax(1) == np.asarray(y_true)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)
